"""`execute calibrate`: the fits on synthetic timings (known answers), consistency with the simulator's
own cost formulas, and one real `--quick` run whose spec `simulate` then uses.

The fits are tested where the right answer is known: timing tables generated from known curves and peaks
that differ between fp32 and bf16, and from a bandwidth and latency that differ between collective kinds,
must give those figures back (`compute.per_dtype`, `intra_node.collectives`), and the spec built from them
must predict the tables through the simulator's functions (`simulator.cost.compute.op_times` and
`layer_times`, `simulator.cost.collectives.collective_time`). The real run is a single test (one
calibration, ~10-20 s), so parallel test workers do not each start one.
"""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from rich.console import Console

import executor.calibrate.cli as cli
from executor.calibrate.fit import (
    COLLECTIVE_KINDS,
    RESOLVABLE,
    VECTOR_COUNTS,
    VECTOR_OPS,
    CalibrationError,
    MatmulFit,
    collective_coefficients,
    decade_nodes,
    fit_alpha_beta,
    fit_collectives,
    fit_curve,
    fit_matmul,
    fit_memory,
    fit_separable,
    fit_vector,
    fit_vector_rate,
    layout_spread,
    nnls,
    overlap_slowdown,
    roofline_time,
)
from executor.calibrate.measure import ProgressSink, WorkerJob, attention_flops, make_sweep, run_workers
from executor.calibrate.run import check_outputs
from executor.calibrate.spec import build_specs
from hwmodel import ClusterSpec, EfficiencyCurve, load_cluster, load_device
from hwmodel.catalog import clear_caches
from hwmodel.components import CollectiveFit, ComputeSpec, DeviceSpec, DtypeEfficiency, MemorySpec
from simulator.cost.collectives import collective_time
from simulator.cost.compute import layer_times, op_times, roofline
from simulator.cost.stage import overlapped
from workloads import ShardShape, WorkloadConfig, layer_profile
from workloads.ops import ATTENTION, MATRIX, VECTOR

MiB = 2**20


# ---- synthetic truth ----------------------------------------------------------------------------
# bf16 and fp32 reach their peaks differently (as on CPUs, where fp32 attention runs near the fp32 GEMM
# rate but bf16 attention far below the bf16 one): one shared set of curves cannot fit both.
FLOPS_TRUE = EfficiencyCurve(sizes=(1e5, 1e6, 1e7, 1e8, 1e9, 1e10), efficiencies=(0.1, 0.3, 0.6, 0.8, 0.95, 1.0))
DIM_TRUE = EfficiencyCurve(sizes=(8.0, 32.0, 128.0, 512.0, 2048.0), efficiencies=(0.4, 0.6, 0.8, 0.95, 1.0))
ATT_TRUE = EfficiencyCurve(sizes=(1e7, 1e8, 1e9, 1e10), efficiencies=(0.05, 0.12, 0.25, 0.4))
FLOPS_TRUE_FP32 = EfficiencyCurve(sizes=(1e5, 1e6, 1e7, 1e8, 1e9, 1e10), efficiencies=(0.35, 0.6, 0.8, 0.9, 0.97, 1.0))
DIM_TRUE_FP32 = EfficiencyCurve(sizes=(8.0, 32.0, 128.0, 512.0, 2048.0), efficiencies=(0.25, 0.45, 0.75, 1.0, 1.0))
ATT_TRUE_FP32 = EfficiencyCurve(sizes=(1e7, 1e8, 1e9, 1e10), efficiencies=(0.2, 0.35, 0.45, 0.5))
TRUTH = {
    "bf16": {"peak": 200e9, "flops": FLOPS_TRUE, "dim": DIM_TRUE, "attention": ATT_TRUE, "vector": 8e9},
    "fp32": {"peak": 100e9, "flops": FLOPS_TRUE_FP32, "dim": DIM_TRUE_FP32, "attention": ATT_TRUE_FP32, "vector": 5e9},
}
PEAKS = {d: t["peak"] for d, t in TRUTH.items()}
MEM_BW = 100e9
MEM_RATES = {
    4096: 20e9,
    16384: 60e9,
    65536: 90e9,
    262144: 100e9,
    MiB: 95e9,
    4 * MiB: 60e9,
    16 * MiB: 25e9,
    64 * MiB: 20e9,
    256 * MiB: 20e9,
}
MEM_TRUE = EfficiencyCurve(
    sizes=tuple(2.0 * b for b in sorted(MEM_RATES)),
    efficiencies=tuple(MEM_RATES[b] / MEM_BW for b in sorted(MEM_RATES)),
)
KERNEL_OVERHEAD = 20e-6
# One link figure for every kind (the joint fit's known answer) ...
LINK_BW, LINK_LAT = 1.5e9, 120e-6
# ... and each kind its own, as gloo on one box behaves (send/recv far faster than all-gather).
LINKS = {
    "all_reduce": (1.2e9, 150e-6),
    "all_gather": (0.4e9, 400e-6),
    "reduce_scatter": (0.5e9, 900e-6),
    "all_to_all": (1.0e9, 300e-6),
    "send_recv": (1.6e9, 100e-6),
}
SQUARES = (32, 64, 128, 256, 512, 1024, 2048)
LINEARS = ((8, 1024, 4096), (32, 1024, 4096), (128, 1024, 4096), (512, 1024, 4096), (8, 256, 1024), (32, 256, 1024))
GEMM_ZERO = 2e-6


def gemm_table(zero: float = GEMM_ZERO) -> list[dict]:
    rows = []
    for dtype, truth in TRUTH.items():
        shapes = [("square", n, n, n) for n in SQUARES] + [
            (v, t, k, n) for t, k, n in LINEARS for v in ("fwd", "dgrad", "wgrad")
        ]
        for variant, t, k, n in shapes:
            flops, dim = 2.0 * t * k * n, min(t, k, n)
            rows.append(
                {
                    "dtype": dtype,
                    "variant": variant,
                    "tokens": t,
                    "k": k,
                    "n": n,
                    "flops": flops,
                    "min_dim": dim,
                    "seconds": flops / (truth["peak"] * truth["flops"](flops) * truth["dim"](dim)) + zero,
                }
            )
    return rows


def collective_table(noise: float = 0.0, seed: int = 0, per_kind: bool = False, sizes=(2, 3, 4)) -> list[dict]:
    """Timings from the simulator's alpha-beta formulas: one link for all kinds, or `LINKS` per kind."""
    rng = np.random.default_rng(seed)
    rows = []
    for kind in COLLECTIVE_KINDS:
        bw, lat = LINKS[kind] if per_kind else (LINK_BW, LINK_LAT)
        for k in sizes:
            if kind == "send_recv" and k != 2:
                continue
            for nbytes in (4096, 65536, MiB, 16 * MiB, 64 * MiB):
                a, b = collective_coefficients(kind, k)
                t = a * nbytes / bw + b * lat
                rows.append(
                    {
                        "kind": kind,
                        "group_size": k,
                        "bytes": nbytes,
                        "seconds": t * math.exp(noise * rng.standard_normal()),
                    }
                )
    return rows


def synthetic_raw(collectives: list[dict] | None = None) -> dict:
    """What `calibrate` would collect on a machine with exactly the figures above."""
    copy_zero = 0.5e-6
    copy = [{"bytes": b, "seconds": 2 * b / MEM_RATES[b] + copy_zero} for b in sorted(MEM_RATES)]
    vector, vzero = [], {}
    for dtype, truth in TRUTH.items():
        e = 4 if dtype == "fp32" else 2
        for op in VECTOR_OPS:
            vzero[f"{dtype}/{op}"] = 1e-6
            for elems in (2**16, 2**18, 2**20, 2**22):
                f, b = VECTOR_COUNTS[op]
                vector.append(
                    {
                        "dtype": dtype,
                        "op": op,
                        "elems": elems,
                        "seconds": roofline_time(f * elems, b * e * elems, truth["vector"], MEM_BW, MEM_TRUE) + 1e-6,
                    }
                )
    attention = []
    for dtype, truth in TRUTH.items():
        peak, curve = truth["peak"], truth["attention"]
        for s in (128, 256, 512, 1024, 2048):
            f = attention_flops(1, 8, s, 64)
            fwd = f / (peak * curve(f)) + 5e-6
            bwd = 2.5 * f / (peak * curve(2.5 * f)) + 10e-6
            attention.append(
                {
                    "dtype": dtype,
                    "batch": 1,
                    "heads": 8,
                    "seq": s,
                    "head_dim": 64,
                    "fwd_flops": f,
                    "fwd_s": fwd,
                    "fwd_bwd_s": fwd + bwd,
                }
            )
    return {
        "ranks": 2,
        "threads_per_rank": 1,
        "curve_dtype": "bf16",
        "sweep": "synthetic",
        "clock": "thread CPU time",
        "sweep_vector_elems": [2**16, 2**22],
        "gemm": gemm_table(),
        "gemm_zero_s": {"bf16": GEMM_ZERO, "fp32": GEMM_ZERO},
        "gemm_dtypes": ["fp32", "bf16"],
        "attention": attention,
        "attention_zero": {d: {"fwd_s": 5e-6, "fwd_bwd_s": 15e-6} for d in PEAKS},
        "copy": copy,
        "copy_zero_s": copy_zero,
        "copy_per_rank": [[r["seconds"] for r in copy]] * 2,
        "vector": vector,
        "vector_zero_s": vzero,
        "overhead": {"layer_s": 25 * KERNEL_OVERHEAD, "layer_kernels": 25.0, "dispatch_s": 1.5e-6},
        "collectives": collectives if collectives is not None else collective_table(per_kind=True),
        "overlap": {"sigma": 0.4, "per_rank": [0.4, 0.4], "gemm_n": 512, "dtype": "bf16"},
        "per_rank_reserved_bytes": [250 * MiB, 260 * MiB],
        "unsupported": {},
        "storage": {
            "bytes": 128 * MiB,
            "write_s": 128 * MiB / 1e9,
            "read_s": 128 * MiB / 2e9,
            "latency_s": 80e-6,
            "free_bytes": 50e9,
            "filesystem": "ext4 on /dev/test",
            "page_cache_dropped": True,
        },
    }


def true_device() -> DeviceSpec:
    """The device the synthetic tables were generated from, as a spec with its own per-dtype curves."""
    per_dtype = {
        d: DtypeEfficiency(
            matrix_efficiency=t["flops"],
            matrix_dim_efficiency=t["dim"],
            attention_efficiency=t["attention"],
            vector_efficiency=0.5,
        )
        for d, t in TRUTH.items()
    }
    compute = ComputeSpec(
        matrix=dict(PEAKS),
        vector={d: t["vector"] / 0.5 for d, t in TRUTH.items()},
        kernel_overhead=KERNEL_OVERHEAD,
        per_dtype=per_dtype,
    )
    return DeviceSpec(
        name="truth",
        kind="cpu",
        compute=compute,
        memory=MemorySpec(capacity=8 * 2**30, bandwidth=MEM_BW, efficiency=MEM_TRUE),
    )


# ---- unit: fitting functions ---------------------------------------------------------------------
def test_nnls_satisfies_the_optimality_conditions():
    rng = np.random.default_rng(3)
    for _ in range(20):
        a = rng.normal(size=(30, 8))
        b = rng.normal(size=30)
        x = nnls(a, b)
        grad = a.T @ (a @ x - b)
        assert (x >= 0).all()
        assert np.allclose(grad[x > 1e-9], 0.0, atol=1e-8)  # free variables: stationary
        assert (grad[x <= 1e-9] >= -1e-8).all()  # bound variables: pushing them up would not help


def test_decade_nodes_cover_the_data_range():
    # Ends within a factor 2 of the outer powers of ten: the curve holds those values beyond them.
    assert decade_nodes([6.5e4, 1.7e10]) == [1e5, 1e6, 1e7, 1e8, 1e9, 1e10]
    # Ends further out get nodes of their own (two significant digits).
    assert decade_nodes([3.14e4, 5.4e10]) == [3.1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 5.4e10]
    assert decade_nodes([2e7, 5e7]) == [2e7, 5e7]
    assert decade_nodes([1e6, 1.2e6]) == [1.1e6]


def test_fit_curve_recovers_a_curve_sampled_at_its_nodes_and_between():
    truth = EfficiencyCurve(sizes=(1e6, 1e7, 1e8, 1e9), efficiencies=(0.2, 0.5, 0.7, 0.9))
    sizes = np.geomspace(1e6, 1e9, 25)
    curve = fit_curve(sizes, [truth(s) for s in sizes], nodes=truth.sizes)
    assert curve.sizes == truth.sizes
    assert np.allclose(curve.efficiencies, truth.efficiencies, atol=2e-3)
    assert all(0 < e <= 1 for e in curve.efficiencies)


def test_fit_matmul_recovers_each_dtypes_peak_and_curves_from_a_fake_timing_table():
    fit = fit_matmul(gemm_table(), "bf16", {"bf16": GEMM_ZERO, "fp32": GEMM_ZERO})
    assert isinstance(fit, MatmulFit) and set(fit.curves) == {"bf16", "fp32"}
    for dtype, truth in TRUTH.items():
        # The widest, largest GEMM reaches the true peak (both curves are 1 there): the best rate is the peak.
        assert fit.peaks[dtype] == pytest.approx(truth["peak"], rel=1e-6)
        flops_curve, dim_curve = fit.curves[dtype]
        for size in (1e6, 1e7, 1e8, 1e9, 1e10):
            assert flops_curve(size) == pytest.approx(truth["flops"](size), abs=0.05), (dtype, size)
        for dim in (8, 32, 128, 512, 2048):
            assert dim_curve(dim) == pytest.approx(truth["dim"](dim), abs=0.05), (dtype, dim)
        assert max(dim_curve.efficiencies) == 1.0
        assert all(0 < e <= 1 for e in flops_curve.efficiencies + dim_curve.efficiencies)
        # Never falling with size, like the project's other calibrated curves.
        assert list(flops_curve.efficiencies) == sorted(flops_curve.efficiencies)
        assert list(dim_curve.efficiencies) == sorted(dim_curve.efficiencies)
        assert fit.errors[dtype][1] < 0.02
    # The shared curves are the curve dtype's.
    assert fit.flops_curve is fit.curves["bf16"][0] and fit.dim_curve is fit.curves["bf16"][1]
    # For the record, what one shared set of curves would give: fp32 far off, bf16 the same.
    assert fit.shared_errors["fp32"][1] > 0.3 and fit.shared_errors["bf16"] == fit.errors["bf16"]


def test_fit_separable_fixes_the_split_between_the_two_curves():
    """Only the product is measured; the fit puts the widest dimension at 1 and everything <= 1."""
    flops = np.array([1e6, 1e8, 1e10, 1e6, 1e8, 1e10])
    dims = np.array([16.0, 16.0, 16.0, 1024.0, 1024.0, 1024.0])
    effs = np.array([0.2, 0.4, 0.5, 0.4, 0.8, 1.0])
    f, d = fit_separable(flops, dims, effs, np.array([1e6, 1e8, 1e10]), np.array([16.0, 1024.0]))
    assert d[-1] == pytest.approx(1.0) and d[0] == pytest.approx(0.5, rel=1e-6)
    assert np.allclose(f, [0.4, 0.8, 1.0], rtol=1e-6)


def test_fit_memory_takes_the_best_rate_and_subtracts_the_fixed_cost():
    zero = 1e-6
    points = [{"bytes": b, "seconds": 2 * b / r + zero} for b, r in ((65536, 50e9), (MiB, 80e9), (64 * MiB, 20e9))]
    bandwidth, curve = fit_memory(points, zero)
    assert bandwidth == pytest.approx(80e9)
    assert curve.sizes == (2 * 65536.0, 2.0 * MiB, 128.0 * MiB)  # keyed by bytes moved: read + write
    assert curve.efficiencies == pytest.approx((50 / 80, 1.0, 20 / 80), abs=1e-4)
    # Sizes dominated by the fixed cost are left out.
    _, curve2 = fit_memory(points + [{"bytes": 64, "seconds": 1.2 * zero}], zero)
    assert curve2.sizes == curve.sizes


def test_fit_vector_rate_reproduces_the_total_time_through_the_roofline():
    mem = EfficiencyCurve.flat(0.5)
    ops = []
    for flops, nbytes in ((5e6, 8e6), (8e6, 8e6), (1e6, 12e6), (4e7, 1e6)):
        ops.append((flops, nbytes, roofline_time(flops, nbytes, 3e9, 20e9, mem)))
    assert fit_vector_rate(ops, 20e9, mem) == pytest.approx(3e9, rel=1e-6)


def test_fit_vector_gives_each_dtype_its_rate_as_peak_times_efficiency():
    raw = synthetic_raw()
    fits = fit_vector(raw["vector"], raw["vector_zero_s"], MEM_BW, MEM_TRUE)
    assert set(fits) == {"fp32", "bf16"}
    for dtype, truth in TRUTH.items():
        assert fits[dtype].peak * fits[dtype].efficiency == pytest.approx(truth["vector"], rel=1e-6)
        assert 0 < fits[dtype].efficiency <= 1 and fits[dtype].errors[1] < 1e-6


def test_layout_spread_finds_gemms_of_one_shape_that_run_apart():
    rows = [
        {"dtype": "fp16", "variant": v, "tokens": 8, "k": 512, "n": 2048, "flops": 2.0 * 8 * 512 * 2048, "seconds": s}
        for v, s in (("fwd", 1e-3), ("dgrad", 8e-3), ("wgrad", 4e-3))
    ]
    rows += [dict(r, dtype="fp32", seconds=1e-3 * (1.1 if r["variant"] == "wgrad" else 1.0)) for r in rows]
    spread = layout_spread(rows)
    assert spread["fp16"] == pytest.approx(8.0) and spread["fp32"] == pytest.approx(1.1)


def test_alpha_beta_recovers_a_known_link():
    fit = fit_alpha_beta(collective_table())
    assert fit.bandwidth == pytest.approx(LINK_BW, rel=1e-6)
    assert fit.latency == pytest.approx(LINK_LAT, rel=1e-6)
    assert all(med < 1e-6 and mx < 1e-6 for med, mx in fit.errors.values())
    noisy = fit_alpha_beta(collective_table(noise=0.05, seed=1))
    assert noisy.bandwidth == pytest.approx(LINK_BW, rel=0.1)
    assert noisy.latency == pytest.approx(LINK_LAT, rel=0.15)


def _with_link_fits(cluster: ClusterSpec, fits: dict[str, CollectiveFit]) -> ClusterSpec:
    node = cluster.node_groups[0].node
    intra = node.intra_node.model_copy(update={"collectives": fits})
    group = cluster.node_groups[0].model_copy(update={"node": node.model_copy(update={"intra_node": intra})})
    return cluster.replaced(node_groups=(group,))


def test_alpha_beta_formulas_are_the_simulators():
    """The fitted model is exactly `collective_time` over one node, for every kind and group size
    (min(p-1, ceil(log2 p)) latency steps, all-reduce two phases, send/recv a ring of p-1 steps), with
    the link's own figures and with a fit of each kind's own."""
    plain = load_cluster("cpu-local", devices_per_node=8)
    fitted = _with_link_fits(plain, {k: CollectiveFit(bandwidth=bw, latency=lat) for k, (bw, lat) in LINKS.items()})
    link = plain.node_groups[0].node.intra_node
    assert set(COLLECTIVE_KINDS) == {"all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv"}
    for kind in COLLECTIVE_KINDS:
        for k in range(2, 9):
            a, b = collective_coefficients(kind, k)
            for cluster, (bw, lat) in ((plain, (link.effective_bandwidth, link.latency)), (fitted, LINKS[kind])):
                span = cluster.span(range(k))
                for nbytes in (4096.0, 1e6, 1e8):
                    assert collective_time(kind, nbytes, span) == pytest.approx(a * nbytes / bw + b * lat, rel=1e-12), (
                        kind,
                        k,
                    )
    # A pipeline send between two devices of the node is one send/recv step.
    path = fitted.path(0, 1)
    assert (path.bandwidth, path.latency) == LINKS["send_recv"]


def test_fit_collectives_recovers_each_kinds_link_figures():
    samples = collective_table(per_kind=True, sizes=(2, 3, 4, 8))
    joint, by_kind = fit_collectives(samples)
    assert set(by_kind) == set(COLLECTIVE_KINDS)
    for kind, (bw, lat) in LINKS.items():
        assert by_kind[kind].bandwidth == pytest.approx(bw, rel=1e-6), kind
        assert by_kind[kind].latency == pytest.approx(lat, rel=1e-6), kind
        assert by_kind[kind].errors[kind][1] < 1e-6
        # The one joint figure cannot fit kinds this different.
        assert joint.errors[kind][1] > 0.1
    bandwidths = [bw for bw, _ in LINKS.values()]
    assert min(bandwidths) < joint.bandwidth < max(bandwidths)
    # Noisy timings: each kind's fit stays close, and its errors are its residuals.
    _, noisy = fit_collectives(collective_table(noise=0.05, seed=2, per_kind=True, sizes=(2, 3, 4, 8)))
    for kind, (bw, lat) in LINKS.items():
        assert noisy[kind].bandwidth == pytest.approx(bw, rel=0.1), kind
        assert noisy[kind].latency == pytest.approx(lat, rel=0.25), kind
        assert 0 < noisy[kind].errors[kind][0] < 0.1
    # A kind timed at one message size cannot tell bandwidth from latency: no fit of its own.
    one_size = [s for s in samples if s["kind"] != "all_to_all" or (s["bytes"] == MiB and s["group_size"] == 2)]
    assert "all_to_all" not in fit_collectives(one_size)[1]


def test_overlap_slowdown_inverts_the_simulators_overlap_model():
    for sigma in (0.0, 0.3, 0.8):
        alone = 1.0
        # Communication outlasting the compute: the compute loop takes alone * (1 + sigma).
        assert overlap_slowdown(alone, alone * (1 + sigma), 5.0) == pytest.approx(sigma)
        # Communication ending first: the pair takes `overlapped`, which the compute loop ends.
        comm = 0.5
        during = overlapped(alone, comm, sigma)
        assert overlap_slowdown(alone, during, comm) == pytest.approx(sigma, abs=1e-12)
    assert overlap_slowdown(1.0, 3.0, 10.0) == 1.0  # clamped like the spec field


def test_build_specs_on_synthetic_timings_gives_the_true_figures():
    cal = build_specs(synthetic_raw(), name="synthetic-box", device_type="cpu")
    dev, node = cal.device, cal.cluster.node_groups[0].node
    c = dev.compute
    assert c.matrix["bf16"] == pytest.approx(PEAKS["bf16"], rel=1e-3)
    assert c.matrix["fp32"] == pytest.approx(PEAKS["fp32"], rel=1e-3)
    assert c.kernel_overhead == pytest.approx(KERNEL_OVERHEAD, rel=1e-2)
    assert c.comm_overlap_slowdown == pytest.approx(0.4)
    for dtype, truth in TRUTH.items():
        assert c.peak(dtype, "vector") * c.efficiencies(dtype)[3] == pytest.approx(truth["vector"], rel=0.01)
    assert dev.memory.bandwidth == pytest.approx(MEM_BW, rel=1e-3)
    assert dev.memory.reserved == pytest.approx(260 * MiB, rel=1e-3)
    assert node.num_devices == 2 and node.intra_node.kind.value == "shared_memory"
    assert node.storage.read_bandwidth == pytest.approx(2e9, rel=1e-3)
    assert node.storage.write_bandwidth == pytest.approx(1e9, rel=1e-3)
    assert node.storage.latency == pytest.approx(80e-6, rel=1e-2)
    # Every dtype its own curves; the shared ones are the curve dtype's (bf16).
    assert set(c.per_dtype) == {"fp32", "bf16"}
    for dtype, truth in TRUTH.items():
        own = c.per_dtype[dtype]
        assert None not in (
            own.matrix_efficiency,
            own.matrix_dim_efficiency,
            own.attention_efficiency,
            own.vector_efficiency,
        )
        for size in (1e6, 1e8, 1e10):
            assert own.matrix_efficiency(size) == pytest.approx(truth["flops"](size), abs=0.05), (dtype, size)
        for size in (3e7, 1e8, 1e9, 1e10):
            assert own.attention_efficiency(size) == pytest.approx(truth["attention"](size), rel=0.02), (dtype, size)
    assert c.matrix_efficiency == c.per_dtype["bf16"].matrix_efficiency
    assert c.attention_efficiency == c.per_dtype["bf16"].attention_efficiency
    assert c.vector_efficiency == c.per_dtype["bf16"].vector_efficiency
    for curve in (c.matrix_efficiency, c.matrix_dim_efficiency, c.attention_efficiency, dev.memory.efficiency):
        assert all(0 < e <= 1 for e in curve.efficiencies)
    # Every collective kind its own figures; the link's own are the joint fit, between them.
    intra = node.intra_node
    assert set(intra.collectives) == set(COLLECTIVE_KINDS)
    for kind, (bw, lat) in LINKS.items():
        assert intra.achieved(kind) == pytest.approx((bw, lat), rel=2e-3), kind
    assert min(bw for bw, _ in LINKS.values()) < intra.effective_bandwidth < max(bw for bw, _ in LINKS.values())
    assert intra.peak_bandwidth == pytest.approx(max(bw for bw, _ in LINKS.values()), rel=2e-3)
    # Every figure says where it comes from.
    assert all("measured" in text for text in dev.sources.values() if "not measured" not in text)
    assert "measured" in intra.sources["bandwidth"] and "min(p-1, ceil(log2 p))" in intra.sources["collectives"]
    assert all(f"collectives.{k}" in intra.sources for k in COLLECTIVE_KINDS)
    assert "per_dtype" in dev.sources["compute.matrix"] and "bf16's" in dev.sources["compute.matrix_efficiency"]
    assert "per_dtype:" in cal.cluster_yaml() and "collectives:" in cal.cluster_yaml()


def test_per_dtype_curves_reproduce_each_dtypes_timings_through_the_simulator():
    """GEMMs, attention and elementwise ops of fp32 and bf16, each through `op_times` on the spec the
    calibration built, in that dtype's roofline; and whole GPT layers through `layer_times` against the
    device the tables came from."""
    raw = synthetic_raw()
    dev = build_specs(raw, name="synthetic-box", device_type="cpu").device
    shared_only = dev.model_copy(update={"compute": dev.compute.model_copy(update={"per_dtype": {}})})
    for dtype in ("fp32", "bf16"):
        line = roofline(dev, dtype)
        gemms = [r for r in raw["gemm"] if r["dtype"] == dtype]
        flops = np.array([r["flops"] for r in gemms])
        predicted = op_times(
            flops,
            np.zeros_like(flops),
            np.zeros_like(flops),
            np.full(len(gemms), MATRIX),
            np.array([float(r["min_dim"]) for r in gemms]),
            line,
        )
        measured = np.array([r["seconds"] - GEMM_ZERO for r in gemms])
        assert np.abs(predicted / measured - 1).max() < 0.02, dtype
        # Attention: forward at its FLOPs, backward at 2.5x (the simulator's counts), fixed costs apart.
        att = [r for r in raw["attention"] if r["dtype"] == dtype]
        f = np.array([r["fwd_flops"] for r in att])
        both = np.concatenate([f, 2.5 * f])
        predicted = op_times(
            both, np.zeros_like(both), np.zeros_like(both), np.full(len(both), ATTENTION), np.ones_like(both), line
        )
        measured = np.array([r["fwd_s"] - 5e-6 for r in att] + [r["fwd_bwd_s"] - r["fwd_s"] - 10e-6 for r in att])
        assert np.abs(predicted / measured - 1).max() < 0.02, dtype
        # Elementwise ops: the vector roofline with the dtype's element size.
        vec = [r for r in raw["vector"] if r["dtype"] == dtype]
        e = 4 if dtype == "fp32" else 2
        vf = np.array([VECTOR_COUNTS[r["op"]][0] * r["elems"] for r in vec])
        vb = np.array([VECTOR_COUNTS[r["op"]][1] * e * r["elems"] for r in vec])
        predicted = op_times(vf, vb, np.zeros_like(vf), np.full(len(vec), VECTOR), np.ones_like(vf), line)
        measured = np.array([r["seconds"] - 1e-6 for r in vec])
        assert np.abs(predicted / measured - 1).max() < 0.02, dtype
    # A layer the fits never saw: the calibrated spec predicts the true device's layer time in both dtypes.
    truth = true_device()
    cfg = WorkloadConfig(
        name="check", family="gpt", num_layers=1, hidden_size=512, num_heads=8, vocab_size=1024, seq_len=256
    )
    for dtype, nbytes in (("fp32", 4), ("bf16", 2)):
        profile = layer_profile(cfg, "decoder", ShardShape(micro_batch=2, seq_len=256, dtype_bytes=nbytes))
        want = layer_times(profile, roofline(truth, dtype))
        got = layer_times(profile, roofline(dev, dtype))
        assert got.forward == pytest.approx(want.forward, rel=0.02), dtype
        assert got.backward == pytest.approx(want.backward, rel=0.02), dtype
        assert got.recompute_selective == pytest.approx(want.recompute_selective, rel=0.02), dtype
        if dtype == "fp32":
            # Without its own curves fp32 would borrow bf16's: the test can tell.
            wrong = layer_times(profile, roofline(shared_only, dtype))
            assert abs(wrong.forward + wrong.backward - want.forward - want.backward) > 0.1 * (
                want.forward + want.backward
            )


def test_a_dtype_measured_in_part_gets_what_was_measured():
    """fp16 on a CPU: two GEMMs (the rest skipped as too slow), its elementwise ops, no attention. Its
    entry holds its own GEMM curves and vector efficiency; attention falls back to the shared curve."""
    raw = synthetic_raw()
    for n in (32, 64):
        flops = 2.0 * n**3
        raw["gemm"].append(
            {
                "dtype": "fp16",
                "variant": "square",
                "tokens": n,
                "k": n,
                "n": n,
                "flops": flops,
                "min_dim": n,
                "seconds": flops / 3e9 + GEMM_ZERO,
            }
        )
    raw["gemm_zero_s"]["fp16"] = GEMM_ZERO
    raw["vector"] += [dict(r, dtype="fp16", seconds=2 * r["seconds"]) for r in raw["vector"] if r["dtype"] == "bf16"]
    raw["vector_zero_s"].update(
        {k.replace("bf16", "fp16"): v for k, v in raw["vector_zero_s"].items() if k.startswith("bf16")}
    )
    raw["unsupported"]["matmul fp16"] = "12 GEMM(s) skipped: too slow"
    cal = build_specs(raw, name="synthetic-box", device_type="cpu")
    c = cal.device.compute
    own = c.per_dtype["fp16"]
    assert c.matrix["fp16"] == pytest.approx(3e9, rel=1e-3)
    assert own.matrix_efficiency is not None and own.vector_efficiency is not None and own.attention_efficiency is None
    assert c.efficiencies("fp16")[2] == c.attention_efficiency
    line = roofline(cal.device, "fp16")
    flops = np.array([2.0 * 32**3, 2.0 * 64**3])
    predicted = op_times(flops, np.zeros(2), np.zeros(2), np.full(2, MATRIX), np.array([32.0, 64.0]), line)
    assert predicted == pytest.approx(flops / 3e9, rel=2e-3)
    assert "matmul fp16" in cal.device.sources["compute.per_dtype"]


def test_collective_fits_reproduce_each_kind_through_collective_time():
    """On the written cluster, `collective_time` gives each kind's measured timings within that kind's
    fit residual (noisy timings: the spec's rounding to four digits is all that is added)."""
    samples = collective_table(noise=0.08, seed=5, per_kind=True, sizes=(2, 3, 4))
    cal = build_specs(synthetic_raw(samples), name="synthetic-box", device_type="cpu")
    cluster = cal.cluster.with_devices_per_node(4)
    by_kind = cal.fits["link_by_kind"]
    for kind in COLLECTIVE_KINDS:
        rows = [r for r in samples if r["kind"] == kind]
        rel = [
            abs(collective_time(kind, r["bytes"], cluster.span(range(r["group_size"]))) / r["seconds"] - 1)
            for r in rows
        ]
        med, mx = by_kind[kind].errors[kind]
        assert max(rel) <= mx + 2e-3, kind
        assert float(np.median(rel)) == pytest.approx(med, abs=2e-3), kind
        # Far closer than the one joint figure for every kind.
        assert med < cal.fits["link"].errors[kind][0] or med < 0.05


def test_build_specs_round_trips_through_yaml(tmp_path):
    cal = build_specs(synthetic_raw(), name="synthetic-box", device_type="cpu")
    path = tmp_path / "box.yaml"
    path.write_text(cal.cluster_yaml())
    clear_caches()
    loaded = load_cluster(str(path))
    # (Specs are compared through model_dump: `==` on an EfficiencyCurve trips on its numpy arrays.)
    assert loaded.model_dump() == cal.cluster.model_dump()
    again = ClusterSpec.model_validate(loaded.model_dump())
    assert again.model_dump() == loaded.model_dump()
    device_path = tmp_path / "box-device.yaml"
    device_path.write_text(cal.device_yaml())
    assert load_device(str(device_path)).model_dump() == cal.device.model_dump()
    # Human units in the file, never bare SI numbers (the catalog loads with strict units).
    text = path.read_text()
    assert "GFLOPS" in text and "GB/s" in text and " us" in text and "KiB" in text


def test_check_outputs_refuses_before_measuring(tmp_path):
    existing = tmp_path / "have.yaml"
    existing.write_text("keep me")
    with pytest.raises(CalibrationError, match=r"already exists.*--force"):
        check_outputs(existing, None, force=False)
    check_outputs(existing, None, force=True)
    with pytest.raises(CalibrationError, match=r"\*\.yaml"):
        check_outputs(tmp_path / "spec.txt", None, force=False)
    with pytest.raises(CalibrationError, match="does not exist"):
        check_outputs(tmp_path / "missing" / "spec.yaml", None, force=False)
    with pytest.raises(CalibrationError, match="same file"):
        check_outputs(tmp_path / "a.yaml", tmp_path / "a.yaml", force=False)
    assert existing.read_text() == "keep me"


# ---- the command -------------------------------------------------------------------------------
class Run:
    def __init__(self, code: int, out: str, err: str, seconds: float):
        self.code, self.out, self.err, self.seconds = code, out, err, seconds


def run_cli(monkeypatch, *args) -> Run:
    """`python -m executor.calibrate.cli ARGS` in-process, through its console entry point."""
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(cli, "out", Console(file=out, width=120))
    monkeypatch.setattr(cli, "err", Console(file=err, width=120))
    monkeypatch.setattr(sys, "argv", ["calibrate", *[str(a) for a in args]])
    start = time.monotonic()
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return Run(code, out.getvalue(), err.getvalue(), time.monotonic() - start)


@pytest.mark.parametrize(
    "args, message",
    [
        (("--ranks", "0"), "--ranks 0"),
        (("--curve-dtype", "fp8"), "--curve-dtype 'fp8'"),
        (("--storage-dir", "/no/such/dir"), "no such directory"),
        (("--name", "two words"), "--name"),
        (("--baseline", "no-such-cluster"), "unknown cluster"),
        (("--timeout", "0"), "--timeout"),
    ],
)
def test_bad_options_exit_2_before_measuring(monkeypatch, tmp_path, args, message):
    result = run_cli(monkeypatch, "--out", tmp_path / "spec.yaml", "--quick", *args)
    assert result.code == 2, result.err
    assert message in result.err and "Traceback" not in result.err
    assert result.seconds < 10
    assert not (tmp_path / "spec.yaml").exists()


def test_help_runs_standalone():
    proc = subprocess.run(
        [sys.executable, "-m", "executor.calibrate.cli", "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    for option in ("--out", "--device-out", "--name", "--ranks", "--quick", "--storage-dir", "--force"):
        assert option in proc.stdout


def test_quick_calibration_writes_a_spec_simulate_uses(monkeypatch, tmp_path, simulate):
    out, device_out, raw = tmp_path / "box.yaml", tmp_path / "box-device.yaml", tmp_path / "box.json"
    result = run_cli(
        monkeypatch,
        "--out",
        out,
        "--device-out",
        device_out,
        "--raw",
        raw,
        "--quick",
        "--ranks",
        "2",
        "--storage-dir",
        tmp_path,
        "--name",
        "test-box",
    )
    assert result.code == 0, result.err
    # No progress bars here: stderr is not a terminal (tests/hwmodel covers when the bar is drawn).
    assert "matmul throughput" not in result.err
    assert "measured on this machine vs catalog cpu-local" in result.out

    clear_caches()
    cluster = load_cluster(str(out))
    assert cluster.name == "test-box" and cluster.num_devices == 2
    node = cluster.node_groups[0].node
    dev = node.device
    assert dev.name == "test-box-device" and dev.kind == "cpu"
    assert load_device(str(device_out)).model_dump() == dev.model_dump()
    c = dev.compute
    assert {"fp32", "bf16"} <= set(c.matrix) and all(v > 1e8 for v in c.matrix.values() if v)
    assert all(v > 0 for v in c.vector.values())
    for curve in (c.matrix_efficiency, c.matrix_dim_efficiency, c.attention_efficiency, dev.memory.efficiency):
        assert all(0 < e <= 1 for e in curve.efficiencies)
    assert len(c.matrix_efficiency.sizes) >= 2 and len(c.matrix_dim_efficiency.sizes) >= 2
    assert 0 < c.vector_efficiency <= 1 and 0 <= c.comm_overlap_slowdown <= 1
    assert 1e-7 < c.kernel_overhead < 1e-2
    assert dev.memory.bandwidth > 1e9 and 0 < dev.memory.reserved < dev.memory.capacity
    for link in (node.intra_node, node.host_link):
        assert link.effective_bandwidth > 1e6 and 0 <= link.latency < 0.1
    assert node.host.num_cores >= 1 and node.host.memory >= dev.memory.capacity
    assert node.storage.read_bandwidth > 1e6 and node.storage.write_bandwidth > 1e6 and node.storage.latency > 0
    assert "measured by `execute calibrate`" in dev.sources["compute.matrix"]
    assert list(tmp_path.glob("hetplan-calibrate-*")) == []  # the storage benchmark cleaned up

    timings = json.loads(raw.read_text())
    assert {r["kind"] for r in timings["collectives"]} >= {"all_reduce", "all_gather", "send_recv"}
    assert timings["ranks"] == 2

    # Every measured dtype has its own curves; the shared ones are the curve dtype's (bf16).
    assert {"fp32", "bf16"} <= set(c.per_dtype)
    for dtype in ("fp32", "bf16"):
        own = c.per_dtype[dtype]
        assert None not in (
            own.matrix_efficiency,
            own.matrix_dim_efficiency,
            own.attention_efficiency,
            own.vector_efficiency,
        )
    assert c.matrix_efficiency == c.per_dtype["bf16"].matrix_efficiency
    # Each dtype's GEMMs through `op_times` on the written spec, as closely as its fit says.
    mm = fit_matmul(timings["gemm"], timings["curve_dtype"], timings["gemm_zero_s"])
    for dtype in ("fp32", "bf16"):
        zero = timings["gemm_zero_s"][dtype]
        rows = [r for r in timings["gemm"] if r["dtype"] == dtype and r["seconds"] >= RESOLVABLE * zero]
        flops = np.array([r["flops"] for r in rows])
        predicted = op_times(
            flops,
            np.zeros_like(flops),
            np.zeros_like(flops),
            np.full(len(rows), MATRIX),
            np.array([float(r["min_dim"]) for r in rows]),
            roofline(dev, dtype),
        )
        rel = np.abs(predicted / np.array([r["seconds"] - zero for r in rows]) - 1)
        assert float(np.median(rel)) == pytest.approx(mm.errors[dtype][0], abs=5e-3), dtype
    # Each collective kind its own fit, which `collective_time` on the written spec reproduces within
    # that fit's residual (fitted again here from the raw timings).
    intra = node.intra_node
    kinds = {"all_reduce", "all_gather", "reduce_scatter", "send_recv"} | ({"all_to_all"} - set(timings["unsupported"]))
    assert kinds <= set(intra.collectives)
    _, by_kind = fit_collectives(timings["collectives"])
    for kind, fit in by_kind.items():
        rows = [r for r in timings["collectives"] if r["kind"] == kind]
        rel = [
            abs(collective_time(kind, r["bytes"], cluster.span(range(r["group_size"]))) / r["seconds"] - 1)
            for r in rows
        ]
        # The spec writes 3-4 significant digits: allow their rounding on top of the fit's own residual.
        assert max(rel) <= fit.errors[kind][1] * 1.01 + 5e-3, kind
        assert float(np.median(rel)) == pytest.approx(fit.errors[kind][0], abs=5e-3), kind
    assert "per_dtype:" in out.read_text() and "collectives:" in out.read_text()

    # The YAML round-trips: what hwmodel reads back validates to the same spec.
    assert ClusterSpec.model_validate(cluster.model_dump()).model_dump() == cluster.model_dump()
    assert yaml.safe_load(out.read_text())["node_groups"][0]["node"]["device"]["name"] == "test-box-device"

    # simulate accepts it, for one rank and for both.
    for plan in (
        "micro_batch=1,global_batch=2",
        "tp=2,micro_batch=1,global_batch=2",
        "pp=2,micro_batch=1,global_batch=4,dtype=fp32",
    ):
        sim = simulate("run", "--cluster", out, "--workload", "gpt3-125m", "--seq-len", "128", "--plan", plan, "--json")
        assert sim.code == 0, sim.err
        report = json.loads(sim.out)
        assert report["iteration_time_s"] > 0 and report["cluster"] == "test-box"

    # Never replaced without --force, and refused before measuring.
    before = out.read_text()
    again = run_cli(monkeypatch, "--out", out, "--quick")
    assert again.code == 2 and "already exists" in again.err and "--force" in again.err
    assert again.seconds < 10 and out.read_text() == before


def test_a_failing_benchmark_rank_is_named_through_the_launcher():
    # The ranks start through executor.launch.start_ranks; a rank that raises stops the run, and the
    # error names it and its cause (an unknown dtype: the GEMM phase looks it up and fails).
    job = WorkerJob(
        world_size=1,
        device_type="cpu",
        threads=1,
        sweep=make_sweep(True, "cpu"),
        dtypes=("no-such-dtype",),
        curve_dtype="no-such-dtype",
        device_phase=True,
        group_sizes=(),
        overlap=False,
    )
    with pytest.raises(CalibrationError, match=r"benchmark rank 0 of 1 failed: KeyError: 'no-such-dtype'"):
        run_workers(job, ProgressSink(), timeout_s=120)
