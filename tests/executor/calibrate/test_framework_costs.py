"""The framework's costs on the compute cores (ComputeSpec.blocking_collectives, grad_pack_bandwidth,
dp_layer_overhead, sharded_kernel_overhead, layer_call_overhead): what each adds, in both engines, and that
calibration's fit recovers them from probe timings."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from executor.calibrate.framework import PROBES, _predictor, fit_framework, probe_plans
from hwmodel.catalog import cluster_file, device_file
from hwmodel.cluster import ClusterSpec
from hwmodel.loading import read_mapping, validate
from simulator.analytic import evaluate
from simulator.binding import bind
from simulator.cost.compute import layer_times, roofline
from simulator.cost.stage import stage_cost
from simulator.des import evaluate_des
from simulator.plan import parse_shorthand
from workloads import load_workload
from workloads.config import WorkloadConfig

DP = "dp=2,micro_batch=4,global_batch=8,dtype=fp32"
ZERO3 = "dp=2,dp_type=zero3,micro_batch=4,global_batch=8,dtype=fp32"
TP = "tp=2,micro_batch=8,global_batch=8,dtype=fp32"
SINGLE = "micro_batch=8,global_batch=8,dtype=fp32"


def _cpu_mapping() -> dict:
    mapping = read_mapping(cluster_file("cpu-local"))
    device = read_mapping(device_file("cpu"))
    mapping["node_groups"][0]["node"]["device"] = device
    return mapping


def _cluster(ranks: int = 2, **compute) -> ClusterSpec:
    mapping = json.loads(json.dumps(_cpu_mapping()))
    mapping["node_groups"][0]["node"]["device"]["compute"].update(compute)
    return validate(ClusterSpec, mapping, "test").with_devices_per_node(ranks)


@pytest.fixture(scope="module")
def gpt():
    return load_workload("gpt-30m")


def _both(plan: str, workload, cluster) -> tuple[float, float]:
    p = parse_shorthand(plan)
    return evaluate(p, workload, cluster).iteration_time_s, evaluate_des(p, workload, cluster).iteration_time_s


def test_blocking_collectives_put_every_reduction_on_the_critical_path(gpt):
    overlapping = _cluster(blocking_collectives=False)
    blocking = _cluster(blocking_collectives=True)
    bound = bind(parse_shorthand(DP), gpt, blocking)
    cost = stage_cost(bound, bound.stages[0], 0)
    reductions = sum(rc.count * rc.reduce for rc in cost.runs)
    a_over, _ = _both(DP, gpt, overlapping)
    a_block, d_block = _both(DP, gpt, blocking)
    assert a_block == pytest.approx(d_block, rel=1e-6)
    # The last backward grows by all of the reductions (minus what was already exposed without blocking).
    assert a_block > a_over
    single = evaluate(
        parse_shorthand("dp=1,micro_batch=4,global_batch=4,dtype=fp32"), gpt, _cluster(1)
    ).iteration_time_s
    assert a_block == pytest.approx(single + reductions, rel=0.02)


def test_gradient_packing_costs_bytes_over_bandwidth_once_per_iteration(gpt):
    base = _cluster(blocking_collectives=True)
    packed = _cluster(blocking_collectives=True, grad_pack_bandwidth="1 GB/s", dp_layer_overhead="1 ms")
    bound = bind(parse_shorthand(DP), gpt, packed)
    cost = stage_cost(bound, bound.stages[0], 0)
    grad_bytes = sum(rc.count * rc.reduce_bytes for rc in cost.runs)
    layers = sum(rc.count for rc in cost.runs if rc.reduce)
    a0, d0 = _both(DP, gpt, base)
    a1, d1 = _both(DP, gpt, packed)
    expected = grad_bytes / 1e9 + layers * 1e-3
    assert a1 - a0 == pytest.approx(expected, rel=1e-6)
    assert d1 - d0 == pytest.approx(expected, rel=1e-6)


def test_zero3_copies_gathered_weights_every_micro_batch_and_engines_agree(gpt):
    base = _cluster(blocking_collectives=True)
    packed = _cluster(blocking_collectives=True, grad_pack_bandwidth="1 GB/s")
    a0, d0 = _both(ZERO3, gpt, base)
    a1, d1 = _both(ZERO3, gpt, packed)
    assert a1 > a0 and d1 > d0
    assert a1 == pytest.approx(d1, rel=1e-6)


def test_sharded_kernel_overhead_touches_only_tensor_parallel_layers(gpt):
    base, dispatch = _cluster(), _cluster(sharded_kernel_overhead="100 us")
    assert (
        evaluate(parse_shorthand(DP), gpt, dispatch).iteration_time_s
        == evaluate(parse_shorthand(DP), gpt, base).iteration_time_s
    )
    a0, d0 = _both(TP, gpt, base)
    a1, d1 = _both(TP, gpt, dispatch)
    assert a1 > a0
    assert a1 - a0 == pytest.approx(d1 - d0, rel=1e-6)


def _layers(plan: str, workload, cluster) -> int:
    bound = bind(parse_shorthand(plan), workload, cluster)
    return sum(run.count for stage in bound.stages for run in stage.runs)


@pytest.mark.parametrize("micro_batch", [1, 2, 8])
def test_layer_call_overhead_costs_every_layer_call_forward_and_backward_in_both_engines(gpt, micro_batch):
    plan = f"micro_batch={micro_batch},global_batch=8,dtype=fp32"
    per_call = 1e-3
    base, calls = _cluster(1), _cluster(1, layer_call_overhead="1 ms")
    a0, d0 = _both(plan, gpt, base)
    a1, d1 = _both(plan, gpt, calls)
    expected = _layers(plan, gpt, base) * (8 // micro_batch) * 2 * per_call
    assert a1 - a0 == pytest.approx(expected, rel=1e-9)
    assert d1 - d0 == pytest.approx(expected, rel=1e-9)


def test_layer_call_overhead_is_paid_again_by_a_full_recompute_not_a_selective_one(gpt):
    base, calls = _cluster(1), _cluster(1, layer_call_overhead="1 ms")
    for recompute in ("full", "selective"):
        plan = f"recompute={recompute},{SINGLE}"
        bound = bind(parse_shorthand(plan), gpt, base)
        runs = [run for stage in bound.stages for run in stage.runs]
        recomputed = sum(run.count for run in runs if run.recompute == "full")  # the blocks, not embedding or head
        assert recompute == "selective" or 0 < recomputed < sum(run.count for run in runs)
        expected = (2 * sum(run.count for run in runs) + recomputed) * 1e-3
        a0, d0 = _both(plan, gpt, base)
        a1, d1 = _both(plan, gpt, calls)
        assert a1 - a0 == pytest.approx(expected, rel=1e-9)
        assert d1 - d0 == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("plan", [DP, ZERO3, TP, "pp=2,micro_batch=1,global_batch=8,dtype=fp32"])
def test_layer_call_overhead_slows_every_parallel_plan_and_engines_agree(gpt, plan):
    base, calls = _cluster(blocking_collectives=True), _cluster(blocking_collectives=True, layer_call_overhead="1 ms")
    a0, d0 = _both(plan, gpt, base)
    a1, d1 = _both(plan, gpt, calls)
    assert a1 > a0 and d1 > d0
    if plan != "pp=2,micro_batch=1,global_batch=8,dtype=fp32":
        # One stage: every layer call is on the one critical path, so both engines add the same.
        assert a1 - a0 == pytest.approx(d1 - d0, rel=1e-6)


@pytest.mark.parametrize("plan", [SINGLE, DP, ZERO3, TP, "pp=2,micro_batch=2,global_batch=8,recompute=full,dtype=fp32"])
def test_layer_call_overhead_left_out_changes_no_report(gpt, plan):
    ranks = 1 if plan == SINGLE else 2
    base = _cluster(ranks, blocking_collectives=True)
    explicit = _cluster(ranks, blocking_collectives=True, layer_call_overhead="0 s")
    p = parse_shorthand(plan)
    assert evaluate(p, gpt, base) == evaluate(p, gpt, explicit)
    # Left at 0 the layers cost exactly their kernels (backward: and the gradient accumulation of several
    # micro-batches), as before the field existed.
    bound = bind(p, gpt, base)
    for index, stage in enumerate(bound.stages):
        device = base.topology.devices[stage.ranks[0]]
        for rc in stage_cost(bound, stage, stage.ranks[0]).runs:
            kernels = layer_times(rc.profile, roofline(device, p.dtype))
            assert rc.times.forward == kernels.forward, index
            assert rc.times.recompute_full == kernels.recompute_full, index
            assert rc.times.backward >= kernels.backward, index
    assert evaluate_des(p, gpt, base).iteration_time_s == evaluate_des(p, gpt, explicit).iteration_time_s


def test_gpu_specs_have_no_framework_costs():
    from hwmodel import load_cluster

    compute = load_cluster("dgx-a100-80g").node_groups[0].node.device.compute
    assert not compute.blocking_collectives
    assert compute.grad_pack_bandwidth is None
    assert compute.sharded_kernel_overhead == 0 and compute.dp_layer_overhead == 0
    assert compute.layer_call_overhead == 0


@settings(max_examples=8, deadline=None)
@given(
    sharded=st.floats(5e-5, 2e-3),
    inv_bw=st.floats(1e-10, 2e-9),
    fixed=st.floats(0.0, 5e-3),
    per_call=st.floats(0.0, 2e-3),
)
def test_fit_recovers_the_fields_that_produced_the_timings(sharded, inv_bw, fixed, per_call):
    """Timings made by the simulator with known fields (and a device model off by a constant ratio) fit back
    to those fields."""
    mapping = _cpu_mapping()
    workloads = {p["name"]: validate(WorkloadConfig, p, "probe") for p in PROBES}
    predict = _predictor(mapping, workloads, 2)
    truth = {
        "sharded_kernel_overhead": sharded,
        "grad_pack_bandwidth": 1.0 / inv_bw,
        "dp_layer_overhead": fixed,
        "layer_call_overhead": per_call,
    }
    bias = 1.3  # the device model is 30% optimistic on every probe: the fit must not blame the framework
    measured = {(p, name): bias * predict(truth, p, plan) for p in workloads for name, plan in probe_plans(2).items()}
    fit = fit_framework(measured, predict, 2)
    assert fit.sharded_kernel_overhead == pytest.approx(sharded, rel=0.05)
    assert fit.grad_pack_bandwidth is not None and 1.0 / fit.grad_pack_bandwidth == pytest.approx(
        inv_bw, rel=0.1, abs=2e-11
    )
    assert fit.dp_layer_overhead == pytest.approx(fixed, rel=0.1, abs=1e-4)
    assert fit.layer_call_overhead == pytest.approx(per_call, rel=1e-3, abs=1e-7)
    for row in fit.rows:
        assert row["predicted_after_s"] == pytest.approx(row["measured_s"], rel=0.02)


def test_fit_without_the_small_micro_batch_probe_leaves_layer_calls_uncosted():
    """Probe times logged before the small-micro-batch run existed still fit, with no per-call cost."""
    mapping = _cpu_mapping()
    workloads = {p["name"]: validate(WorkloadConfig, p, "probe") for p in PROBES}
    predict = _predictor(mapping, workloads, 2)
    truth = {"sharded_kernel_overhead": 2e-4, "grad_pack_bandwidth": 2e9, "dp_layer_overhead": 1e-3}
    measured = {
        (p, name): predict(truth, p, plan)
        for p in workloads
        for name, plan in probe_plans(2).items()
        if name != "single-mb1"
    }
    fit = fit_framework(measured, predict, 2)
    assert fit.layer_call_overhead == 0.0
    assert fit.sharded_kernel_overhead == pytest.approx(2e-4, rel=0.05)


@pytest.mark.parametrize("micro_batch", [1, 2, 8])
def test_gradient_accumulation_adds_three_gradient_passes_per_extra_micro_batch(gpt, micro_batch):
    from simulator.cost.memory import state_bytes

    cluster = _cluster(1)
    plan = parse_shorthand(f"micro_batch={micro_batch},global_batch=8,dtype=fp32")
    bound = bind(plan, gpt, cluster)
    m = bound.num_micro_batches
    device = cluster.topology.devices[0]
    grad_per_param = state_bytes("fp32", plan.optimizer).gradients
    for rc in stage_cost(bound, bound.stages[0], 0).runs:
        kernels = layer_times(rc.profile, roofline(device, "fp32"))
        nbytes = 3 * rc.profile.params_local * grad_per_param
        expected = nbytes / (device.memory.bandwidth * device.memory.efficiency(nbytes)) * (m - 1) / m
        assert rc.times.backward - kernels.backward == pytest.approx(expected, rel=1e-9, abs=1e-15)
