"""Calibration's fits: the timings `executor.calibrate.run` measures, turned into the spec's figures.

Pure functions of the measured points (unit-tested on synthetic data in
tests/executor/calibrate/test_calibrate.py): efficiency
curves in log size with the interpolation `EfficiencyCurve` uses, the separable GEMM fit (FLOPs x smallest
dimension), attention, memory-copy and elementwise rates under the simulator's roofline, alpha-beta fits of
each collective kind with the simulator's formula, and the compute slowdown while communication overlaps.
The names of what is measured (collective kinds, elementwise ops and their FLOP and byte counts) live
here too, since the fits read them as much as the benchmark workers do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from hwmodel.curves import EfficiencyCurve
from hwmodel.errors import UserError

# Every kind `simulator.cost.collectives` costs; send/recv is measured between two ranks only.
COLLECTIVE_KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv")
VECTOR_OPS = ("layer_norm", "rms_norm", "add", "gelu", "silu_mul", "softmax")
# FLOPs and bytes per element as `workloads.transformer` counts them (bytes in units of the element
# size e): norms 5 FLOPs and 2e, residual add 1 and 3e, GELU 8 and 2e, SwiGLU 4 and 5e, softmax 5 and 2e.
VECTOR_COUNTS = {
    "layer_norm": (5.0, 2.0),
    "rms_norm": (5.0, 2.0),
    "add": (1.0, 3.0),
    "gelu": (8.0, 2.0),
    "silu_mul": (4.0, 5.0),
    "softmax": (5.0, 2.0),
}
# A point enters a curve only when the operation takes at least this multiple of its fixed cost: below
# it the size-dependent part is lost in the noise of the fixed part.
RESOLVABLE = 1.5
EFF_FLOOR = 1e-3
VECTOR_RATE_CAP = 1e18  # fit_vector_rate's answer when memory alone explains the time


class CalibrationError(UserError):
    """Calibration cannot run as asked (bad option, no device, a benchmark process failed)."""


def overlap_slowdown(alone: float, during: float, comm: float) -> float:
    """sigma such that compute running at 1 / (1 + sigma) while communication lasts `comm` seconds
    turns `alone` seconds of work into `during` seconds (clamped to [0, 1] like the spec field)."""
    if alone <= 0:
        return 0.0
    if comm >= during:
        sigma = during / alone - 1.0
    else:
        # Slowed for `comm` seconds, full speed after: during = comm + alone - comm / (1 + sigma).
        rest = comm + alone - during
        sigma = comm / rest - 1.0 if rest > 0 else 1.0
    return min(1.0, max(0.0, sigma))


def _hat_basis(x: np.ndarray, nodes: np.ndarray) -> np.ndarray:
    """Rows: for each x, the weights of linear interpolation between `nodes` (held constant beyond the
    ends), exactly as `EfficiencyCurve` interpolates (in log size)."""
    basis = np.zeros((len(x), len(nodes)))
    if len(nodes) == 1:
        basis[:, 0] = 1.0
        return basis
    for i, xi in enumerate(x):
        if xi <= nodes[0]:
            basis[i, 0] = 1.0
        elif xi >= nodes[-1]:
            basis[i, -1] = 1.0
        else:
            j = int(np.searchsorted(nodes, xi, side="right"))
            frac = (xi - nodes[j - 1]) / (nodes[j] - nodes[j - 1])
            basis[i, j - 1] = 1.0 - frac
            basis[i, j] = frac
    return basis


def _smoothness(n: int, weight: float) -> np.ndarray:
    """Second-difference rows: nodes with little data follow their neighbours instead of drifting."""
    rows = np.zeros((max(0, n - 2), n))
    for i in range(n - 2):
        rows[i, i : i + 3] = (weight, -2 * weight, weight)
    return rows


def decade_nodes(sizes: Sequence[float] | np.ndarray) -> list[float]:
    """Curve nodes for data spanning `sizes`: the powers of ten inside the range, plus the range's
    ends (rounded to two significant digits) where they lie more than a factor 2 beyond the outer
    powers of ten -- the curve is held constant beyond its ends, so data out there needs a node."""
    lo, hi = float(min(sizes)), float(max(sizes))
    if hi / lo < 1.5:
        return [float(f"{math.sqrt(lo * hi):.2g}")]
    nodes = [10.0**e for e in range(math.ceil(math.log10(lo) - 1e-9), math.floor(math.log10(hi) + 1e-9) + 1)]
    lo_r, hi_r = float(f"{lo:.2g}"), float(f"{hi:.2g}")
    if not nodes or nodes[0] / lo > 2.0:
        nodes.insert(0, lo_r)
    if not nodes or hi / nodes[-1] > 2.0:
        nodes.append(hi_r)
    return sorted(set(nodes))


def fit_curve(sizes: Sequence[float], effs: Sequence[float], nodes: Sequence[float] | None = None) -> EfficiencyCurve:
    """An efficiency curve through measured (size, efficiency) points.

    Least squares on the relative error, with the curve's own interpolation (linear in log size,
    constant beyond the ends), nodes at `nodes` (default: `decade_nodes`). Efficiencies end in
    (0, 1].
    """
    x = np.asarray(sizes, dtype=float)
    y = np.clip(np.asarray(effs, dtype=float), EFF_FLOOR, None)
    at = np.asarray(sorted(nodes if nodes is not None else decade_nodes(x)), dtype=float)
    basis = _hat_basis(np.log(x), np.log(at))
    # Dividing each row by its measured efficiency makes the residuals relative errors.
    a = basis / y[:, None]
    b = np.ones(len(x))
    reg = _smoothness(len(at), 1e-3)
    coef, *_ = np.linalg.lstsq(np.vstack([a, reg]), np.concatenate([b, np.zeros(len(reg))]), rcond=None)
    coef = np.clip(coef, EFF_FLOOR, 1.0)
    return EfficiencyCurve(sizes=tuple(float(n) for n in at), efficiencies=tuple(round(float(c), 4) for c in coef))


def nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """min ||a x - b|| subject to x >= 0 (Lawson and Hanson's active-set method; deterministic)."""
    m, n = a.shape
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    tol = 10 * np.finfo(float).eps * np.abs(a).sum(axis=0).max(initial=1.0) * max(m, n)
    w = a.T @ (b - a @ x)
    for _ in range(3 * n + 10):
        if passive.all() or w[~passive].max(initial=-np.inf) <= tol:
            break
        candidates = np.where(~passive, w, -np.inf)
        passive[int(np.argmax(candidates))] = True
        while True:
            z = np.zeros(n)
            z[passive], *_ = np.linalg.lstsq(a[:, passive], b, rcond=None)
            if (z[passive] > tol).all():
                break
            bad = passive & (z <= tol)
            alpha = np.min(x[bad] / (x[bad] - z[bad]))
            x = x + alpha * (z - x)
            passive &= x > tol
            x[~passive] = 0.0
        x = z
        w = a.T @ (b - a @ x)
    return x


@dataclass(frozen=True)
class MatmulFit:
    """Matrix peaks and efficiency curves per dtype, with how well they reproduce each dtype's GEMMs.

    `curves[dtype]` is (matrix_efficiency, matrix_dim_efficiency) fitted on that dtype's GEMMs alone,
    relative to `peaks[dtype]`; the curve dtype's pair is also the spec's shared one. `shared_errors`
    is what sharing the curve dtype's curves among all dtypes (other dtypes at the peak that best
    reproduces their total time, as calibrations before `per_dtype` did) would give, for the record.
    """

    curve_dtype: str
    peaks: dict[str, float]
    curves: dict[str, tuple[EfficiencyCurve, EfficiencyCurve]]
    errors: dict[str, tuple[float, float]]  # dtype -> (median |rel err|, max |rel err|) of predicted time
    shared_errors: dict[str, tuple[float, float]] = field(default_factory=dict)
    shared_peaks: dict[str, float] = field(default_factory=dict)  # the peaks that go with shared_errors

    @property
    def flops_curve(self) -> EfficiencyCurve:
        """The curve dtype's `matrix_efficiency`: the spec's shared curve."""
        return self.curves[self.curve_dtype][0]

    @property
    def dim_curve(self) -> EfficiencyCurve:
        """The curve dtype's `matrix_dim_efficiency`: the spec's shared curve."""
        return self.curves[self.curve_dtype][1]


def fit_separable(
    flops: np.ndarray, dims: np.ndarray, effs: np.ndarray, f_nodes: np.ndarray, d_nodes: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Efficiencies at the nodes of two curves whose product fits `effs`: E_f(flops) * E_d(dim).

    Each curve is piecewise linear in log size on its nodes, as `EfficiencyCurve` interpolates, and never
    falls with size (as benchmarks/calibrate_llm_foundry.py assumes). Written as non-negative
    increments from the top: E_d is 1 at its widest node, E_f is at most 1, so both lie in (0, 1] and
    the split between the two, which the product alone leaves open, is fixed.

    Least squares on log efficiency (over- and under-prediction by the same factor cost the same),
    with the curves interpolated as the simulator interpolates them: first with their logarithms
    piecewise linear, which is one non-negative least-squares problem, then Gauss-Newton steps on the
    curves themselves (each step a non-negative least-squares problem, with backtracking), which
    removes the gap between interpolating a curve and interpolating its logarithm.
    """
    nf, nd = len(f_nodes), len(d_nodes)
    hf = _hat_basis(np.log(flops), np.log(f_nodes))
    hd = _hat_basis(np.log(dims), np.log(d_nodes))
    log_e = np.log(np.clip(np.asarray(effs, dtype=float), EFF_FLOOR, 1.0))
    # log E_f[j] = -w - sum_{i > j} delta_i ; log E_d[l] = -sum_{i > l} eps_i ; w, delta, eps >= 0.
    upper_f = np.triu(np.ones((nf, nf)), k=1)[:, 1:]  # (nf, nf-1): node j gets increments i > j
    upper_d = np.triu(np.ones((nd, nd)), k=1)[:, 1:]
    down_f = np.hstack([np.ones((nf, 1)), upper_f])
    x = nnls(np.hstack([-hf @ down_f, -hd @ upper_d]), log_e)
    f0 = np.clip(np.exp(-down_f @ x[:nf]), EFF_FLOOR, 1.0)
    d0 = np.clip(np.exp(-upper_d @ x[nf:]), EFF_FLOOR, 1.0)

    # The same increments on the efficiencies themselves: E_f = 1 - w - U delta, E_d = 1 - U eps.
    def curves(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return 1.0 - down_f @ y[:nf], 1.0 - upper_d @ y[nf:]

    def residual(y: np.ndarray) -> np.ndarray | None:
        f, d = curves(y)
        if f.min() < EFF_FLOOR or d.min() < EFF_FLOOR:
            return None
        return np.log(hf @ f) + np.log(hd @ d) - log_e

    y = np.concatenate([np.r_[1.0 - f0[-1], -np.diff(f0)], -np.diff(d0)])
    y = np.clip(y, 0.0, None)
    r = residual(y)
    if r is None:
        return f0, d0
    for _ in range(50):
        f, d = curves(y)
        jac = np.hstack([-(hf @ down_f) / (hf @ f)[:, None], -(hd @ upper_d) / (hd @ d)[:, None]])
        target = nnls(jac, jac @ y - r)  # the constrained Gauss-Newton point
        current = float(r @ r)
        scale, improved = 1.0, False
        while scale > 1e-4:
            trial = y + scale * (target - y)  # between two non-negative points: still non-negative
            r_trial = residual(trial)
            if r_trial is not None and float(r_trial @ r_trial) < current:
                y, r, improved = trial, r_trial, True
                break
            scale /= 2
        if not improved or current - float(r @ r) < 1e-12 * max(current, 1e-30):
            break
    f, d = curves(y)
    return np.clip(f, EFF_FLOOR, 1.0), np.clip(d, EFF_FLOOR, 1.0)


def _rel_errors(predicted: Sequence[float], measured: Sequence[float]) -> tuple[float, float]:
    """(median, max) of |predicted / measured - 1|."""
    rel = [abs(p / m - 1.0) for p, m in zip(predicted, measured) if m > 0]
    return (float(np.median(rel)), float(max(rel))) if rel else (0.0, 0.0)


def fit_gemm_curves(points: Sequence[dict], zero_s: float = 0.0) -> tuple[float, EfficiencyCurve, EfficiencyCurve]:
    """(peak, matrix_efficiency, matrix_dim_efficiency) of one dtype from its GEMMs (dicts with flops,
    min_dim and seconds, each already past `RESOLVABLE` x its fixed cost `zero_s`).

    The best rate after the fixed cost is the peak, so every efficiency is rate / peak <= 1, and
    `fit_separable` splits them into the two curves the simulator multiplies (nodes at the powers of
    ten of FLOPs and at the measured dimensions). Efficiencies are rounded to four digits, as written.
    """
    rates = np.array([p["flops"] / (p["seconds"] - zero_s) for p in points])
    peak = float(rates.max())
    flops = np.array([p["flops"] for p in points], dtype=float)
    dims = np.array([p["min_dim"] for p in points], dtype=float)
    f_nodes = np.array(decade_nodes(flops), dtype=float)
    d_nodes = np.array(sorted({float(d) for d in dims}))
    f_eff, d_eff = fit_separable(flops, dims, rates / peak, f_nodes, d_nodes)
    flops_curve = EfficiencyCurve(
        sizes=tuple(float(v) for v in f_nodes), efficiencies=tuple(round(float(v), 4) for v in f_eff)
    )
    dim_curve = EfficiencyCurve(
        sizes=tuple(float(v) for v in d_nodes), efficiencies=tuple(round(float(v), 4) for v in d_eff)
    )
    return peak, flops_curve, dim_curve


def gemm_time(p: dict, peak: float, flops_curve: EfficiencyCurve, dim_curve: EfficiencyCurve) -> float:
    """The simulator's compute time of a GEMM (without its per-kernel overhead)."""
    return p["flops"] / (peak * flops_curve(p["flops"]) * dim_curve(p["min_dim"]))


def fit_matmul(points: Sequence[dict], curve_dtype: str, zero_s: dict[str, float] | None = None) -> MatmulFit:
    """Matrix peak, `matrix_efficiency` (by FLOPs) and `matrix_dim_efficiency` (by smallest dimension)
    for every dtype measured, each from its own GEMMs (`fit_gemm_curves`).

    `points` are dicts with dtype, flops, min_dim and seconds; `zero_s` each dtype's fixed cost per
    call (an 8x8 GEMM), subtracted first: the simulator adds it as kernel overhead. Points below
    `RESOLVABLE` x that cost are left out. The curve dtype needs two usable points; another dtype with
    none (every GEMM skipped or unresolvable) gets no peak.
    """
    zero_s = zero_s or {}
    usable = [p for p in points if p["seconds"] >= RESOLVABLE * zero_s.get(p["dtype"], 0.0)]
    if sum(1 for p in usable if p["dtype"] == curve_dtype) < 2:
        raise CalibrationError(
            f"too few usable {curve_dtype} GEMM measurements "
            f"({sum(1 for p in usable if p['dtype'] == curve_dtype)}) to fit a curve"
        )

    def compute_s(p):
        return p["seconds"] - zero_s.get(p["dtype"], 0.0)

    peaks, curves, errors = {}, {}, {}
    dtypes = [curve_dtype] + sorted({p["dtype"] for p in usable} - {curve_dtype})
    for dtype in dtypes:
        mine = [p for p in usable if p["dtype"] == dtype]
        peak, f_curve, d_curve = fit_gemm_curves(mine, zero_s.get(dtype, 0.0))
        peaks[dtype], curves[dtype] = peak, (f_curve, d_curve)
        errors[dtype] = _rel_errors([gemm_time(p, peak, f_curve, d_curve) for p in mine], [compute_s(p) for p in mine])
    # For the record: the curve dtype's curves shared by all, each dtype at the peak that reproduces its
    # total time (so the large GEMMs that dominate a step weigh most).
    shared_errors, shared_peaks = {}, {}
    f_curve, d_curve = curves[curve_dtype]
    for dtype in dtypes:
        mine = [p for p in usable if p["dtype"] == dtype]
        if dtype == curve_dtype:
            peak = peaks[dtype]
        else:
            peak = sum(p["flops"] / (f_curve(p["flops"]) * d_curve(p["min_dim"])) for p in mine) / sum(
                compute_s(p) for p in mine
            )
        shared_peaks[dtype] = peak
        shared_errors[dtype] = _rel_errors(
            [gemm_time(p, peak, f_curve, d_curve) for p in mine], [compute_s(p) for p in mine]
        )
    return MatmulFit(curve_dtype, peaks, curves, errors, shared_errors, shared_peaks)


def layout_spread(points: Sequence[dict], zero_s: dict[str, float] | None = None) -> dict[str, float]:
    """Per dtype, the largest ratio between the fastest and the slowest of the three GEMMs of one linear
    layer shape (forward X @ W^T, input gradient dY @ W, weight gradient dY^T @ X). They have the same
    FLOPs and smallest dimension, so the simulator gives them one time: a ratio well above 1 (fp16 on
    CPUs, whose forward layout alone has a fast kernel) is error no curve can remove."""
    zero_s = zero_s or {}
    rates: dict[tuple, list[float]] = {}
    for p in points:
        z = zero_s.get(p["dtype"], 0.0)
        if p["variant"] in ("fwd", "dgrad", "wgrad") and p["seconds"] >= RESOLVABLE * z:
            rates.setdefault((p["dtype"], p["tokens"], p["k"], p["n"]), []).append(p["flops"] / (p["seconds"] - z))
    spread: dict[str, float] = {}
    for (dtype, *_), r in rates.items():
        if len(r) > 1:
            spread[dtype] = max(spread.get(dtype, 1.0), max(r) / min(r))
    return spread


def fit_attention(
    points: Sequence[dict], peak: float, zero: dict[str, float] | None, dtype: str
) -> tuple[EfficiencyCurve, tuple[float, float]]:
    """`attention_efficiency` of `dtype` keyed by FLOPs, relative to `peak`: that dtype's own matrix peak.

    Forward points sit at the forward FLOPs F, backward points at 2.5 F (the simulator's backward),
    each with its own time (backward = forward+backward minus forward); one curve fits both.
    Returns the curve and (median, max) relative error of predicted forward+backward time.
    """
    zero = zero or {"fwd_s": 0.0, "fwd_bwd_s": 0.0}
    z_f, z_b = zero["fwd_s"], max(0.0, zero["fwd_bwd_s"] - zero["fwd_s"])
    sizes, effs = [], []
    mine = [p for p in points if p["dtype"] == dtype]
    for p in mine:
        f = p["fwd_flops"]
        t_f = p["fwd_s"] - z_f
        t_b = p["fwd_bwd_s"] - p["fwd_s"] - z_b
        if p["fwd_s"] >= RESOLVABLE * zero["fwd_s"] and t_f > 0:
            sizes.append(f)
            effs.append(f / t_f / peak)
        if t_b > 0 and p["fwd_bwd_s"] - p["fwd_s"] >= RESOLVABLE * z_b:
            sizes.append(2.5 * f)
            effs.append(2.5 * f / t_b / peak)
    if not sizes:
        raise CalibrationError(f"no usable {dtype} attention measurements")
    curve = fit_curve(sizes, effs)
    return curve, attention_error(mine, peak, curve, zero)


def attention_error(
    points: Sequence[dict], peak: float, curve: EfficiencyCurve, zero: dict[str, float]
) -> tuple[float, float]:
    """(median, max) relative error of the predicted forward+backward attention time."""
    rel = []
    for p in points:
        f = p["fwd_flops"]
        pred = f / (peak * curve(f)) + 2.5 * f / (peak * curve(2.5 * f))
        meas = p["fwd_bwd_s"] - zero.get("fwd_bwd_s", 0.0)
        if meas > 0:
            rel.append(abs(pred / meas - 1.0))
    return (float(np.median(rel)), float(max(rel))) if rel else (0.0, 0.0)


def fit_memory(points: Sequence[dict], zero_s: float) -> tuple[float, EfficiencyCurve]:
    """Memory bandwidth and `memory.efficiency` keyed by bytes moved from tensor copies.

    A copy of N bytes moves 2N (read + write), as `workloads` counts bytes. The best rate is the
    bandwidth (cache-resident sizes are the fastest on CPUs; the curve then falls to the DRAM rate),
    so every efficiency is <= 1. Nodes sit at the measured sizes (exact binary sizes).
    """
    usable = [p for p in points if p["seconds"] >= RESOLVABLE * zero_s]
    if not usable:
        raise CalibrationError("no usable memory-copy measurements")
    moved = np.array([2.0 * p["bytes"] for p in usable])
    rates = moved / np.array([p["seconds"] - zero_s for p in usable])
    bandwidth = float(rates.max())
    curve = EfficiencyCurve(
        sizes=tuple(float(m) for m in moved),
        efficiencies=tuple(round(float(max(EFF_FLOOR, min(1.0, r / bandwidth))), 4) for r in rates),
    )
    return bandwidth, curve


def roofline_time(flops: float, nbytes: float, rate: float, bandwidth: float, mem_curve: EfficiencyCurve) -> float:
    """The simulator's compute part of an operator's time (without the per-kernel overhead)."""
    return max(flops / rate, nbytes / (bandwidth * mem_curve(nbytes)))


def fit_vector_rate(ops: Sequence[tuple[float, float, float]], bandwidth: float, mem_curve: EfficiencyCurve) -> float:
    """The effective vector FLOP rate at which the roofline reproduces the ops' total measured time.

    `ops` are (flops, bytes, seconds without the fixed cost). The total predicted time falls as the
    rate rises (memory-bound ops stop at their memory time), so bisection on log(rate) finds it. When
    memory alone already explains more than the measured total, the largest rate tried is returned.
    """
    target = sum(t for _, _, t in ops)

    def total(rate: float) -> float:
        return sum(roofline_time(f, b, rate, bandwidth, mem_curve) for f, b, _ in ops)

    lo, hi = 1e3, VECTOR_RATE_CAP
    if total(hi) >= target:
        return hi
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if total(mid) > target:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1 + 1e-9:
            break
    return math.sqrt(lo * hi)


@dataclass(frozen=True)
class VectorFit:
    """Elementwise ops of one dtype: peak x efficiency is the rate at which the roofline reproduces their
    total time; the peak is the best single-op rate (or the fitted rate itself when that is higher)."""

    peak: float
    efficiency: float
    errors: tuple[float, float]  # (median, max) |rel err| of each op's predicted time
    ops: int


def fit_vector(
    points: Sequence[dict], zero_s: dict[str, float], bandwidth: float, mem_curve: EfficiencyCurve
) -> dict[str, VectorFit]:
    """`compute.vector[dtype]` and its `vector_efficiency` for every dtype of `points` (dicts: dtype, op,
    elems, seconds; ops outside `VECTOR_OPS` are left out), FLOPs and bytes as `VECTOR_COUNTS` says,
    each op's fixed cost (`zero_s["dtype/op"]`) subtracted and ops below `RESOLVABLE` x it left out."""
    fits = {}
    for dtype in sorted({p["dtype"] for p in points if p["op"] in VECTOR_OPS}):
        e = 2 if dtype in ("bf16", "fp16") else 4
        ops = []
        for p in points:
            if p["dtype"] != dtype or p["op"] not in VECTOR_OPS:
                continue
            z = zero_s.get(f"{dtype}/{p['op']}", 0.0)
            if p["seconds"] < RESOLVABLE * z:
                continue
            per_flops, per_bytes = VECTOR_COUNTS[p["op"]]
            ops.append((per_flops * p["elems"], per_bytes * e * p["elems"], p["seconds"] - z))
        if not ops:
            continue
        best = max(f / t for f, _, t in ops)
        rate = fit_vector_rate(ops, bandwidth, mem_curve)
        # Memory alone explaining the time leaves the rate free: the best single-op rate is honest.
        if rate >= VECTOR_RATE_CAP:
            rate = best
        eff = round(max(EFF_FLOOR, min(1.0, rate / best)), 4)
        peak = rate / eff
        errors = _rel_errors(
            [roofline_time(f, b, rate, bandwidth, mem_curve) for f, b, _ in ops], [t for _, _, t in ops]
        )
        fits[dtype] = VectorFit(peak, eff, errors, len(ops))
    return fits


def collective_coefficients(kind: str, group_size: int) -> tuple[float, float]:
    """(a, b) with time = a * bytes / bandwidth + b * latency, exactly as `simulator.cost.collectives`
    costs `kind` over `group_size` devices inside one node (one level): min(p - 1, ceil(log2 p))
    latency steps for reduce-scatter, all-gather and all-to-all, twice both terms for all-reduce (a
    reduce-scatter then an all-gather), and send/recv as a ring of p - 1 point-to-point steps (one
    transfer between two devices, as `p2p_time` costs a pipeline send)."""
    k = group_size
    if k < 2:
        raise ValueError(f"a collective needs two or more devices, got {k}")
    steps = min(k - 1, math.ceil(math.log2(k)))
    if kind in ("all_gather", "reduce_scatter", "all_to_all"):
        return (k - 1) / k, float(steps)
    if kind == "all_reduce":
        return 2.0 * (k - 1) / k, 2.0 * steps
    if kind == "send_recv":
        return 1.0, float(max(1, k - 1))
    raise ValueError(f"no alpha-beta coefficients for collective {kind!r}")


@dataclass(frozen=True)
class LinkFit:
    bandwidth: float  # bytes/s
    latency: float  # seconds
    errors: dict[str, tuple[float, float]]  # kind -> (median, max) |relative error| of predicted time


def fit_alpha_beta(samples: Sequence[dict]) -> LinkFit:
    """Bandwidth and latency of a link from collective timings (dicts: kind, group_size, bytes,
    seconds), fitted to the simulator's own formulas, time = a * bytes / bandwidth + b * latency.

    Least squares on log(time): over- and under-prediction by the same factor cost the same, and a
    message size range of four orders of magnitude weighs evenly (a fit on absolute or relative
    error leans toward under-predicting noisy small messages). Each collective kind weighs the same
    in total (for the joint fit of several kinds, the link's own figures that serve kinds without a
    fit of their own). A coarse grid over (bandwidth, latency) finds the basin; Gauss-Newton steps in
    log parameters refine it.
    """
    if not samples:
        raise CalibrationError("no collective measurements to fit the link")
    coef = np.array([collective_coefficients(s["kind"], s["group_size"]) for s in samples])
    a = coef[:, 0] * np.array([float(s["bytes"]) for s in samples])
    b = coef[:, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        log_t = np.log(np.array([float(s["seconds"]) for s in samples]))
    if not np.isfinite(log_t).all():
        raise CalibrationError("a collective timing is zero or negative; cannot fit the link")
    # Every kind weighs the same, however many sizes and group sizes it was measured at.
    counts: dict[str, int] = {}
    for s in samples:
        counts[s["kind"]] = counts.get(s["kind"], 0) + 1
    weight = np.array([1.0 / counts[s["kind"]] for s in samples])
    root_w = np.sqrt(weight)

    def sse(p_bw: np.ndarray, p_lat: np.ndarray) -> np.ndarray:
        pred = np.exp(p_bw)[..., None] * a + np.exp(p_lat)[..., None] * b
        return (weight * (np.log(pred) - log_t) ** 2).sum(axis=-1)

    # p_bw = log(1 / bandwidth), p_lat = log(latency): 1 MB/s .. 10 TB/s, 1 ns .. 100 ms.
    grid_bw = np.linspace(math.log(1e-13), math.log(1e-6), 71)
    grid_lat = np.linspace(math.log(1e-9), math.log(1e-1), 81)
    gb, gl = np.meshgrid(grid_bw, grid_lat, indexing="ij")
    err = sse(gb, gl)
    i, j = np.unravel_index(int(np.argmin(err)), err.shape)
    p = np.array([grid_bw[i], grid_lat[j]])
    has_latency = bool((b > 0).any())
    for _ in range(100):
        inv_bw, lat = math.exp(p[0]), math.exp(p[1])
        pred = inv_bw * a + lat * b
        r = np.log(pred) - log_t
        jac = np.column_stack([inv_bw * a / pred, lat * b / pred])
        if not has_latency:
            jac[:, 1] = 0.0
        step, *_ = np.linalg.lstsq(jac * root_w[:, None], -r * root_w, rcond=None)
        # Backtracking keeps every step an improvement.
        current = float((weight * r**2).sum())
        scale = 1.0
        while scale > 1e-6 and float(sse(np.array(p[0] + scale * step[0]), np.array(p[1] + scale * step[1]))) > current:
            scale /= 2
        if scale <= 1e-6:
            break
        p = p + scale * step
        if np.abs(scale * step).max() < 1e-10:
            break
    inv_bw, latency = math.exp(p[0]), (math.exp(p[1]) if has_latency else 0.0)
    pred = inv_bw * a + latency * b
    t = np.exp(log_t)
    errors = {}
    for kind in sorted({s["kind"] for s in samples}):
        rel = [abs(pp / m - 1.0) for pp, m, s in zip(pred, t, samples) if s["kind"] == kind]
        errors[kind] = (float(np.median(rel)), float(max(rel)))
    return LinkFit(1.0 / inv_bw, latency, errors)


def fit_collectives(samples: Sequence[dict]) -> tuple[LinkFit, dict[str, LinkFit]]:
    """The joint fit of every kind (the link's bandwidth and latency) and each kind's own fit
    (`LinkSpec.collectives`), for each kind whose timings separate bandwidth from latency (two or more
    message sizes); `fit_alpha_beta` on the simulator's formula for that kind, so `collective_time`
    on the written link reproduces that kind's timings as closely as the fit does."""
    joint = fit_alpha_beta(samples)
    by_kind = {}
    for kind in [k for k in COLLECTIVE_KINDS if any(s["kind"] == k for s in samples)]:
        mine = [s for s in samples if s["kind"] == kind]
        design = np.array(
            [
                [c[0] * float(s["bytes"]), c[1]]
                for s, c in ((s, collective_coefficients(kind, s["group_size"])) for s in mine)
            ]
        )
        if np.linalg.matrix_rank(design / design.max(axis=0)) == 2:
            by_kind[kind] = fit_alpha_beta(mine)
    return joint, by_kind
