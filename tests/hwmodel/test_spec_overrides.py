"""Measured figures that refine a spec: per-dtype efficiency curves and per-collective link figures."""

from __future__ import annotations

import pytest

from hwmodel import EfficiencyCurve, load_cluster
from hwmodel.components import CollectiveFit, DtypeEfficiency
from simulator.cost.collectives import collective_time
from simulator.cost.compute import layer_times, roofline
from workloads import ShardShape, layer_profile, load_workload


def _cpu_cluster(**link_fits):
    cluster = load_cluster("cpu-local", devices_per_node=4)
    node = cluster.node_groups[0].node
    intra = node.intra_node.model_copy(update={"collectives": link_fits})
    group = cluster.node_groups[0].model_copy(update={"node": node.model_copy(update={"intra_node": intra})})
    return cluster.replaced(node_groups=(group,))


def test_a_collective_fit_replaces_the_link_figures_for_its_kind_only():
    plain = _cpu_cluster()
    fitted = _cpu_cluster(
        send_recv=CollectiveFit(bandwidth=3e9, latency=60e-6), all_gather=CollectiveFit(bandwidth=0.5e9, latency=500e-6)
    )
    group = range(4)
    span = fitted.span(group)
    # all_gather: 3/4 of the bytes at the fitted bandwidth, log2(4) = 2 latency steps.
    assert collective_time("all_gather", 1e8, span) == pytest.approx(0.75 * 1e8 / 0.5e9 + 2 * 500e-6)
    # all_reduce has no fit: the link's own bandwidth x efficiency and latency, as without fits.
    assert collective_time("all_reduce", 1e8, span) == pytest.approx(
        collective_time("all_reduce", 1e8, plain.span(group))
    )
    # Point-to-point paths (pipeline sends) use the send/recv fit.
    path = fitted.path(0, 1)
    assert (path.bandwidth, path.latency) == (3e9, 60e-6)


def test_per_dtype_curves_override_the_shared_ones_for_that_dtype():
    cluster = load_cluster("cpu-local")
    device = cluster.device(0)
    slow_fp32_attention = DtypeEfficiency(attention_efficiency=EfficiencyCurve.flat(0.05))
    tuned = device.model_copy(
        update={"compute": device.compute.model_copy(update={"per_dtype": {"fp32": slow_fp32_attention}})}
    )
    workload = load_workload("gpt3-125m").with_seq_len(512)
    for dtype, nbytes in (("fp32", 4), ("bf16", 2)):
        shape = ShardShape(micro_batch=1, seq_len=512, dtype_bytes=nbytes)
        profile = layer_profile(workload, "decoder", shape)
        before, after = layer_times(profile, roofline(device, dtype)), layer_times(profile, roofline(tuned, dtype))
        if dtype == "fp32":
            assert after.recompute_selective > before.recompute_selective  # the attention core
        else:
            assert after == before
    assert tuned.compute.efficiencies("bf16")[2] is device.compute.attention_efficiency
