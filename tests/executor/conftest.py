"""Fixtures of the executor's tests: the tiny workload as a file, `execute` run in-process, and a guard that
no rank starts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from rich.console import Console

import executor.cli as cli
import executor.launch as launch
from tests.executor.helpers import TINY
from tests.helpers import CliResult


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("workload") / "tiny-gpt.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


@pytest.fixture
def execute(monkeypatch, capsys):
    """Run `execute ARGS...` through the console entry point; a traceback escaping main() fails the test."""
    monkeypatch.setattr(cli, "out", Console(width=100))
    monkeypatch.setattr(cli, "err", Console(stderr=True, width=100))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the machine's cores are shared with other test workers

    def invoke(*args) -> CliResult:
        argv = [str(a) for a in args]
        monkeypatch.setattr(sys, "argv", ["execute", *argv])
        try:
            cli.main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except Exception as exc:
            pytest.fail(f"`execute {' '.join(argv)}` ended in a traceback: {type(exc).__name__}: {exc}")
        else:
            code = 0
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return invoke


@pytest.fixture
def no_launch(monkeypatch):
    """Fail the test if any rank would be started."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a refused plan must not start any process")

    monkeypatch.setattr(launch, "run", forbidden)
    monkeypatch.setattr(launch, "run_jobs", forbidden)
