"""The rich consoles the command-line tools print through.

A terminal gets its own width. Output that goes to a file, a pipe or a CI log would get rich's fallback of
80 columns, which folds plan strings and paths letter by letter inside table cells and splits error
messages mid-phrase; there the width is `COLUMNS` when that is a positive number, else `PIPE_WIDTH`.
"""

from __future__ import annotations

import os
import sys

from rich.console import Console

PIPE_WIDTH = 160


def make_console(*, stderr: bool = False) -> Console:
    """A console on stdout (or stderr), as wide as the terminal, or `PIPE_WIDTH` when it is not one."""
    stream = sys.stderr if stderr else sys.stdout
    columns = os.environ.get("COLUMNS", "")
    if (columns.isdigit() and int(columns) > 0) or _is_terminal(stream):
        return Console(stderr=stderr)  # rich reads COLUMNS itself
    return Console(stderr=stderr, width=PIPE_WIDTH)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False
