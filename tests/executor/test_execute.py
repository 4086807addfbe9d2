"""`execute` in one process: refusals before anything starts, the measured Report and its JSON, the
comparison with the prediction, the profiler trace, checkpoint/resume of a one-device plan, and the
help. Multi-process plans (gloo) are in parallel/test_parallel_plans.py, faults in test_execute_faults.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import executor.launch as launch
import specs
from executor.job import Job
from simulator.plan import LayerStrategy, Plan, parse_shorthand
from tests.executor.helpers import ONE, TINY, mentions, refused
from workloads import WorkloadConfig


# ---- refusals: before any process starts -------------------------------------------------------------
@pytest.mark.parametrize(
    "plan, fragments",
    [
        ("tp=3,dtype=fp32", ["tp=3 does not divide num_heads=4"]),
        ("dp=4,dtype=fp32", ["but cluster 'cpu-local' has 2 devices"]),  # the world size is the cluster's
        ("cp=2,batch_split=1+1,dp=2,dtype=fp32", ["cp=2 with batch_split cannot be executed", "supported:"]),
        ("cp=2,dp_type=zero1,dtype=fp32", ["cp=2 with dp_type=zero1 cannot be executed", "use ddp, zero2 or zero3"]),
        ("dtype=fp16", ["dtype=fp16 cannot be executed", "loss scaling"]),
        ("attention=flash_triton,dtype=fp32", ["attention=flash_triton cannot be executed", "use attention=flash"]),
    ],
)
def test_refuses_plans_it_cannot_run(execute, no_launch, tiny, plan, fragments):
    refused(execute("--workload", tiny, "--cluster", "cpu-local", "--plan", plan), *fragments)


def test_refuses_context_parallel_when_the_sequence_does_not_cut_into_2cp_chunks(execute, no_launch, tiny):
    result = execute("--workload", tiny, "--cluster", "cpu-local", "--seq-len", "34", "--plan", "cp=2,dtype=fp32")
    refused(result, "cp=2 with seq_len=34 cannot be executed", "2*cp = 4 equal chunks")


def test_refuses_zero1_with_tensor_parallel_naming_the_torch_limitation(execute, no_launch, tiny):
    result = execute(
        "--workload",
        tiny,
        "--cluster",
        "cpu-local",
        "--devices-per-node",
        "4",
        "--plan",
        "tp=2,dp_type=zero1,dtype=fp32",
    )
    refused(result, "dp_type=zero1 with tp > 1", "ZeroRedundancyOptimizer", "DTensor", "zero2")


def test_refuses_interleaved_on_one_pipeline_rank(execute, no_launch, tiny):
    result = execute("--workload", tiny, *ONE, "--plan", "schedule=interleaved,virtual_stages=2,dtype=fp32")
    refused(result, "interleaved with pp=1")


def test_refuses_1f1b_with_fewer_micro_batches_than_stages(execute, no_launch, tiny):
    refused(
        execute("--workload", tiny, "--cluster", "cpu-local", "--plan", "pp=2,micro_batch=1,global_batch=1,dtype=fp32"),
        "at least 2 micro-batches",
        "schedule=gpipe",
    )


def test_refuses_families_it_cannot_build(execute, no_launch):
    refused(
        execute("--workload", "bert-large", *ONE, "--plan", "dtype=fp32"),
        "family 'bert' cannot be executed yet",
        "supported: gpt, llama",
    )


def test_refuses_a_plan_predicted_not_to_fit_unless_forced(execute, no_launch):
    result = execute("--workload", "gpt3-13b", "--cluster", "cpu-local", "--plan", "dp_type=zero3,dtype=fp32")
    refused(result, "predicted not to fit in device memory", "--force")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_refuses_a_gpu_cluster_without_cuda(execute, no_launch, tiny):
    result = execute("--workload", tiny, "--cluster", "dgx-a100-80g", "--devices-per-node", "1", "--plan", "dtype=fp32")
    refused(result, "has GPUs but this machine has no CUDA device", "cpu-local")


def test_refuses_a_torchrun_world_of_another_size(execute, no_launch, tiny, monkeypatch):
    for key, value in dict(RANK="0", WORLD_SIZE="3", MASTER_ADDR="127.0.0.1", MASTER_PORT="1", LOCAL_RANK="0").items():
        monkeypatch.setenv(key, value)
    refused(
        execute("--workload", tiny, "--cluster", "cpu-local", "--plan", "dtype=fp32"),
        "torchrun started 3 processes but the plan runs on 2 devices",
    )


def test_refuses_bad_options(execute, no_launch, tiny, tmp_path):
    base = ("--workload", tiny, *ONE, "--plan", "dtype=fp32")
    existing = tmp_path / "trace.json"
    existing.write_text("{}")
    refused(execute(*base, "--trace", existing), "already exists", "--force")
    refused(execute(*base, "--resume"), "--resume needs --checkpoint-dir")
    refused(execute(*base, "--checkpoint-every", "2"), "--checkpoint-every needs --checkpoint-dir")
    refused(execute(*base, "--checkpoint-dir", tmp_path / "none", "--resume"), "holds no complete checkpoint")
    refused(execute("--workload", tiny, *ONE), "missing --plan")
    assert execute(*base, "--steps", "0").code == 2  # typer's own range check


# ---- one process -------------------------------------------------------------------------------------
def test_measured_report_json(execute, tiny):
    result = execute(
        "--workload",
        tiny,
        *ONE,
        "--plan",
        "micro_batch=2,global_batch=8,dtype=fp32",
        "--steps",
        "3",
        "--warmup",
        "1",
        "--json",
    )
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert data["engine"] == "measured" and data["workload"] == "tiny-gpt" and data["num_devices"] == 1
    assert data["global_batch"] == 8 and data["num_micro_batches"] == 4 and data["seq_len"] == 32
    assert len(data["losses"]) == 4 and all(4.0 < v < 7.0 for v in data["losses"])
    execution = data["execution"]
    assert execution["first_step"] == 0 and execution["timed_steps"] == [1, 2, 3]
    assert data["iteration_time_s"] == pytest.approx(sorted(execution["step_times_s"][1:])[1])
    assert data["tokens_per_s"] == pytest.approx(8 * 32 / data["iteration_time_s"])
    assert 0 < data["mfu"] == data["hfu"] < 1
    memory = data["memory_bytes"]
    weights = memory["weights"]  # fp32: 4 bytes per parameter
    assert memory["gradients"] == weights and memory["optimizer"] == pytest.approx(
        2 * weights, rel=0.01
    )  # Adam: 2 moments
    assert memory["activations"] > 0 and memory["buffers"] == 0
    assert data["peak_memory_bytes"] == pytest.approx(sum(memory.values()))
    assert data["time_breakdown_s"]["compute"] == data["iteration_time_s"]


def test_compare_json_and_table(execute, tiny):
    plan = "micro_batch=2,global_batch=8,dtype=fp32,recompute=selective"
    args = ("--workload", tiny, *ONE, "--plan", plan, "--steps", "2", "--warmup", "1")
    data = json.loads(execute(*args, "--compare", "--json").out)
    assert set(data) == {"predicted", "measured", "losses", "execution"}
    assert data["predicted"]["engine"] == "des" and data["measured"]["engine"] == "measured"
    # Both count the same work, so model FLOPs agree exactly; selective recompute adds hardware FLOPs.
    assert data["predicted"]["model_flops_per_iteration"] == data["measured"]["model_flops_per_iteration"]
    assert data["measured"]["hfu"] > data["measured"]["mfu"]
    table = execute(*args, "--compare")
    assert table.code == 0, table.err
    for fragment in ("predicted vs measured", "iteration time", "tokens/s", "MFU", "activations", "error"):
        assert fragment in table.out
    assert "measured" in table.out and "loss" in table.out
    # A catalog CPU spec is a generic estimate: the table says how to predict this machine instead.
    assert "executecalibrate--out" in re.sub(r"\s+", "", table.out)  # wherever the console wrapped


def test_a_spec_file_gets_no_calibration_hint(execute, tiny, tmp_path):
    """A cluster given as a file (what `execute calibrate` writes) is taken as the user's own description."""
    spec = tmp_path / "mine.yaml"
    spec.write_text((Path(specs.__file__).parent / "clusters" / "cpu-local.yaml").read_text())
    table = execute(
        "--workload",
        tiny,
        "--cluster",
        spec,
        "--devices-per-node",
        "1",
        "--plan",
        "micro_batch=4,global_batch=8,dtype=fp32",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--compare",
    )
    assert table.code == 0, table.err
    assert "predicted vs measured" in table.out and "executecalibrate" not in re.sub(r"\s+", "", table.out)


def test_trace_is_a_chrome_trace(execute, tiny, tmp_path):
    trace = tmp_path / "rank0.json"
    result = execute(
        "--workload",
        tiny,
        *ONE,
        "--plan",
        "micro_batch=4,global_batch=8,dtype=fp32",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--trace",
        trace,
    )
    assert result.code == 0, result.err
    events = json.loads(trace.read_text())["traceEvents"]
    assert any("aten::" in str(e.get("name", "")) for e in events)


def test_recompute_gives_the_same_losses_in_one_process(tiny, monkeypatch):
    """Full, selective and per-layer recompute (1 process) against the plain run, in-process."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = WorkloadConfig(**TINY)
    base = "micro_batch=2,global_batch=8,dtype=fp32"
    plans = [parse_shorthand(p) for p in (base, f"{base},recompute=full", f"{base},recompute=selective")]
    plans.append(
        Plan(micro_batch=2, global_batch=8, dtype="fp32", layers=(LayerStrategy(layers=(1, 2), recompute="full"),))
    )
    jobs = [Job(cfg, "cpu-local", None, 1, p, steps=5, warmup=0) for p in plans]
    plain, full, selective, per_layer = launch.run_jobs(jobs)
    for other in (full, selective, per_layer):
        assert other.losses == pytest.approx(plain.losses, rel=1e-6)
    # Recompute keeps less: full keeps the block inputs, selective drops the attention core's tensors;
    # recomputing 2 of 4 blocks keeps something in between.
    acts = [r.memory[0]["activations"] for r in (plain, full, selective, per_layer)]
    assert acts[1] < acts[2] < acts[0] and acts[1] < acts[3] < acts[0]


def test_checkpoint_and_resume_in_one_process(execute, tiny, tmp_path, monkeypatch):
    args = (
        "--workload",
        tiny,
        *ONE,
        "--plan",
        "micro_batch=2,global_batch=8,dtype=fp32",
        "--steps",
        "4",
        "--warmup",
        "0",
        "--json",
    )
    whole = json.loads(execute(*args).out)["losses"]
    folder = tmp_path / "ckpt"
    monkeypatch.setenv("HETPLAN_FAIL_AT_STEP", "3")
    monkeypatch.setenv("HETPLAN_FAIL_MODE", "raise")
    failed = execute(*args, "--checkpoint-dir", folder, "--checkpoint-every", "2")
    assert failed.code == 1 and "rank 0 of 1 failed" in failed.err and "injected failure at step 3" in failed.err
    monkeypatch.delenv("HETPLAN_FAIL_AT_STEP")
    assert sorted(p.name for p in folder.iterdir()) == [".hetplan.lock", "step-000002"]  # the run's lock file
    # The folder has checkpoints: a new run must not write over them by accident.
    refused(execute(*args, "--checkpoint-dir", folder), "already holds checkpoints", "--resume")
    resumed = json.loads(execute(*args, "--checkpoint-dir", folder, "--resume").out)
    assert resumed["execution"]["first_step"] == 2
    assert resumed["losses"] == pytest.approx(whole[2:], rel=1e-6)
    # Another plan cannot resume this job's checkpoint.
    other = execute(
        "--workload",
        tiny,
        *ONE,
        "--plan",
        "micro_batch=4,global_batch=8,dtype=fp32",
        "--checkpoint-dir",
        folder,
        "--resume",
    )
    refused(other, "was written by another job", "plan differs")


# ---- help ----------------------------------------------------------------------------------------------
def test_help_teaches_the_options():
    proc = subprocess.run([sys.executable, "-m", "executor.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert mentions(text, "Run a training plan on real devices")
    for option in (
        "--workload",
        "--cluster",
        "--plan",
        "--nodes",
        "--devices-per-node",
        "--seq-len",
        "--steps",
        "--warmup",
        "--compare",
        "--json",
        "--trace",
        "--checkpoint-dir",
        "--checkpoint-every",
        "--resume",
        "--force",
        "--seed",
    ):
        assert option in text, option
    for fragment in ("saved-tensor hooks", "max_memory_allocated", "HETPLAN_FAIL_AT_STEP", "calibrate", "torchrun"):
        assert mentions(text, fragment), fragment
    assert "Traceback" not in proc.stderr
