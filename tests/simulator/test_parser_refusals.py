"""Regression tests for the parser defects of issue 20: each input below was a traceback, a hang or silently
accepted nonsense on main; each is now exit 2 with a message naming the file, the field and what is accepted.

The CLI runs in-process (`simulate` fixture); the bad files are edited copies of catalog files or small
hand-written workloads, so what is refused is exactly the one edit.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import specs
from tests.helpers import CliResult

SPECS = Path(specs.__file__).parent
DEVICE_YAML = SPECS / "devices" / "a100-80g.yaml"
CLUSTER_YAML = SPECS / "clusters" / "dgx-a100-80g.yaml"

SMALL_GPT = {"family": "gpt", "num_layers": 2, "hidden_size": 64, "num_heads": 4, "vocab_size": 128, "seq_len": 32}
MIXTRAL = {
    "model_type": "mixtral",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 64,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
}


def _compact(text: str) -> str:
    return re.sub(r"\s+", "", text)


def refused(result: CliResult, *fragments: str) -> None:
    """Exit 2, no traceback, and every fragment in the message (ignoring where the console wrapped it)."""
    assert result.code == 2, f"exit status {result.code}, expected 2; stderr:\n{result.err}"
    assert "Traceback" not in result.err
    assert "error:" in result.err, result.err
    for fragment in fragments:
        assert _compact(fragment) in _compact(result.err), f"{fragment!r} missing from:\n{result.err}"


def edited(src: Path, dst: Path, old: str, new: str) -> Path:
    text = src.read_text(encoding="utf-8")
    assert text.count(old) == 1, f"{old!r} should occur exactly once in {src}"
    dst.write_text(text.replace(old, new), encoding="utf-8")
    return dst


def run_workload(simulate, workload: Path | str, plan: str = "tp=1") -> CliResult:
    return simulate("run", "--workload", workload, "--cluster", "dgx-a100-80g", "--plan", plan, "--engine", "analytic")


def run_cluster(simulate, cluster: Path) -> CliResult:
    return simulate("run", "--workload", "gpt-tiny", "--cluster", cluster, "--plan", "tp=1", "--engine", "analytic")


def with_device(tmp_path: Path, old: str, new: str) -> Path:
    device = edited(DEVICE_YAML, tmp_path / "device.yaml", old, new)
    return edited(CLUSTER_YAML, tmp_path / "cluster.yaml", "device: a100-80g", f"device: {device}")


def workload_file(tmp_path: Path, text: str, name: str = "workload.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---- tracebacks on main ------------------------------------------------------------------------
def test_yaml_nested_1000_deep_is_refused_not_a_recursion_error(simulate, tmp_path):
    path = workload_file(tmp_path, "family: " + "[" * 1000 + "]" * 1000 + "\n")
    refused(run_workload(simulate, path), str(path), "nested more than 64 levels deep")


def test_json_nested_100000_deep_is_refused(simulate, tmp_path):
    path = workload_file(tmp_path, '{"family": ' + "[" * 100_000 + "]" * 100_000 + "}", "workload.json")
    refused(run_workload(simulate, path), str(path), "nested more than 64 levels deep")


def test_family_given_a_list_is_refused_not_a_type_error(simulate, tmp_path):
    path = workload_file(tmp_path, json.dumps({**SMALL_GPT, "family": []}))
    refused(run_workload(simulate, path), str(path), "family:", "'gpt'", "'llama'")


def test_hf_experts_as_text_is_refused_not_a_type_error(simulate, tmp_path):
    path = workload_file(tmp_path, json.dumps({**MIXTRAL, "num_local_experts": "8"}), "config.json")
    refused(run_workload(simulate, path), str(path), "num_local_experts:", "expected an integer", "'8'")


def test_a_trillion_layers_is_refused_with_the_layer_list_size_not_a_memory_error(simulate, tmp_path):
    path = workload_file(tmp_path, json.dumps({**SMALL_GPT, "num_layers": 10**12}))
    refused(run_workload(simulate, path), str(path), "num_layers:", "TiB", "accepted: 1 to 10000")


# ---- nonsense accepted on main -----------------------------------------------------------------
def test_hf_tie_word_embeddings_as_text_is_refused_not_read_as_true(simulate, tmp_path):
    config = {**MIXTRAL, "model_type": "llama", "tie_word_embeddings": "false"}
    config.pop("num_local_experts")
    path = workload_file(tmp_path, json.dumps(config), "config.json")
    refused(run_workload(simulate, path), "tie_word_embeddings:", "expected true or false")


def test_hf_negative_experts_are_refused_not_a_dense_model(simulate, tmp_path):
    path = workload_file(tmp_path, json.dumps({**MIXTRAL, "num_local_experts": -4}), "config.json")
    refused(run_workload(simulate, path), "num_local_experts:", "from 1 to", "-4")


def test_hf_zero_positions_are_refused_not_replaced_by_4096(simulate, tmp_path):
    path = workload_file(tmp_path, json.dumps({**MIXTRAL, "max_position_embeddings": 0}), "config.json")
    refused(run_workload(simulate, path), "max_position_embeddings:", "from 1 to", "got 0")


def test_reserved_memory_beyond_capacity_is_refused(simulate, tmp_path):
    cluster = with_device(tmp_path, "reserved: 1 GiB", "reserved: 100 GiB")
    refused(run_cluster(simulate, cluster), "memory", "reserved", "must be less than capacity")


def test_plan_pp_true_is_refused_not_read_as_1(simulate, tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text("pp: true\n", encoding="utf-8")
    refused(run_workload(simulate, "gpt-tiny", str(plan)), str(plan), "pp:", "expected an integer")


def test_plan_shorthand_pp_true_is_refused(simulate):
    refused(run_workload(simulate, "gpt-tiny", "pp=true"), "--plan", "pp:", "expected an integer")


@pytest.mark.parametrize("where", ["workload", "device"])
def test_a_nul_byte_in_a_name_is_refused(simulate, tmp_path, where):
    if where == "workload":
        result = run_workload(simulate, workload_file(tmp_path, json.dumps({**SMALL_GPT, "name": "gpt\u0000x"})))
    else:
        result = run_cluster(simulate, with_device(tmp_path, "name: a100-80g", 'name: "a100\\0evil"'))
    refused(result, "name:", "printable")


# ---- inputs that hung on main because they were accepted ----------------------------------------
def test_global_batch_1e15_is_refused(simulate):
    refused(run_workload(simulate, "gpt-tiny", "global_batch=1000000000000000"), "global_batch:", "16777216")


def test_a_million_layers_is_refused(simulate, tmp_path):
    path = workload_file(tmp_path, json.dumps({**SMALL_GPT, "num_layers": 10**6}))
    refused(run_workload(simulate, path), "num_layers:", "accepted: 1 to 10000")


def test_kernel_overhead_of_1e9_s_is_refused(simulate, tmp_path):
    cluster = with_device(tmp_path, "kernel_overhead: 5 us", "kernel_overhead: 1e9 s")
    refused(run_cluster(simulate, cluster), "kernel_overhead:", "beyond what a real part has", "10 s")


def test_bandwidth_of_1e_minus_30_gb_s_is_refused(simulate, tmp_path):
    cluster = edited(CLUSTER_YAML, tmp_path / "cluster.yaml", "bandwidth: 300 GB/s", "bandwidth: 1e-30 GB/s")
    refused(run_cluster(simulate, cluster), "bandwidth:", "below what a real part has", "1 KB/s")


# ---- what is still accepted ---------------------------------------------------------------------
def test_native_yaml_numbers_and_flags_still_work(simulate, tmp_path):
    text = "\n".join(f"{k}: {v}" for k, v in SMALL_GPT.items()) + "\ntied_embeddings: false\nbias: true\n"
    plan = tmp_path / "plan.yaml"
    plan.write_text("tp: 1\nsequence_parallel: false\noffload: 0\nmicro_batch: 2\n", encoding="utf-8")
    assert run_workload(simulate, workload_file(tmp_path, text), str(plan)).code == 0


def test_a_swept_bandwidth_of_1e_minus_30_gb_s_is_refused(simulate):
    # --sweep edits a loaded cluster without re-reading a file; the range a spec file is held to still applies.
    result = simulate(
        "compare", "--workload", "gpt-tiny", "--cluster", "dgx-a100-80g", "--sweep", "inter_node_bandwidth=1e-30 GB/s"
    )
    refused(result, "inter_node_bandwidth:", "below what a real part has", "1 KB/s")


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_a_key_given_twice_is_refused_not_the_last_one_taken(simulate, tmp_path, suffix):
    # Both YAML and JSON parsers keep the last of two equal keys without a word: `tp: 2 ... tp: 8` ran at tp=8.
    plan = tmp_path / f"plan{suffix}"
    plan.write_text("tp: 2\nmicro_batch: 1\ntp: 8\n" if suffix == ".yaml" else '{"tp": 2, "tp": 8}', encoding="utf-8")
    refused(run_workload(simulate, "gpt-tiny", str(plan)), str(plan), "tp:", "given twice")


def test_a_trillion_nodes_is_refused_before_the_rank_tables_are_built():
    # On main this ran past any time limit building per-device tables for 8e12 devices: run as a process with a
    # time limit, so that a hang fails the test (TimeoutExpired) instead of stalling the suite.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "simulator.cli",
            "run",
            "-w",
            "gpt-tiny",
            "-c",
            "dgx-a100-80g",
            "--nodes",
            "1000000000000",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert all(f in _compact(proc.stderr) for f in ("--nodes1000000000000", "8000000000000devices", "atmost1048576"))
