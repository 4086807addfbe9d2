"""What every command-line tool of hetplan shares: the consoles it prints through, the entry point that turns
a user error into a message and exit status 2, the progress bar of long work, and the rules for the files it
writes.

Files: every output option (`--out`, `--csv`, `--trace`, `--plot`, ...) is checked with `check_output` before
any work starts: an existing file is refused unless `--force`, and a folder, a missing parent folder or a
name with the wrong extension is a one-line error naming the option, the path and what is accepted (exit
status 2). `write_output` creates the file exclusively (O_EXCL: two writers cannot replace each other's file;
with --force a temporary file is renamed over it) and says so on stderr ("wrote report.json (4.1 kB)"), so
that `--json` on stdout stays parseable; `report_written` says it for a file another module wrote.

Progress: `progress_bar` draws on a terminal and is silent (disabled) when stderr is a pipe, a file or a CI log.

Consoles: a terminal gets its own width. Output that goes to a file, a pipe or a CI log would get rich's fallback of
80 columns, which folds plan strings and paths letter by letter inside table cells and splits error
messages mid-phrase; there the width is `COLUMNS` when that is a positive number, else `PIPE_WIDTH`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn

from hwmodel.errors import UserError

PIPE_WIDTH = 160


def make_console(*, stderr: bool = False) -> Console:
    """A console on stdout (or stderr), as wide as the terminal, or `PIPE_WIDTH` when it is not one."""
    stream = sys.stderr if stderr else sys.stdout
    columns = os.environ.get("COLUMNS", "")
    if (columns.isdigit() and int(columns) > 0) or _is_terminal(stream):
        return Console(stderr=stderr)  # rich reads COLUMNS itself
    return Console(stderr=stderr, width=PIPE_WIDTH)


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


PACKAGES = ("hwmodel", "workloads", "simulator", "executor", "specs")


def run_app(app: Callable[[], Any], err_console: Console) -> None:
    """Run a typer app as a console entry point: a UserError becomes its message on `err_console` and
    exit status 2, never a traceback; Ctrl-C exits with 130. A warning of hetplan's own (a UserWarning
    subclass defined in its packages, such as a defaulted sequence length) is one line "warning: ..."."""
    import warnings

    from rich.markup import escape

    original = warnings.showwarning

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        if issubclass(category, UserWarning) and category.__module__.split(".")[0] in PACKAGES:
            err_console.print(f"[yellow]warning:[/yellow] {escape(str(message))}", highlight=False, soft_wrap=True)
        else:
            original(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        app()
    except UserError as exc:
        err_console.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    finally:
        warnings.showwarning = original


# What each kind of output file may be called (the first suffix is the one named in messages first).
JSON = (".json",)
YAML = (".yaml", ".yml")
CSV = (".csv",)
IMAGE = (".png", ".pdf", ".svg")


def _accepted(suffixes: tuple[str, ...]) -> str:
    names = [f"*{s}" for s in suffixes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def check_output(path: Path, option: str, suffixes: tuple[str, ...] | None, force: bool) -> None:
    """Refuse, before any work, an output path that cannot be written as asked: a folder, a missing parent
    folder, a suffix not in `suffixes` (None: any name), or an existing file without --force."""
    where = f"{option} {path}"
    if path.is_dir():
        raise UserError(f"{where} is a folder; {option} takes a file name ({_accepted(suffixes or ('*',))})")
    parent = path.parent
    if not parent.is_dir():
        what = "is a file, not a folder" if parent.exists() else "does not exist"
        raise UserError(f"{where}: the folder {parent} {what}; create it or choose another path")
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise UserError(f"{where}: name the file {_accepted(suffixes)} (that is what {option} writes)")
    if path.exists() and not force:
        raise UserError(f"{where} already exists; choose another name or pass --force to replace it")


def format_size(size: int) -> str:
    """A file size as people read it in a listing: 812 B, 4.1 kB, 12.3 MB (decimal)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def report_written(path: Path, console: Console | None = None) -> None:
    """Say on stderr that `path` was written, with its size ("wrote report.json (4.1 kB)")."""
    console = console or make_console(stderr=True)
    size = path.stat().st_size if path.is_file() else None
    console.print(f"wrote {path}" + (f" ({format_size(size)})" if size is not None else ""), highlight=False)


def write_output(
    path: Path,
    data: str | bytes,
    option: str,
    suffixes: tuple[str, ...] | None,
    force: bool,
    console: Console | None = None,
) -> None:
    """Write `data` to `path` after the checks of `check_output`, and say so on stderr."""
    check_output(path, option, suffixes, force)
    raw = data if isinstance(data, bytes) else data.encode("utf-8")
    if force:
        # Replacing: a temporary file renamed over the target, so a reader never sees half a file.
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_bytes(raw)
        os.replace(tmp, path)
    else:
        # Created exclusively (O_EXCL): a writer that started after the check above cannot be replaced.
        try:
            with open(path, "xb") as f:
                f.write(raw)
        except FileExistsError:
            raise UserError(
                f"{option} {path} already exists (another process wrote it meanwhile); choose another name or pass "
                "--force to replace it"
            ) from None
    report_written(path, console)


def check_new_file(path: Path, force: bool, option: str = "output") -> None:
    """`check_output` for a file of any name."""
    check_output(path, option, None, force)


def write_new_file(path: Path, text: str, force: bool, option: str = "output") -> None:
    """`write_output` for a file of any name."""
    write_output(path, text, option, None, force)


def progress_bar(console: Console, *columns: str | ProgressColumn, transient: bool = True) -> Progress:
    """The progress bar of long work (calibrate, search, the event engine on big plans, validate, execute): drawn
    on a terminal, disabled when `console` writes to a pipe or a file, gone when the work is done."""
    if not columns:
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
        )
    return Progress(*columns, console=console, transient=transient, disable=not console.is_terminal)
