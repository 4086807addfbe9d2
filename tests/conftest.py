"""Shared fixtures: catalog specs loaded once per session (they are immutable), and `simulate`, which
runs the console entry point in-process."""

from __future__ import annotations

import sys

import pytest
from rich.console import Console

import simulator.cli as cli
from hwmodel import load_cluster
from tests.helpers import CliResult
from workloads import load_workload


@pytest.fixture(scope="session")
def dgx_a100():
    return load_cluster("dgx-a100-80g")


@pytest.fixture(scope="session")
def mixed():
    """2 nodes of 8 A100 (ranks 0-15), then 2 nodes of 8 V100 (ranks 16-31)."""
    return load_cluster("mixed-a100-v100")


@pytest.fixture(scope="session")
def llama7b():
    return load_workload("llama2-7b")


@pytest.fixture(scope="session")
def gpt_medium():
    return load_workload("gpt3-350m")


@pytest.fixture
def simulate(monkeypatch, capsys):
    """Run `simulate ARGS...` through the console entry point (which turns user errors into exit status
    2); returns exit code, stdout and stderr. A traceback escaping main() fails the test."""
    # A standard 80-column terminal (also what a pipe gets), whatever terminal runs the tests.
    monkeypatch.setattr(cli, "out", Console(width=80))
    monkeypatch.setattr(cli, "err", Console(stderr=True, width=80))
    monkeypatch.setenv("COLUMNS", "80")  # the consoles the planners' commands make for themselves

    def invoke(*args) -> CliResult:
        argv = [str(a) for a in args]
        monkeypatch.setattr(sys, "argv", ["simulate", *argv])
        try:
            cli.main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except Exception as exc:  # what escapes main() is a traceback on the user's terminal
            pytest.fail(f"`simulate {' '.join(argv)}` ended in a traceback: {type(exc).__name__}: {exc}")
        else:
            code = 0
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return invoke
