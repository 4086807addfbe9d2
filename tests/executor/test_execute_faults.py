"""Faults, through the real `execute` command: a rank killed mid-run ends the run with a message naming
it, no rank is left behind, and resuming from the last checkpoint reproduces the loss curve of an
uninterrupted run (within 1e-6 relative).

How fast a failure is reported is measured on the executor's own clock, not on the test's wall time
(which includes starting Python and torch, and stretches on a busy machine): the rank that injects the
fault logs the moment it dies, the launcher's report says when it had stopped the run, and the two
must lie within `REPORT_WITHIN_S`."""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

TINY = dict(
    name="tiny-gpt", family="gpt", num_layers=4, hidden_size=64, num_heads=4, vocab_size=256, seq_len=32, dropout=False
)
PLAN = "dp=2,dp_type=zero1,micro_batch=2,global_batch=8,dtype=fp32"  # optimizer state sharded per rank
# The launcher stops the ranks about FAILURE_GRACE_S + STOP_GRACE_S (6 s) after it sees a failure, and
# polls for one every 0.2 s; 30 s leaves room for a loaded machine without letting a hang pass.
REPORT_WITHIN_S = 30.0
STAMP = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) UTC"


def execute(*args, env: dict | None = None, timeout: float = 300) -> tuple[subprocess.CompletedProcess, str]:
    """Run the console command; returns the process and the tag its ranks inherit. (`timeout` only keeps
    a hung run from hanging the suite: it says nothing about how fast the executor is.)"""
    tag = uuid.uuid4().hex
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HETPLAN_TEST_TAG": tag, **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "executor.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )
    return proc, tag


def _time(stamp: str) -> datetime.datetime:
    return datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=datetime.timezone.utc)


def report_delay(stderr: str, rank: int) -> float:
    """Seconds from the moment `rank` logged its injected fault to the moment the launcher reported
    the run stopped, both as the executor logged them."""
    text = " ".join(stderr.split())  # the error message may be wrapped to the terminal's width
    died = re.search(rf"rank {rank}: injected failure at step \d+ .*? at {STAMP}", text)
    stopped = re.search(rf"rank {rank} of \d+ .*?; the run was stopped at {STAMP}", text)
    assert died and stopped, stderr
    return (_time(stopped.group(1)) - _time(died.group(1))).total_seconds()


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
    whole, _ = execute(*args)
    assert whole.returncode == 0, whole.stderr
    expected = json.loads(whole.stdout)["losses"]
    assert len(expected) == 6

    folder = tmp_path / "ckpt"
    killed, tag = execute(
        *args,
        "--checkpoint-dir",
        folder,
        "--checkpoint-every",
        "2",
        env={"HETPLAN_FAIL_AT_STEP": "5", "HETPLAN_FAIL_RANK": "1"},
    )
    assert killed.returncode == 1, killed.stderr
    assert "rank 1 of 2 was killed by SIGKILL" in killed.stderr and "Traceback" not in killed.stderr
    assert 0 <= report_delay(killed.stderr, 1) < REPORT_WITHIN_S
    assert processes_with(tag) == [], "ranks left running after the failure"
    # The step folders and the lock file of the checkpoint folder (issue 20), nothing half-written.
    assert sorted(p.name for p in folder.iterdir()) == [".hetplan.lock", "step-000002", "step-000004"]

    resumed, _ = execute(*args, "--checkpoint-dir", folder, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    data = json.loads(resumed.stdout)
    assert data["execution"]["first_step"] == 4
    assert data["losses"] == pytest.approx(expected[4:], rel=1e-6)


def test_an_exception_in_one_rank_is_named_as_the_cause(args):
    # The other rank then fails in a collective; the report names the rank that raised, not the echo.
    proc, tag = execute(
        *args, env={"HETPLAN_FAIL_AT_STEP": "1", "HETPLAN_FAIL_RANK": "1", "HETPLAN_FAIL_MODE": "raise"}
    )
    assert proc.returncode == 1
    assert "rank 1 of 2 failed: RuntimeError: injected failure at step 1" in " ".join(proc.stderr.split())
    assert 0 <= report_delay(proc.stderr, 1) < REPORT_WITHIN_S
    assert processes_with(tag) == []
