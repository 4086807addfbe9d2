"""The consoles the command-line tools print through: a terminal's own width, a wide fixed width for
files, pipes and CI logs (rich would fold table cells at 80 columns there), and COLUMNS when set."""

from __future__ import annotations

import io
import os
import subprocess
import sys

from hwmodel.cli_common import PIPE_WIDTH, make_console


def test_output_that_is_not_a_terminal_gets_the_pipe_width(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert make_console().width == PIPE_WIDTH
    assert make_console(stderr=True).width == PIPE_WIDTH


def test_columns_wins_over_the_pipe_width(monkeypatch):
    monkeypatch.setenv("COLUMNS", "97")
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert make_console().width == 97


def test_columns_that_is_not_a_width_is_ignored(monkeypatch):
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    for junk in ("abc", "0", "-5", ""):
        monkeypatch.setenv("COLUMNS", junk)
        assert make_console().width == PIPE_WIDTH


def test_a_piped_search_table_keeps_plan_strings_whole():
    """The MEMO planner's table through a pipe: each plan stays on one line instead of being folded into
    cells nine characters wide."""
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            "from simulator.cli import main; main()",
            "search",
            "memo",
            "--workload",
            "llama2-7b",
            "--cluster",
            "hgx-a800",
            "--seq-len",
            "262144",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "COLUMNS"},
    )
    assert run.returncode == 0, run.stderr
    assert "dp_type=zero3,recompute=full" in run.stdout  # the DeepSpeed-style baseline's plan, unbroken
    assert max(len(line) for line in run.stdout.splitlines()) <= PIPE_WIDTH


def test_an_error_longer_than_the_console_stays_on_one_line():
    """A message naming a long path must not be folded: a user copies the path, and a test matching the
    message must not depend on how long pytest's temporary folder happens to be."""
    import pytest
    from rich.console import Console

    from hwmodel.cli_common import run_app
    from hwmodel.errors import UserError

    buffer = io.StringIO()
    console = Console(file=buffer, width=40)
    path = "/tmp/" + "x" * 80 + "/mine.csv"

    def app() -> None:
        raise UserError(f"--csv {path} already exists; choose another name")

    with pytest.raises(SystemExit) as stop:
        run_app(app, console)
    assert stop.value.code == 2
    assert buffer.getvalue().count("\n") == 1
    assert path in buffer.getvalue()
