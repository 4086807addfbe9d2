"""User-facing errors shared by every package.

A `UserError` is something the person running hetplan can fix (a bad file, an unknown name, a plan
that cannot run). The CLIs print its message without a traceback and exit with status 2. Bugs stay
as assertions and ordinary exceptions.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(ValueError):
    """An error in what the user wrote or asked for; its message says what and what is accepted."""


class SpecError(UserError):
    """A hardware, workload or plan file that does not parse or validate."""


class UnknownNameError(UserError):
    """A catalog name that does not exist; the message suggests the nearest names."""

    def __init__(self, kind: str, name: str, known: Iterable[str]):
        known = sorted(known)
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        listing = ", ".join(known) if len(known) <= 30 else ", ".join(known[:30]) + ", ..."
        super().__init__(f"unknown {kind} {name!r}.{hint} Known {kind}s: {listing}.")
        self.kind = kind
        self.name = name
        self.suggestions = close


def nearest(name: str, known: Iterable[str], n: int = 3) -> list[str]:
    """The known names closest to `name`, best first."""
    return difflib.get_close_matches(name, list(known), n=n, cutoff=0.4)
