"""Bad input of every kind: a message naming the file, field and value and what is accepted, exit 2, no traceback.

The CLI is called in-process through `simulator.cli.main()` (the console entry point, which turns user
errors into exit status 2); two cases also go through the real `python -m simulator.cli` process.
Bad files are edited copies of real catalog files, written under tmp_path.
"""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest

import specs
from hwmodel.catalog import load_cluster, load_device
from hwmodel.errors import SpecError, UnknownNameError, UserError
from simulator.analytic import evaluate
from simulator.errors import InfeasiblePlan, UnsupportedPlan
from simulator.plan import parse_shorthand
from simulator.validation import builtin_csv
from tests.helpers import CliResult
from workloads import load_workload

SPECS = Path(specs.__file__).parent
DEVICE_YAML = SPECS / "devices" / "a100-80g.yaml"
CLUSTER_YAML = SPECS / "clusters" / "dgx-a100-80g.yaml"

LLAMA_WORKLOAD = """\
family: llama
num_layers: 32
hidden_size: 4096
ffn_hidden_size: 11008
num_heads: 32
vocab_size: 32000
seq_len: 4096
"""
PLAN = "tp: 2\nmicro_batch: 1\nglobal_batch: 64\n"


# ---- helpers -----------------------------------------------------------------------------------
def _compact(text: str) -> str:
    return re.sub(r"\s+", "", text)


def mentions(text: str, fragment: str) -> bool:
    """`fragment` occurs in `text`, ignoring where the console wrapped lines."""
    return _compact(fragment) in _compact(text)


def assert_user_error(result: CliResult, *fragments: str) -> None:
    assert result.code == 2, f"exit status {result.code}, expected 2; stderr:\n{result.err}"
    assert "Traceback" not in result.err
    assert result.err.lstrip().startswith("error:"), result.err
    for fragment in fragments:
        assert mentions(result.err, fragment), f"{fragment!r} missing from the message:\n{result.err}"


def edited(src: Path, dst: Path, old: str, new: str) -> Path:
    """Copy `src` to `dst` with the one occurrence of `old` replaced by `new`."""
    text = src.read_text(encoding="utf-8")
    assert text.count(old) == 1, f"{old!r} should occur exactly once in {src}"
    dst.write_text(text.replace(old, new), encoding="utf-8")
    return dst


def cluster_using_device(tmp_path: Path, device_path: Path) -> Path:
    """A copy of dgx-a100-80g whose node names its device by path."""
    return edited(CLUSTER_YAML, tmp_path / "cluster.yaml", "device: a100-80g", f"device: {device_path}")


def run_on(simulate, cluster: Path) -> CliResult:
    return simulate(
        "run", "--workload", "llama2-7b", "--cluster", cluster, "--plan", "tp=2,micro_batch=1,global_batch=64"
    )


# ---- library exception types ---------------------------------------------------------------------
@pytest.mark.parametrize("exc_type", [SpecError, UnknownNameError, InfeasiblePlan, UnsupportedPlan])
def test_library_errors_are_user_errors(exc_type):
    assert issubclass(exc_type, UserError)
    assert issubclass(exc_type, ValueError)


def test_unknown_cluster_name_raises_unknown_name_error_with_suggestions():
    with pytest.raises(UnknownNameError) as info:
        load_cluster("dgx-a100-8g")
    assert info.value.suggestions[0] == "dgx-a100-80g"
    assert "dgx-a100-8g" in str(info.value) and "dgx-h100" in str(info.value)  # lists the known clusters


def test_unknown_workload_name_raises_unknown_name_error_with_suggestions():
    with pytest.raises(UnknownNameError) as info:
        load_workload("llama2-7x")
    assert info.value.suggestions[0] == "llama2-7b"


def test_bad_device_file_raises_spec_error(tmp_path):
    path = edited(DEVICE_YAML, tmp_path / "dev.yaml", "capacity: 80 GiB", "capacity: 80 GB/s")
    with pytest.raises(SpecError, match=r"memory\.capacity"):
        load_device(str(path))


def test_infeasible_plan_raises_infeasible_plan(llama7b):
    with pytest.raises(InfeasiblePlan, match=r"tp=3 does not divide num_heads=32"):
        evaluate(parse_shorthand("tp=3"), llama7b, load_cluster("dgx-a100-80g", 3))


# ---- control: the unedited copies are accepted ---------------------------------------------------
def test_unedited_copies_of_catalog_files_are_accepted(simulate, tmp_path):
    device = edited(DEVICE_YAML, tmp_path / "dev.yaml", "name: a100-80g", "name: my-a100")
    cluster = cluster_using_device(tmp_path, device)
    workload = tmp_path / "wl.yaml"
    workload.write_text(LLAMA_WORKLOAD)
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN)
    result = simulate("run", "-w", workload, "-c", cluster, "-p", plan, "--json")
    assert result.code == 0, result.err
    assert '"num_devices": 8' in result.out


# ---- malformed, list or empty YAML ---------------------------------------------------------------
def _malformed(kind: str, tmp_path: Path) -> tuple[list, Path]:
    """(simulate args, the file that is malformed) for each kind of input file."""
    if kind == "cluster":
        bad = edited(CLUSTER_YAML, tmp_path / "cluster.yaml", "num_devices: 8", "num_devices: [8")
        return ["run", "-w", "llama2-7b", "-c", bad], bad
    if kind == "device":
        bad = edited(DEVICE_YAML, tmp_path / "dev.yaml", "capacity: 80 GiB", "capacity: [80 GiB")
        return ["run", "-w", "llama2-7b", "-c", cluster_using_device(tmp_path, bad)], bad
    if kind == "workload":
        bad = tmp_path / "wl.yaml"
        bad.write_text(LLAMA_WORKLOAD.replace("num_layers: 32", "num_layers: [32"))
        return ["run", "-w", bad, "-c", "dgx-a100-80g"], bad
    bad = tmp_path / "plan.yaml"
    bad.write_text(PLAN.replace("tp: 2", "tp: [2"))
    return ["run", "-w", "llama2-7b", "-c", "dgx-a100-80g", "-p", bad], bad


@pytest.mark.parametrize("kind", ["cluster", "device", "workload", "plan"])
def test_malformed_yaml_names_file_line_and_column(simulate, tmp_path, kind):
    args, bad = _malformed(kind, tmp_path)
    result = simulate(*args)
    assert_user_error(result, str(bad), "malformed YAML")
    assert re.search(r"line\s+\d+,\s+column\s+\d+", result.err), result.err


def _input_args(kind: str, path: Path) -> list:
    if kind == "cluster":
        return ["run", "-w", "llama2-7b", "-c", path]
    if kind == "workload":
        return ["run", "-w", path, "-c", "dgx-a100-80g"]
    return ["run", "-w", "llama2-7b", "-c", "dgx-a100-80g", "-p", path]


@pytest.mark.parametrize("kind", ["cluster", "workload", "plan"])
@pytest.mark.parametrize("content, what", [("- a\n- b\n", "list"), ("", "empty"), ("# only a comment\n", "empty")])
def test_top_level_must_be_a_mapping(simulate, tmp_path, kind, content, what):
    path = tmp_path / f"{kind}.yaml"
    path.write_text(content)
    result = simulate(*_input_args(kind, path))
    assert_user_error(result, str(path), "expected a mapping", what)


# ---- unknown names -------------------------------------------------------------------------------
def test_unknown_device_in_cluster_file(simulate, tmp_path):
    bad = edited(CLUSTER_YAML, tmp_path / "cluster.yaml", "device: a100-80g", "device: a100-80gb")
    assert_user_error(
        run_on(simulate, bad), str(bad), "node_groups[0].node.device", "unknown device 'a100-80gb'", "'a100-80g'"
    )


def test_unknown_cluster_name_suggests_nearest(simulate):
    result = simulate("run", "-w", "llama2-7b", "--cluster", "dgx-a100-8g")
    assert_user_error(result, "unknown cluster 'dgx-a100-8g'", "Did you mean 'dgx-a100-80g'")


def test_unknown_workload_name_suggests_nearest(simulate):
    result = simulate("run", "--workload", "llama2-7x", "-c", "dgx-a100-80g")
    assert_user_error(result, "unknown workload 'llama2-7x'", "Did you mean 'llama2-7b'")


def test_unknown_spec_name_in_specs_show(simulate):
    assert_user_error(simulate("specs", "show", "a100-80"), "unknown spec 'a100-80'", "'a100-80g'")


def test_unknown_field_in_device_lists_accepted_fields(simulate, tmp_path):
    bad = edited(DEVICE_YAML, tmp_path / "dev.yaml", "  capacity: 80 GiB", "  capacity: 80 GiB\n  capacty: 80 GiB")
    assert_user_error(
        run_on(simulate, cluster_using_device(tmp_path, bad)),
        str(bad),
        "memory.capacty",
        "unknown field 'capacty'",
        "accepted fields: bandwidth, capacity, efficiency, reserved",
    )


def test_unknown_field_in_cluster_lists_accepted_fields(simulate, tmp_path):
    bad = edited(
        CLUSTER_YAML, tmp_path / "cluster.yaml", "network_latency: 1 us", "network_latency: 1 us\nnetwork_latenc: 1 us"
    )
    assert_user_error(
        run_on(simulate, bad),
        str(bad),
        "unknown field 'network_latenc'",
        "accepted fields:",
        "network_latency",
        "node_groups",
    )


def test_unknown_field_in_workload_lists_accepted_fields(simulate, tmp_path):
    bad = tmp_path / "wl.yaml"
    bad.write_text(LLAMA_WORKLOAD + "num_layer: 30\n")
    result = simulate("run", "-w", bad, "-c", "dgx-a100-80g")
    assert_user_error(result, str(bad), "unknown field 'num_layer'", "accepted fields:", "num_layers", "hidden_size")


def test_unknown_field_in_plan_file_lists_accepted_fields(simulate, tmp_path):
    bad = tmp_path / "plan.yaml"
    bad.write_text(PLAN + "tpp: 2\n")
    result = simulate("run", "-w", "llama2-7b", "-c", "dgx-a100-80g", "-p", bad)
    assert_user_error(result, str(bad), "unknown field 'tpp'", "accepted fields:", "global_batch", "micro_batch")


# ---- units and sizes in spec files ---------------------------------------------------------------
@pytest.mark.parametrize(
    "old, new, fragments",
    [
        ("capacity: 80 GiB", "capacity: 80 GB/s", ["memory.capacity", "'80 GB/s'", "is a bandwidth", "'80 GiB'"]),
        ("capacity: 80 GiB", "capacity: 80 GX", ["memory.capacity", "unknown unit 'GX'", "'80 GX'", "GiB"]),
        ("capacity: 80 GiB", "capacity: 80", ["memory.capacity", "80 has no unit", "'80 GiB'"]),
        ("bandwidth: 2039 GB/s", "bandwidth: 2039", ["memory.bandwidth", "2039 has no unit", "GB/s"]),
        ("capacity: 80 GiB", "capacity: -1 GiB", ["memory.capacity", "'-1 GiB'", "greater than 0"]),
        ("capacity: 80 GiB", "capacity: 0 GB", ["memory.capacity", "'0 GB'", "greater than 0"]),
    ],
    ids=["bandwidth-for-size", "unknown-unit", "size-without-unit", "bandwidth-without-unit", "negative", "zero"],
)
def test_bad_quantity_in_device_file(simulate, tmp_path, old, new, fragments):
    bad = edited(DEVICE_YAML, tmp_path / "dev.yaml", old, new)
    assert_user_error(run_on(simulate, cluster_using_device(tmp_path, bad)), str(bad), *fragments)


def test_plain_number_for_link_bandwidth_in_cluster_file(simulate, tmp_path):
    bad = edited(CLUSTER_YAML, tmp_path / "cluster.yaml", "bandwidth: 200 Gbit/s", "bandwidth: 200")
    assert_user_error(
        run_on(simulate, bad), str(bad), "node_groups[0].node.network.bandwidth", "200 has no unit", "Gbit/s"
    )


def test_zero_devices_per_node(simulate, tmp_path):
    bad = edited(CLUSTER_YAML, tmp_path / "cluster.yaml", "num_devices: 8", "num_devices: 0")
    assert_user_error(run_on(simulate, bad), str(bad), "node_groups[0].node.num_devices", "greater than 0", "got 0")


def test_zero_layers_in_workload(simulate, tmp_path):
    bad = tmp_path / "wl.yaml"
    bad.write_text(LLAMA_WORKLOAD.replace("num_layers: 32", "num_layers: 0"))
    result = simulate("run", "-w", bad, "-c", "dgx-a100-80g")
    assert_user_error(result, str(bad), "num_layers", "greater than 0", "got 0")


# ---- units on the command line -------------------------------------------------------------------
@pytest.mark.parametrize(
    "values, fragments",
    [
        ("100,200", ["'100' has no unit", "Gbit/s"]),
        ("100,200GB", ["'100GB'", "bandwidth is expected"]),
        ("100,200GX/s", ["unknown unit 'GX/s'", "Gbit/s"]),
    ],
    ids=["plain-number", "size-for-bandwidth", "unknown-unit"],
)
def test_bad_bandwidth_in_sweep(simulate, values, fragments):
    result = simulate(
        "compare", "-w", "llama2-7b", "-c", "dgx-a100-80g", "-n", "2", "--sweep", f"inter_node_bandwidth={values}"
    )
    assert_user_error(result, *fragments)


def test_non_integer_seq_len_in_sweep(simulate):
    result = simulate("compare", "-w", "llama2-7b", "-c", "dgx-a100-80g", "--sweep", "seq_len=2048,abc")
    assert_user_error(result, "seq_len", "'abc'")


def test_unknown_sweep_key_lists_accepted_keys(simulate):
    result = simulate("compare", "-w", "llama2-7b", "-c", "dgx-a100-80g", "--sweep", "tpp=1,2")
    assert_user_error(result, "unknown key 'tpp'", "accepted:", "inter_node_bandwidth", "seq_len")


# ---- infeasible plans ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra, plan, fragments",
    [
        (["--nodes", "3"], "tp=3", ["tp=3 does not divide num_heads=32"]),
        ([], "tp=2,pp=2,dp=3", ["= 12", "'dgx-a100-80g' has 8 devices"]),
        ([], "micro_batch=3,global_batch=10", ["global_batch=10 is not a multiple of micro_batch*dp", "24"]),
        (["--nodes", "8"], "pp=64", ["pp=64", "num_layers=32"]),
        ([], "pp=2,schedule=interleaved", ["schedule=interleaved needs virtual_stages >= 2"]),
        ([], "tpp=2", ["unknown key 'tpp'", "Did you mean tp", "Accepted keys: tp, pp, dp", "global_batch"]),
        ([], "tp=2,pp", ["'pp' is not key=value", "tp=8,pp=2"]),
        ([], "dp_type=zero4", ["dp_type", "'zero4'", "'zero3'"]),
    ],
    ids=["tp-heads", "product", "batch", "pp-layers", "interleaved", "unknown-key", "no-equals", "bad-choice"],
)
def test_infeasible_or_malformed_plan(simulate, extra, plan, fragments):
    result = simulate("run", "-w", "llama2-7b", "-c", "dgx-a100-80g", *extra, "--plan", plan)
    assert_user_error(result, *fragments)


def test_tp_that_does_not_divide_heads_says_so_on_one_dgx_node(simulate):
    # tp=3 can never work for llama2-7b (32 heads); the message should say so, not only that 3 does not divide 8.
    result = simulate("run", "-w", "llama2-7b", "-c", "dgx-a100-80g", "--plan", "tp=3")
    assert_user_error(result, "tp=3 does not divide num_heads=32")


# ---- --nodes -------------------------------------------------------------------------------------
def test_zero_nodes(simulate):
    assert_user_error(
        simulate("run", "-w", "llama2-7b", "-c", "dgx-a100-80g", "--nodes", "0"), "--nodes", "positive", "0"
    )


def test_nodes_on_a_multi_group_cluster(simulate):
    result = simulate("run", "-w", "llama2-7b", "-c", "mixed-a100-v100", "--nodes", "2")
    assert_user_error(result, "'mixed-a100-v100'", "2 node groups", "identical nodes")


def test_zero_seq_len(simulate):
    assert_user_error(
        simulate("run", "-w", "llama2-7b", "-c", "dgx-a100-80g", "--seq-len", "0"), "--seq-len", "positive"
    )


# ---- validate llm-foundry --csv ------------------------------------------------------------------
def _builtin_rows() -> tuple[list[str], list[dict[str, str]]]:
    with builtin_csv().open(newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames), list(reader)


def _write_csv(path: Path, fields: list[str], rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_validate_missing_csv(simulate, tmp_path):
    missing = tmp_path / "nope.csv"
    assert_user_error(simulate("validate", "llm-foundry", "--csv", missing), str(missing), "no such file")


def test_validate_csv_missing_columns(simulate, tmp_path):
    fields, rows = _builtin_rows()
    keep = [f for f in fields if f not in ("tokens_per_s", "act_ckpt")]
    bad = _write_csv(tmp_path / "t.csv", keep, [{k: r[k] for k in keep} for r in rows[:2]])
    result = simulate("validate", "llm-foundry", "--csv", bad)
    assert_user_error(result, str(bad), "missing columns tokens_per_s, act_ckpt")


def test_validate_csv_unknown_gpu(simulate, tmp_path):
    fields, rows = _builtin_rows()
    bad = _write_csv(tmp_path / "t.csv", fields, [rows[0], {**rows[1], "gpu": "v100_32gb"}])
    result = simulate("validate", "llm-foundry", "--csv", bad, "--json")
    assert_user_error(result, str(bad), "line 3", "'v100_32gb'", "a100_40gb, a100_80gb, h100_80gb")
    assert result.out == ""


def test_validate_csv_non_numeric_measurement(simulate, tmp_path):
    fields, rows = _builtin_rows()
    bad = _write_csv(tmp_path / "t.csv", fields, [{**rows[0], "tokens_per_s": "n/a"}])
    result = simulate("validate", "llm-foundry", "--csv", bad, "--json")
    assert_user_error(result, str(bad), "tokens_per_s", "'n/a'")


def test_validate_csv_without_rows(simulate, tmp_path):
    fields, _ = _builtin_rows()
    bad = _write_csv(tmp_path / "t.csv", fields, [])
    result = simulate("validate", "llm-foundry", "--csv", bad, "--json")
    assert_user_error(result, str(bad))
    assert "NaN" not in result.out


# ---- the real console process --------------------------------------------------------------------
def _process(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simulator.cli", *args], capture_output=True, text=True, timeout=60)


def test_console_process_malformed_cluster_file(tmp_path):
    bad = edited(CLUSTER_YAML, tmp_path / "cluster.yaml", "num_devices: 8", "num_devices: [8")
    proc = _process("run", "-w", "llama2-7b", "-c", str(bad))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert mentions(proc.stderr, str(bad)) and "malformed YAML" in proc.stderr
    assert proc.stdout == ""


def test_console_process_infeasible_plan():
    proc = _process("run", "-w", "llama2-7b", "-c", "dgx-a100-80g", "--plan", "tp=2,pp=2,dp=3")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error:") and mentions(proc.stderr, "has 8 devices")
