"""Faults, through the real `execute` command: a rank killed mid-run ends the run within 60 s with a
message naming it, no rank is left behind, and resuming from the last checkpoint reproduces the loss
curve of an uninterrupted run (within 1e-6 relative)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

TINY = dict(
    name="tiny-gpt", family="gpt", num_layers=4, hidden_size=64, num_heads=4, vocab_size=256, seq_len=32, dropout=False
)
PLAN = "dp=2,dp_type=zero1,micro_batch=2,global_batch=8,dtype=fp32"  # optimizer state sharded per rank


def execute(*args, env: dict | None = None, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float, str]:
    """Run the console command; returns the process, its wall time and the tag its ranks inherit."""
    tag = uuid.uuid4().hex
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HETPLAN_TEST_TAG": tag, **(env or {})}
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "executor.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )
    return proc, time.monotonic() - started, tag


def processes_with(tag: str) -> list[int]:
    """PIDs of live processes whose environment carries `tag` (ranks left behind)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if f"HETPLAN_TEST_TAG={tag}".encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.fixture(scope="module")
def args(tmp_path_factory):
    workload = tmp_path_factory.mktemp("workload") / "tiny-gpt.yaml"
    workload.write_text(yaml.safe_dump(TINY))
    return ("--workload", workload, "--cluster", "cpu-local", "--plan", PLAN, "--steps", "6", "--warmup", "0", "--json")


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc to look for leftover ranks")
def test_killed_rank_stops_the_run_and_resume_reproduces_the_curve(args, tmp_path):
    whole, _, _ = execute(*args)
    assert whole.returncode == 0, whole.stderr
    expected = json.loads(whole.stdout)["losses"]
    assert len(expected) == 6

    folder = tmp_path / "ckpt"
    killed, seconds, tag = execute(
        *args,
        "--checkpoint-dir",
        folder,
        "--checkpoint-every",
        "2",
        env={"HETPLAN_FAIL_AT_STEP": "5", "HETPLAN_FAIL_RANK": "1"},
    )
    assert killed.returncode == 1, killed.stderr
    assert "rank 1 of 2 was killed by SIGKILL" in killed.stderr and "Traceback" not in killed.stderr
    assert seconds < 60
    assert processes_with(tag) == [], "ranks left running after the failure"
    assert sorted(p.name for p in folder.iterdir()) == ["step-000002", "step-000004"]

    resumed, _, _ = execute(*args, "--checkpoint-dir", folder, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    data = json.loads(resumed.stdout)
    assert data["execution"]["first_step"] == 4
    assert data["losses"] == pytest.approx(expected[4:], rel=1e-6)


def test_an_exception_in_one_rank_is_named_as_the_cause(args):
    # The other rank then fails in a collective; the report names the rank that raised, not the echo.
    proc, seconds, tag = execute(
        *args, env={"HETPLAN_FAIL_AT_STEP": "1", "HETPLAN_FAIL_RANK": "1", "HETPLAN_FAIL_MODE": "raise"}
    )
    assert proc.returncode == 1
    assert "rank 1 of 2 failed: RuntimeError: injected failure at step 1" in " ".join(proc.stderr.split())
    assert seconds < 60 and processes_with(tag) == []
