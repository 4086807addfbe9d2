"""The planners behind `simulate search`, in one table.

A planner is a package under `simulator/search/<name>/` with the same inner shape (`space`/`costs`/`search`
as it needs them, `cli` with one typer command, `render` or rendering in `cli`) and one line below. The
command is named by its import path so that listing the planners imports none of them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Planner:
    """One planner: its command name, the published system it follows, what it maximizes, what its
    `--json` result's `report` holds, and where its typer command lives ("module:function")."""

    name: str
    system: str
    objective: str
    report_type: str
    command_path: str

    def command(self) -> Callable[..., Any]:
        """The typer command function (imports the planner's CLI module)."""
        module, _, function = self.command_path.partition(":")
        command: Callable[..., Any] = getattr(importlib.import_module(module), function)
        return command


PLANNERS: tuple[Planner, ...] = (
    Planner(
        "galvatron",
        "Galvatron-BMW (hybrid parallelism)",
        "samples/s within a per-device memory budget",
        "Report",
        "simulator.search.galvatron.cli:galvatron_command",
    ),
    Planner(
        "memo",
        "MEMO (SIGMOD 2025)",
        "MFU of a long-context job within device and host memory",
        "Report",
        "simulator.search.memo.cli:memo_command",
    ),
    Planner(
        "angel-ptm",
        "Angel-PTM (VLDB 2023)",
        "largest model or samples/s with paged model states",
        "AngelReport",
        "simulator.search.angel_ptm.cli:angel_command",
    ),
    Planner(
        "vfl",
        "CELU-VFL (VLDB 2022)",
        "time to the target AUC over a WAN",
        "VflReport",
        "simulator.search.vfl.cli:vfl_command",
    ),
)


def planner(name: str) -> Planner:
    """The planner called `name`; an unknown name suggests the nearest."""
    from hwmodel.errors import UnknownNameError

    for p in PLANNERS:
        if p.name == name:
            return p
    raise UnknownNameError("planner", name, [p.name for p in PLANNERS])


def _check_unique() -> None:
    names = [p.name for p in PLANNERS]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    assert not duplicates, f"planners registered twice: {duplicates}"


_check_unique()
