"""Issue 20, executor reliability, through the real `execute` command: checksummed checkpoints with a
manifest written last, resume that verifies first and falls back to the newest step that verifies, a
lock on the checkpoint folder, non-finite stops (exit 4) or skips, and `--trace` checked before training.

Each test here failed on main before the change: a corrupted checkpoint loaded without a word, a torn
hetplan.json gave a JSONDecodeError traceback, two runs on one folder collided, a NaN loss exited 0 and
`--trace` to an unwritable path exited 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from executor import checkpoint
from tests.executor.helpers import TINY

PLAN = "micro_batch=2,global_batch=4,dtype=fp32"


def execute(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "executor.cli", *map(str, args)], capture_output=True, text=True, env=full_env
    )


@pytest.fixture(scope="module")
def args(tmp_path_factory) -> list[str]:
    path = tmp_path_factory.mktemp("wl") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return ["--workload", path, "--cluster", "cpu-local", "--devices-per-node", "1", "--plan", PLAN, "--warmup", "0"]


def losses(proc: subprocess.CompletedProcess) -> list[float]:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["losses"]


@pytest.fixture(scope="module")
def saved(args, tmp_path_factory) -> tuple[Path, list[float]]:
    """A 4-step run with a checkpoint after steps 2 and 4, and its loss curve."""
    folder = tmp_path_factory.mktemp("ck") / "ck"
    proc = execute(*args, "--steps", 4, "--checkpoint-dir", folder, "--checkpoint-every", 2, "--json")
    return folder, losses(proc)


def copy_of(folder: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "ck"
    shutil.copytree(folder, target, ignore=shutil.ignore_patterns(checkpoint.LOCK))
    return target


def test_every_file_of_a_step_is_in_its_manifest_and_verifies(saved):
    folder, _ = saved
    for _, path in checkpoint.step_folders(folder):
        manifest = json.loads((path / checkpoint.MANIFEST).read_text())
        on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {checkpoint.MANIFEST}
        assert set(manifest["files"]) == on_disk
        assert checkpoint.verify(path) is None


def flip_a_bit(path: Path) -> Path:
    shard = sorted(path.glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    return shard


def test_a_flipped_bit_in_the_newest_step_falls_back_to_the_previous_one(args, saved, tmp_path):
    folder, curve = saved
    ck = copy_of(folder, tmp_path)
    shard = flip_a_bit(checkpoint.step_dir(ck, 4))
    bad = checkpoint.verify(checkpoint.step_dir(ck, 4))
    assert bad is not None and shard.name in bad and "step-000004" in bad
    proc = execute(*args, "--steps", 4, "--checkpoint-dir", ck, "--resume", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "step-000004" in proc.stderr and shard.name in proc.stderr and "resuming from step-000002" in proc.stderr
    # Resumed from step 2: iterations 3 and 4 again, bit for bit the uninterrupted curve.
    assert json.loads(proc.stdout)["losses"] == curve[2:]


def test_no_step_that_verifies_is_exit_2_naming_the_file(args, saved, tmp_path):
    folder, _ = saved
    ck = copy_of(folder, tmp_path)
    for step in (2, 4):
        meta = checkpoint.step_dir(ck, step) / ".metadata"
        meta.write_bytes(meta.read_bytes()[:10])  # truncated
    proc = execute(*args, "--steps", 6, "--checkpoint-dir", ck, "--resume")
    assert proc.returncode == 2, proc.stderr
    assert ".metadata" in proc.stderr and "Traceback" not in proc.stderr
    verify = execute("checkpoint", "verify", ck)
    assert verify.returncode == 2 and verify.stdout.count(".metadata") == 2


def test_a_truncated_manifest_is_not_a_complete_step(saved, tmp_path):
    folder, _ = saved
    ck = copy_of(folder, tmp_path)
    manifest = checkpoint.step_dir(ck, 4) / checkpoint.MANIFEST
    manifest.write_text(manifest.read_text()[:40])
    found, problems = checkpoint.latest_verified(ck)
    assert found is not None and found[0] == 2
    assert len(problems) == 1 and checkpoint.MANIFEST in problems[0]


def test_a_second_run_on_a_locked_folder_is_exit_2_naming_the_holder(args, tmp_path):
    folder = tmp_path / "ck"
    checkpoint.lock(folder)  # this test process holds it, as a running execute would
    proc = execute(*args, "--steps", 1, "--checkpoint-dir", folder)
    assert proc.returncode == 2, proc.stderr
    assert f"pid {os.getpid()}" in proc.stderr and "Traceback" not in proc.stderr


def test_keep_last_keeps_the_newest_steps(args, tmp_path):
    folder = tmp_path / "ck"
    proc = execute(*args, "--steps", 4, "--checkpoint-dir", folder, "--checkpoint-every", 1, "--keep-last", 2)
    assert proc.returncode == 0, proc.stderr
    assert [s for s, _ in checkpoint.step_folders(folder)] == [3, 4]


def test_a_nan_loss_stops_with_exit_4_naming_step_and_rank(args):
    proc = execute(*args, "--steps", 3, env={"HETPLAN_FAIL_AT_STEP": "1", "HETPLAN_FAIL_MODE": "nan"})
    assert proc.returncode == 4, proc.stderr
    assert "step 1" in proc.stderr and "rank 0" in proc.stderr and "non-finite" in proc.stderr


def test_skip_nonfinite_skips_and_counts(args):
    proc = execute(
        *args, "--steps", 3, "--skip-nonfinite", "--json", env={"HETPLAN_FAIL_AT_STEP": "1", "HETPLAN_FAIL_MODE": "nan"}
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    # The weight stays NaN, so every iteration from the injection on is skipped, and none before it.
    assert out["execution"]["skipped_nonfinite_steps"] == [1, 2]
    assert any("skipped 2 iteration" in w for w in out["warnings"])


def test_trace_to_a_path_that_cannot_be_written_is_exit_2_before_training(args):
    # /proc refuses new files even to root, so the test holds whoever runs it.
    proc = execute(*args, "--steps", 1, "--trace", "/proc/hetplan-trace.json")
    assert proc.returncode == 2, proc.stderr
    assert "--trace" in proc.stderr and "cannot create" in proc.stderr and "Traceback" not in proc.stderr


def test_write_output_never_replaces_a_file_created_after_its_check(tmp_path, monkeypatch):
    from hwmodel import cli_common
    from hwmodel.errors import UserError

    target = tmp_path / "out.json"
    real_check = cli_common.check_output

    def check_then_race(*a, **k):
        real_check(*a, **k)
        target.write_text("the other writer")  # lands between the check and the write

    monkeypatch.setattr(cli_common, "check_output", check_then_race)
    with pytest.raises(UserError, match="already exists"):
        cli_common.write_output(target, "mine", "--out", cli_common.JSON, force=False)
    assert target.read_text() == "the other writer"
    cli_common.write_output(target, "mine", "--out", cli_common.JSON, force=True)
    assert target.read_text() == "mine" and [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_a_torn_fingerprint_falls_back_instead_of_a_json_traceback(args, saved, tmp_path):
    folder, curve = saved
    ck = copy_of(folder, tmp_path)
    fingerprint = checkpoint.step_dir(ck, 4) / checkpoint.FINGERPRINT
    fingerprint.write_text(fingerprint.read_text()[:25])  # cut short, as a crash mid-write left it on main
    proc = execute(*args, "--steps", 4, "--checkpoint-dir", ck, "--resume", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and checkpoint.FINGERPRINT in proc.stderr
    assert json.loads(proc.stdout)["losses"] == curve[2:]


@pytest.mark.parametrize("phase", ["data", "fingerprint"])
def test_a_kill_inside_a_save_leaves_a_step_that_resume_skips(args, saved, tmp_path, phase):
    _, curve = saved
    folder = tmp_path / "ck"
    killed = execute(
        *args, "--steps", 4, "--checkpoint-dir", folder, "--checkpoint-every", 2,
        env={checkpoint.FAIL_IN_SAVE_ENV: f"4:{phase}"},
    )  # fmt: skip
    assert killed.returncode == -9
    assert checkpoint.verify(checkpoint.step_dir(folder, 4)) is not None  # no manifest: not complete
    proc = execute(*args, "--steps", 4, "--checkpoint-dir", folder, "--resume", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "resuming from step-000002" in proc.stderr
    assert json.loads(proc.stdout)["losses"] == curve[2:]
