"""The `simulate` and `execute` commands: JSON and human output, comparisons, validation, catalogs, and
never overwriting a file the user already has.

Commands run in-process through `simulator.cli.main()` (the console entry point); `--help` of both
console scripts goes through a real process.
"""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import specs
from hwmodel.catalog import cluster_names, device_names, load_device
from hwmodel.components import DeviceSpec
from simulator.validation import builtin_csv
from tests.helpers import CliResult
from workloads import workload_names

PLAN_7B = "tp=2,dp_type=zero1,micro_batch=2,global_batch=1024,sequence_parallel=true"
BREAKDOWN = ("compute", "recompute", "exposed_communication", "pipeline_bubble", "offload_stall", "optimizer")
MEMORY = ("weights", "gradients", "optimizer", "activations", "buffers")


# ---- helpers -----------------------------------------------------------------------------------
def mentions(text: str, fragment: str) -> bool:
    """`fragment` occurs in `text`, ignoring where the console wrapped lines."""
    return re.sub(r"\s+", "", fragment) in re.sub(r"\s+", "", text)


def ok(result: CliResult) -> CliResult:
    assert result.code == 0, f"exit status {result.code}; stderr:\n{result.err}"
    assert "Traceback" not in result.err
    return result


def refused(result: CliResult, path: Path) -> None:
    assert result.code == 2, f"exit status {result.code}; stderr:\n{result.err}"
    assert "Traceback" not in result.err
    assert mentions(result.err, str(path)) and "already exists" in result.err and "--force" in result.err


# ---- run -----------------------------------------------------------------------------------------
def test_run_json_is_a_complete_report(simulate):
    result = ok(
        simulate(
            "run", "-w", "llama2-7b", "-c", "dgx-a100-80g", "--plan", "tp=2,micro_batch=1,global_batch=64", "--json"
        )
    )
    report = json.loads(result.out)
    assert report["engine"] == "des"  # the default engine of `run`
    assert report["num_devices"] == 8
    assert report["workload"] == "llama2-7b" and report["cluster"] == "dgx-a100-80g"
    for key in ("iteration_time_s", "tokens_per_s", "samples_per_s", "mfu", "hfu", "peak_memory_bytes"):
        assert isinstance(report[key], float) and report[key] > 0, key
    assert 0 < report["mfu"] <= report["hfu"] <= 1
    assert set(MEMORY) <= set(report["memory_bytes"])
    assert set(BREAKDOWN) <= set(report["time_breakdown_s"])
    parts = sum(report["time_breakdown_s"][k] for k in BREAKDOWN)
    assert parts == pytest.approx(report["iteration_time_s"], rel=1e-9)
    assert report["tokens_per_s"] == pytest.approx(64 * 4096 / report["iteration_time_s"], rel=1e-9)
    assert report["samples_per_s"] == pytest.approx(64 / report["iteration_time_s"], rel=1e-9)


def test_run_human_output_mentions_throughput_and_mfu(simulate):
    result = ok(simulate("run", "-w", "llama2-7b", "-c", "dgx-a100-80g", "--nodes", "4", "--plan", PLAN_7B))
    assert "tokens/s" in result.out and "MFU" in result.out
    assert "llama2-7b" in result.out and "32 devices" in result.out
    assert result.err == ""


def test_run_shows_the_megatron_mfu_convention_where_it_differs(simulate):
    # At 128K causal tokens the full-matrix count (what papers quote) reads far above ours: both are shown.
    long = ok(
        simulate(
            "run",
            "-w",
            "llama2-7b",
            "-c",
            "hgx-a800",
            "--seq-len",
            "131072",
            "--engine",
            "analytic",
            "--plan",
            "tp=8,sequence_parallel=true,recompute=full",
        )
    )
    assert "as Megatron-LM counts" in long.out
    encoder = ok(simulate("run", "-w", "bert-huge-32", "-c", "dgx-a100-80g", "--engine", "analytic", "--plan", "dp=8"))
    assert "as Megatron-LM counts" not in encoder.out


def test_run_seq_len_changes_the_workload(simulate):
    # Plain DDP of 7B does not fit in 80 GB; --allow-oom accepts the report anyway (exit 0).
    args = ("run", "-w", "llama2-7b", "-c", "dgx-a100-80g", "--plan", "micro_batch=1,global_batch=64", "--json")
    args += ("--allow-oom",)
    default = json.loads(ok(simulate(*args)).out)
    short = json.loads(ok(simulate(*args, "--seq-len", "2048")).out)
    assert default["seq_len"] == 4096 and short["seq_len"] == 2048
    assert short["iteration_time_s"] < default["iteration_time_s"]
    assert short["tokens_per_s"] == pytest.approx(64 * 2048 / short["iteration_time_s"], rel=1e-9)


def test_run_nodes_resizes_the_cluster(simulate):
    report = json.loads(
        ok(simulate("run", "-w", "llama2-7b", "-c", "dgx-a100-80g", "--nodes", "4", "--plan", PLAN_7B, "--json")).out
    )
    assert report["num_devices"] == 32
    assert report["plan"]["dp"] == 16  # tp=2 on 32 GPUs leaves dp=16
    assert report["num_micro_batches"] == 1024 // (2 * 16)


def test_run_out_writes_a_new_file(simulate, tmp_path):
    target = tmp_path / "report.json"
    result = ok(simulate("run", "-w", "llama2-7b", "-c", "dgx-a100-80g", "--out", target, "--json", "--allow-oom"))
    assert json.loads(target.read_text()) == json.loads(result.out)


def test_run_out_refuses_an_existing_file_unless_force(simulate, tmp_path):
    target = tmp_path / "mine.json"
    target.write_text("my notes\n")
    refused(simulate("run", "-w", "llama2-7b", "-c", "dgx-a100-80g", "--out", target), target)
    assert target.read_text() == "my notes\n"
    ok(simulate("run", "-w", "llama2-7b", "-c", "dgx-a100-80g", "--out", target, "--force", "--allow-oom"))
    assert json.loads(target.read_text())["engine"] == "des"


def test_run_engines_and_their_outputs(simulate, tmp_path):
    plan = "tp=4,pp=2,micro_batch=1,global_batch=16"
    analytic = json.loads(
        ok(simulate("run", "-w", "llama2-7b", "-c", "dgx-a100-80g", "-p", plan, "--engine", "analytic", "--json")).out
    )
    trace, plot = tmp_path / "t.json", tmp_path / "t.png"
    des = json.loads(
        ok(
            simulate(
                "run", "-w", "llama2-7b", "-c", "dgx-a100-80g", "-p", plan, "--json", "--trace", trace, "--plot", plot
            )
        ).out
    )
    assert (analytic["engine"], des["engine"]) == ("analytic", "des")
    assert des["iteration_time_s"] == pytest.approx(analytic["iteration_time_s"], rel=0.02)
    assert des["link_utilization"] and des["peak_memory_time_s"] is not None
    assert json.loads(trace.read_text())["traceEvents"]
    assert plot.read_bytes()[:4] == b"\x89PNG"
    # The timeline files are the user's too: not replaced without --force.
    refused(simulate("run", "-w", "llama2-7b", "-c", "dgx-a100-80g", "-p", plan, "--trace", trace), trace)
    result = simulate(
        "run",
        "-w",
        "llama2-7b",
        "-c",
        "dgx-a100-80g",
        "-p",
        plan,
        "--engine",
        "analytic",
        "--trace",
        tmp_path / "new.json",
    )
    assert result.code == 2 and "--engine des" in result.err
    result = simulate("run", "-w", "llama2-7b", "-c", "dgx-a100-80g", "-p", plan, "--engine", "exact")
    assert result.code == 2 and "analytic or des" in result.err


def test_validate_with_the_event_engine_meets_its_targets(simulate):
    summary = json.loads(ok(simulate("validate", "llm-foundry", "--engine", "des", "--json")).out)
    assert len(summary["rows"]) == 113
    assert summary["mean_abs_pct_error"] <= 8
    assert summary["max_abs_pct_error"] <= 20


# ---- compare -------------------------------------------------------------------------------------
def test_compare_two_clusters(simulate):
    result = ok(
        simulate(
            "compare",
            "-w",
            "llama2-7b",
            "-c",
            "dgx-a100-80g",
            "-c",
            "dgx-h100",
            "--plan",
            "tp=2,micro_batch=1,global_batch=64",
            "--json",
        )
    )
    rows = json.loads(result.out)
    assert [r["cluster"] for r in rows] == ["dgx-a100-80g", "dgx-h100"]
    assert all(r["report"] is not None and r["reason"] is None for r in rows)
    a100, h100 = (r["report"] for r in rows)
    assert h100["tokens_per_s"] > a100["tokens_per_s"]  # same plan, faster GPUs and links


def test_compare_human_table_names_the_sweep(simulate):
    result = ok(
        simulate(
            "compare",
            "-w",
            "llama2-7b",
            "-c",
            "dgx-a100-80g",
            "--plan",
            "micro_batch=1,global_batch=64",
            "--sweep",
            "tp=2,4",
        )
    )
    assert "tp" in result.out and "tokens/s" in result.out and "MFU" in result.out


def test_compare_sweep_tp(simulate):
    result = ok(
        simulate(
            "compare",
            "-w",
            "llama2-7b",
            "-c",
            "dgx-a100-80g",
            "--plan",
            "micro_batch=1,global_batch=64",
            "--sweep",
            "tp=1,2,4,8",
            "--json",
        )
    )
    rows = json.loads(result.out)
    assert [r["tp"] for r in rows] == ["1", "2", "4", "8"]
    for row in rows:
        report = row["report"]
        assert report["plan"]["tp"] == int(row["tp"])
        assert report["num_devices"] == 8
    peaks = [r["report"]["peak_memory_bytes"] for r in rows]
    assert peaks == sorted(peaks, reverse=True)  # more tensor parallelism, less memory per device


def test_compare_sweep_inter_node_bandwidth_more_is_never_slower(simulate):
    result = ok(
        simulate(
            "compare",
            "-w",
            "gpt3-13b",
            "-c",
            "dgx-h100",
            "--nodes",
            "8",
            "--plan",
            "tp=4,pp=2,micro_batch=1,global_batch=512",
            "--sweep",
            "inter_node_bandwidth=100,200,400Gbit/s",
            "--json",
        )
    )
    rows = json.loads(result.out)
    assert [r["inter_node_bandwidth"] for r in rows] == ["100Gbit/s", "200Gbit/s", "400Gbit/s"]
    times = [r["report"]["iteration_time_s"] for r in rows]
    assert times[0] >= times[1] >= times[2]
    assert times[0] > times[2]  # data parallelism across 8 nodes does feel the network


def test_compare_infeasible_sweep_point_is_a_row_with_a_reason(simulate):
    result = ok(
        simulate(
            "compare",
            "-w",
            "llama2-7b",
            "-c",
            "dgx-a100-80g",
            "--plan",
            "micro_batch=1,global_batch=64",
            "--sweep",
            "tp=2,3,4",
            "--json",
        )
    )
    rows = json.loads(result.out)
    assert [r["tp"] for r in rows] == ["2", "3", "4"]
    assert rows[1]["report"] is None and "3" in rows[1]["reason"]
    assert rows[0]["report"] is not None and rows[2]["report"] is not None


def test_compare_csv_has_one_row_per_configuration(simulate, tmp_path):
    target = tmp_path / "sweep.csv"
    ok(
        simulate(
            "compare",
            "-w",
            "llama2-7b",
            "-c",
            "dgx-a100-80g",
            "--plan",
            "micro_batch=1,global_batch=64",
            "--sweep",
            "tp=1,2,3,4,8",
            "--csv",
            target,
        )
    )
    with target.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["tp"] for r in rows] == ["1", "2", "3", "4", "8"]
    assert all(r["cluster"] == "dgx-a100-80g" for r in rows)
    for row in rows:
        if row["tp"] == "3":
            assert row["iteration_time_s"] == "" and row["reason"] and row["fits_memory"] == "False"
        else:
            assert float(row["iteration_time_s"]) > 0 and float(row["tokens_per_s"]) > 0 and row["reason"] == ""


def test_compare_csv_refuses_an_existing_file_unless_force(simulate, tmp_path):
    target = tmp_path / "mine.csv"
    target.write_text("a,b\n1,2\n")
    args = ("compare", "-w", "llama2-7b", "-c", "dgx-a100-80g", "-c", "dgx-h100", "--csv", target)
    refused(simulate(*args), target)
    assert target.read_text() == "a,b\n1,2\n"
    ok(simulate(*args, "--force"))
    rows = list(csv.DictReader(io.StringIO(target.read_text())))
    assert [r["cluster"] for r in rows] == ["dgx-a100-80g", "dgx-h100"]


# ---- validate ------------------------------------------------------------------------------------
def _summary_figures(summary: dict) -> tuple:
    return (len(summary["rows"]), summary["mean_abs_pct_error"], summary["max_abs_pct_error"], summary["spearman"])


def test_validate_llm_foundry_json(simulate):
    summary = json.loads(ok(simulate("validate", "llm-foundry", "--json")).out)
    assert len(summary["rows"]) == 113
    assert summary["mean_abs_pct_error"] <= 10
    assert summary["max_abs_pct_error"] <= 25
    assert summary["spearman"] > 0.9
    row = summary["rows"][0]
    assert {"model", "gpu", "gpus", "measured_tokens_per_s", "predicted_tokens_per_s", "error_pct"} <= set(row)


def test_validate_copy_of_builtin_table_gives_the_same_summary(simulate, tmp_path):
    copy = tmp_path / "copy.csv"
    copy.write_bytes(builtin_csv().read_bytes())
    builtin = json.loads(ok(simulate("validate", "llm-foundry", "--json")).out)
    mine = json.loads(ok(simulate("validate", "llm-foundry", "--csv", copy, "--json")).out)
    assert _summary_figures(mine) == _summary_figures(builtin)


def test_validate_human_output_summarizes(simulate, tmp_path):
    copy = tmp_path / "copy.csv"
    with builtin_csv().open(newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)[:3]
        fields = reader.fieldnames
    with copy.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    result = ok(simulate("validate", "llm-foundry", "--csv", copy))
    assert mentions(result.out, "3 rows") and "mean |error|" in result.out and "Spearman" in result.out


def test_validate_csv_with_an_a100_40gb_row(simulate, tmp_path):
    with builtin_csv().open(newline="") as handle:
        reader = csv.DictReader(handle)
        fields = reader.fieldnames
        source = next(
            r for r in reader if r["gpu"] == "a100_80gb" and r["model"] == "mpt-1b" and r["seq_len"] == "1024"
        )
    path = tmp_path / "a100_40.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        # Half the card: a quarter of the 80 GB run's micro-batch, the rest of the row as published.
        micro = max(1, int(source["micro_batch"]) // 4)
        global_batch = micro * int(source["grad_accum"]) * int(source["gpus"])
        writer.writerow({**source, "gpu": "a100_40gb", "micro_batch": micro, "global_batch": global_batch})
    summary = json.loads(ok(simulate("validate", "llm-foundry", "--csv", path, "--json")).out)
    (row,) = summary["rows"]
    assert row["gpu"] == "a100_40gb" and row["model"] == "mpt-1b"
    assert row["predicted_tokens_per_s"] > 0
    assert 0 < row["predicted_peak_memory_gib"] < 40


# ---- catalogs ------------------------------------------------------------------------------------
def test_specs_list_shows_every_device_and_cluster(simulate):
    result = ok(simulate("specs", "list"))
    for name in device_names() + cluster_names():
        assert re.search(rf"(^|\s){re.escape(name)}\s", result.out), f"{name} not listed"
    assert "TFLOPS" in result.out and "GiB" in result.out


@pytest.mark.parametrize("name", device_names())
def test_specs_show_device_raw_is_the_whole_spec(simulate, name):
    # With --raw, what it prints is the whole spec the simulator uses: read back, it is the same DeviceSpec.
    data = yaml.safe_load(ok(simulate("specs", "show", name, "--raw")).out)
    assert DeviceSpec.model_validate(data) == load_device(name)
    assert data["sources"]  # with where each figure comes from


@pytest.mark.parametrize("name", device_names())
def test_specs_show_rounds_in_units_and_still_loads(simulate, name, tmp_path):
    """Figures rounded in their units, as a datasheet prints them; the YAML is still a spec that loads."""
    text = ok(simulate("specs", "show", name)).out
    data = yaml.safe_load(text)
    assert isinstance(data["memory"]["capacity"], str) and data["memory"]["capacity"].endswith(("GiB", "MiB", "TiB"))
    assert isinstance(data["memory"]["bandwidth"], str) and data["memory"]["bandwidth"].endswith("/s")
    path = tmp_path / "shown.yaml"
    path.write_text(text)
    shown, original = load_device(str(path)), load_device(name)
    assert shown.memory.capacity == pytest.approx(original.memory.capacity, rel=0.01)
    assert shown.memory.bandwidth == pytest.approx(original.memory.bandwidth, rel=0.01)


def test_specs_show_cluster_with_nodes(simulate):
    data = yaml.safe_load(ok(simulate("specs", "show", "dgx-h100", "--nodes", "2")).out)
    assert data["name"] == "dgx-h100"
    assert data["node_groups"][0]["count"] == 2
    assert data["summary"]["num_nodes"] == 2
    assert data["summary"]["num_devices"] == 16
    assert data["summary"]["device_types"] == ["h100-sxm"]


def test_specs_show_device_yaml_file(simulate, tmp_path):
    # `specs show` takes "a device or cluster name, or a spec YAML file" (its --help).
    path = tmp_path / "my-gpu.yaml"
    path.write_text(
        (Path(specs.__file__).parent / "devices" / "a100-80g.yaml")
        .read_text()
        .replace("name: a100-80g", "name: my-gpu")
    )
    data = yaml.safe_load(ok(simulate("specs", "show", path, "--raw")).out)
    assert data["name"] == "my-gpu"
    assert DeviceSpec.model_validate(data) == load_device("a100-80g").model_copy(update={"name": "my-gpu"})


def test_workloads_list_shows_every_workload(simulate):
    result = ok(simulate("workloads", "list"))
    for name in workload_names():
        assert re.search(rf"(^|\s){re.escape(name)}\s", result.out), f"{name} not listed in:\n{result.out}"


def test_workloads_show(simulate):
    data = yaml.safe_load(ok(simulate("workloads", "show", "llama2-7b")).out)
    assert data["name"] == "llama2-7b" and data["family"] == "llama"
    assert data["num_layers"] == 32 and data["hidden_size"] == 4096 and data["seq_len"] == 4096
    assert data["parameters"] == 6738415616
    assert data["train_flops_per_sample"] > 6 * data["parameters"] * data["seq_len"]  # plus attention


def test_workloads_show_at_another_seq_len(simulate):
    data = yaml.safe_load(ok(simulate("workloads", "show", "llama2-7b", "--seq-len", "2048")).out)
    assert data["seq_len"] == 2048 and data["parameters"] == 6738415616


# ---- help and demo -------------------------------------------------------------------------------
def test_simulate_help():
    proc = subprocess.run([sys.executable, "-m", "simulator.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for command in ("run", "compare", "validate", "specs", "workloads", "demo"):
        assert re.search(rf"\b{command}\b", proc.stdout), command
    assert "Traceback" not in proc.stderr


def test_execute_help():
    proc = subprocess.run([sys.executable, "-m", "executor.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Usage" in proc.stdout and mentions(proc.stdout, "Run a training plan on real devices")
    assert "Traceback" not in proc.stderr


def test_run_help_lists_plan_keys(simulate):
    result = ok(simulate("run", "--help"))
    assert "--workload" in result.out and "--plan" in result.out and "--force" in result.out
    assert mentions(result.out, "global_batch")


def test_demo_prints_a_prediction(simulate):
    result = ok(simulate("demo"))
    assert "tokens/s" in result.out and "MFU" in result.out
    assert "best candidate" in result.out
    assert "llm-foundry" in result.out


def test_run_reports_host_memory_of_swapped_activations(simulate):
    args = ("run", "-w", "llama2-7b", "-c", "hgx-a800", "--seq-len", "65536", "-e", "analytic", "--json", "--allow-oom")
    swapped = json.loads(ok(simulate(*args, "-p", "dp=2,cp=4,recompute=tokenwise,offload=1.0")).out)
    half = json.loads(ok(simulate(*args, "-p", "dp=2,cp=4,recompute=tokenwise,offload=0.5")).out)
    plain = json.loads(ok(simulate(*args, "-p", "dp=2,cp=4,recompute=full")).out)
    assert swapped["host_memory_bytes"] > half["host_memory_bytes"] > 0
    assert plain["host_memory_bytes"] is None


def test_search_tables_show_slow_sample_rates_with_significant_digits():
    # A million-token sample takes minutes: "0.00" samples/s would hide the figure the row is about.
    from simulator.search.render import _rate

    assert _rate(0.00142) == "0.00142"
    assert _rate(5004.354) == "5,004.35"
    assert _rate(1.0) == "1.00"
