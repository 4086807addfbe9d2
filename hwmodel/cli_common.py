"""What every command-line tool of hetplan shares: the consoles it prints through, the entry point that turns
a user error into a message and exit status 2, and the rules for the files it writes.

Consoles: a terminal gets its own width. Output that goes to a file, a pipe or a CI log would get rich's fallback of
80 columns, which folds plan strings and paths letter by letter inside table cells and splits error
messages mid-phrase; there the width is `COLUMNS` when that is a positive number, else `PIPE_WIDTH`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from rich.console import Console

from hwmodel.errors import UserError

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


def run_app(app, err_console: Console) -> None:
    """Run a typer app as a console entry point: a UserError becomes its message on `err_console` and
    exit status 2, never a traceback; Ctrl-C exits with 130."""
    from rich.markup import escape

    try:
        app()
    except UserError as exc:
        err_console.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


def check_new_file(path: Path, force: bool) -> None:
    """Refuse to replace a file the user already has unless --force; the folder must exist."""
    if path.exists() and not force:
        raise UserError(f"{path} already exists; choose another name or pass --force to replace it")
    if path.parent and not path.parent.exists():
        raise UserError(f"{path.parent} does not exist")


def write_new_file(path: Path, text: str, force: bool) -> None:
    """Write `text` to `path`, refusing to replace a file the user already has unless --force."""
    check_new_file(path, force)
    path.write_text(text, encoding="utf-8")
