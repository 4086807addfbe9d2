"""What several test modules share that is not a fixture: the repository root and a CLI run's outcome."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class CliResult:
    """Exit status, stdout and stderr of one in-process run of a console entry point."""

    code: int
    out: str
    err: str
