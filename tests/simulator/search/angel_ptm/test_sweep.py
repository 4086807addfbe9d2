"""`simulate search angel-ptm --sweep`: more SSD drives or bandwidth, host memory, host link or prefetch depth
never lowers samples/s (throughput) or the largest model (max-model); bad keys and values exit 2."""

from __future__ import annotations

import json
from itertools import pairwise

import pytest

from hwmodel.catalog import load_cluster
from hwmodel.errors import UserError
from simulator.search.angel_ptm.search import AngelReport
from simulator.search.angel_ptm.space import ladder_model
from simulator.search.angel_ptm.sweep import SWEEP_KEYS, parse_sweep, run_sweep, with_value
from workloads.catalog import load_workload

CLUSTER = load_cluster("dgx-a100-40g")
BASE = load_workload("gpt3-13b")
# Too big for GPU + host memory of the node, so its states reach the SSD and every swept field matters.
BIG = ladder_model(BASE, 90)

RISING = {
    "ssd_drives": "1,2,8",
    "ssd_read_bandwidth": "0.5,1,4GB/s",
    "ssd_write_bandwidth": "0.25,1,4GB/s",
    "pcie_gen": "3,4,5",
    "host_link_bandwidth": "1,8,64GB/s",
    "host_memory": "256GiB,1TiB,2TiB",
    "prefetch_depth": "0,1,4",
}


def _reports(objective: str, text: str, wl=BIG) -> list[AngelReport]:
    key, values = parse_sweep(text)
    points = run_sweep(wl, CLUSTER, objective, 1, key, values)
    out = []
    for p in points:
        assert p.result is not None, p.reason
        assert isinstance(p.result.best.report, AngelReport)
        out.append(p.result.best.report)
    return out


def test_every_key_has_a_rising_case():
    assert set(RISING) == set(SWEEP_KEYS)


@pytest.mark.parametrize("key", sorted(RISING))
def test_more_of_a_resource_never_lowers_throughput(key):
    speeds = [r.samples_per_s for r in _reports("throughput", f"{key}={RISING[key]}")]
    assert all(b >= a * (1 - 1e-9) for a, b in pairwise(speeds)), speeds


def test_a_binding_resource_raises_throughput():
    # At the low end of these sweeps the swept transfer (or serial fetching) sets the step of BIG, so
    # the sweep must show a gain, not only no loss: a sweep that edited nothing would fail here.
    for key in ("ssd_drives", "ssd_read_bandwidth", "ssd_write_bandwidth", "host_link_bandwidth", "prefetch_depth"):
        speeds = [r.samples_per_s for r in _reports("throughput", f"{key}={RISING[key]}")]
        assert speeds[-1] > speeds[0], (key, speeds)


@pytest.mark.parametrize("key", ["ssd_drives", "host_memory", "prefetch_depth", "ssd_read_bandwidth"])
def test_more_of_a_resource_never_shrinks_the_largest_model(key):
    sizes = [r.params for r in _reports("max-model", f"{key}={RISING[key]}", BASE)]
    assert all(b >= a for a, b in pairwise(sizes)), sizes


def test_capacity_sweeps_move_the_largest_model():
    # Drives and host memory are capacity: the ends of their sweeps must differ, or the sweep is not applied.
    for key in ("ssd_drives", "host_memory"):
        sizes = [r.params for r in _reports("max-model", f"{key}={RISING[key]}", BASE)]
        assert sizes[-1] > sizes[0], (key, sizes)


def test_ssd_values_are_per_drive():
    storage = CLUSTER.node_groups[0].node.storage
    assert storage is not None
    edited = with_value(CLUSTER, "ssd_read_bandwidth", "2GB/s").node_groups[0].node.storage
    assert edited is not None and edited.read_bandwidth == pytest.approx(2e9 * storage.drives)
    doubled = with_value(CLUSTER, "ssd_drives", str(2 * storage.drives)).node_groups[0].node.storage
    assert doubled is not None
    assert doubled.capacity == pytest.approx(2 * storage.capacity)
    assert doubled.write_bandwidth == pytest.approx(2 * storage.write_bandwidth)


def test_bare_numbers_take_the_last_unit():
    assert parse_sweep("host_memory=512,1024GiB") == ("host_memory", ["512GiB", "1024GiB"])


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("cores=1,2", "cores"),
        ("page_size=64MiB", "page_size"),
        ("pcie_gen=2,6", "pcie_gen"),
        ("ssd_drives=0", "ssd_drives"),
        ("host_memory=1TB/s", "host_memory"),
        ("prefetch_depth=", "prefetch_depth"),
        ("ssd_drives", "KEY=V1"),
    ],
)
def test_bad_sweeps_name_the_key(text, named):
    with pytest.raises(UserError, match=named):
        parse_sweep(text)


ARGS = ["search", "angel-ptm", "--workload", "gpt3-1.3b", "--cluster", "dgx-a100-40g"]


def test_cli_unknown_key_exits_2(simulate):
    result = simulate(*ARGS, "--sweep", "gpu_count=1,2")
    assert result.code == 2, result.err
    assert "gpu_count" in result.err and "ssd_drives" in result.err and "Traceback" not in result.err


def test_cli_json_is_one_search_result_per_value(simulate):
    result = simulate(*ARGS, "--objective", "throughput", "--sweep", "pcie_gen=3,5", "--json")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert [d["details"]["sweep"] for d in data] == [
        {"key": "pcie_gen", "value": "3"},
        {"key": "pcie_gen", "value": "5"},
    ]
    for d in data:
        assert d["planner"] == "angel-ptm" and d["best"]["report"]["samples_per_s"] > 0
        assert {b["name"] for b in d["baselines"]} == {"zero3", "zero-offload", "zero-infinity", "patrickstar"}


def test_cli_table_has_a_row_per_value(simulate):
    result = simulate(*ARGS, "--sweep", "ssd_drives=1,2", "--objective", "throughput")
    assert result.code == 0, result.err
    assert "ssd_drives" in result.out and "binds" in result.out


def test_cli_out_with_sweep_is_refused(simulate, tmp_path):
    result = simulate(*ARGS, "--sweep", "ssd_drives=1,2", "--out", tmp_path / "p.yaml")
    assert result.code == 2 and "--sweep" in result.err
