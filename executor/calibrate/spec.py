"""Calibration's spec: the measurements `executor.calibrate.run` collects, fitted and written as a device and
a cluster spec that validate as `simulate` loads them.

`build_specs` runs in named steps: where and when (`_provenance`), the device's fits (`_fit_compute`), the
device spec with a `sources` text per figure (`_device_mapping`), the node's intra-node link from the
collectives (`_intra_node`), host link, host and storage, then the cluster around that node. Which
measurement gives which spec field is the table in `executor.calibrate.run`'s docstring.
"""

from __future__ import annotations

import datetime
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from executor.calibrate.fit import (
    COLLECTIVE_KINDS,
    CalibrationError,
    LinkFit,
    MatmulFit,
    VectorFit,
    attention_error,
    fit_alpha_beta,
    fit_attention,
    fit_collectives,
    fit_matmul,
    fit_memory,
    fit_vector,
    layout_spread,
)
from executor.calibrate.measure import GiB
from hwmodel.cluster import ClusterSpec
from hwmodel.components import DeviceSpec
from hwmodel.curves import EfficiencyCurve
from hwmodel.loading import validate
from hwmodel.units import format_bandwidth, format_bytes, format_flop_rate, format_flops, format_seconds


# ================================================================================================
# Machine facts
# ================================================================================================
def cpu_model() -> tuple[str, str]:
    """(model name, vendor) from /proc/cpuinfo, or what `platform` knows."""
    model, vendor = "", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "model name" and not model:
                model = value
            elif key == "vendor_id" and not vendor:
                vendor = {"AuthenticAMD": "amd", "GenuineIntel": "intel"}.get(value, value.lower())
    except OSError:
        pass
    return model or platform.processor() or platform.machine() or "unknown CPU", vendor or "generic"


def host_memory_bytes() -> float:
    """Physical memory (MemTotal of /proc/meminfo; sysconf where /proc is missing)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


# ================================================================================================
# Human units for the YAML
# ================================================================================================
# Four significant digits: a measured spec keeps what was measured (hwmodel.units' formatters).
def fmt_flop_rate(v: float) -> str:
    return format_flop_rate(v, digits=4)


def fmt_flops(v: float) -> str:
    return format_flops(v, digits=4)


def fmt_bandwidth(v: float) -> str:
    return format_bandwidth(v, digits=4)


def fmt_bytes(v: float) -> str:
    return format_bytes(v, digits=4)


def fmt_seconds(v: float) -> str:
    return format_seconds(v, digits=3)


class _Flow(list):
    """A list written in YAML flow style ([a, b]): curve points stay one per line."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Flow, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def _curve_yaml(curve: EfficiencyCurve, fmt: Callable[[float], str] | None) -> Any:
    if len(curve.sizes) == 1:
        return round(curve.efficiencies[0], 4)
    return [
        _Flow([fmt(s) if fmt else int(s) if float(s).is_integer() else s, round(e, 4)])
        for s, e in zip(curve.sizes, curve.efficiencies)
    ]


# ================================================================================================
# Calibration
# ================================================================================================
@dataclass
class Calibration:
    """What `calibrate` measured and the specs it built from it."""

    device: DeviceSpec
    cluster: ClusterSpec
    device_mapping: dict[str, Any]
    cluster_mapping: dict[str, Any]
    header: str
    raw: dict[str, Any]
    fits: dict[str, Any]
    elapsed_s: float
    notes: list[str] = field(default_factory=list)

    def cluster_yaml(self) -> str:
        return self.header + yaml.dump(
            self.cluster_mapping, Dumper=_Dumper, sort_keys=False, width=120, allow_unicode=True
        )

    def device_yaml(self) -> str:
        return self.header + yaml.dump(
            self.device_mapping, Dumper=_Dumper, sort_keys=False, width=120, allow_unicode=True
        )


# ================================================================================================
# Building the spec: provenance, fits, the device, the node's links, host and storage, the cluster
# ================================================================================================
@dataclass(frozen=True)
class _Provenance:
    """Where and when the figures were measured, as every `sources` entry says it."""

    when: str
    what: str  # the machine in words
    vendor: str
    stamp: str  # the prefix of every source text
    together: str  # how the ranks ran while the device was measured


def _provenance(raw: dict[str, Any], device_type: str) -> _Provenance:
    import torch

    ranks, threads = raw["ranks"], raw["threads_per_rank"]
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    model, vendor = cpu_model()
    cores = os.cpu_count() or 1
    if device_type == "cuda":
        props = torch.cuda.get_device_properties(0)
        what = f"{props.name}, {ranks} GPU rank(s), torch {torch.__version__}"
        vendor = "amd" if getattr(torch.version, "hip", None) else "nvidia"
    else:
        what = f"{model} ({cores} cores), torch {torch.__version__}, {ranks} rank(s) x {threads} thread(s)"
    load = raw.get("load_average_before")
    stamp = f"measured by `execute calibrate` ({raw['sweep']} mode) on {when}; {what}" + (
        f"; load average {load:.1f} before" if load is not None else ""
    )
    clock = raw.get("clock", "wall time")
    together = ("all ranks running the same benchmark at once" if ranks > 1 else "one rank") + f", timed in {clock}"
    return _Provenance(when, what, vendor, stamp, together)


@dataclass(frozen=True)
class _AttentionFits:
    curves: dict[str, EfficiencyCurve]  # every dtype's own, against its own matrix peak
    errors: dict[str, tuple[float, float]]
    shared_errors: dict[str, tuple[float, float]]  # the curve dtype's curve shared by all (for the record)


def _fit_attention_all(raw: dict[str, Any], mm: MatmulFit, curve_dtype: str) -> _AttentionFits:
    """Every dtype's attention curve against its own matrix peak; the curve dtype's must fit."""
    curves: dict[str, EfficiencyCurve] = {}
    errors: dict[str, tuple[float, float]] = {}
    for dtype in [curve_dtype] + sorted({p["dtype"] for p in raw["attention"]} - {curve_dtype}):
        if dtype not in mm.peaks:
            continue
        try:
            curves[dtype], errors[dtype] = fit_attention(
                raw["attention"], mm.peaks[dtype], raw["attention_zero"].get(dtype), dtype
            )
        except CalibrationError:
            if dtype == curve_dtype:
                raise
    if curve_dtype not in curves:
        raise CalibrationError(f"no usable {curve_dtype} attention measurements")
    # For the record: the curve dtype's attention curve shared by all, each dtype at the matrix peak
    # the shared GEMM curves give it (calibrations before per_dtype).
    shared_errors = {
        dtype: attention_error(
            [p for p in raw["attention"] if p["dtype"] == dtype],
            mm.shared_peaks[dtype],
            curves[curve_dtype],
            raw["attention_zero"].get(dtype, {}),
        )
        for dtype in curves
    }
    return _AttentionFits(curves, errors, shared_errors)


@dataclass(frozen=True)
class _ComputeFits:
    """The device's fitted figures (compute and memory), before they are written as YAML."""

    curve_dtype: str
    mm: MatmulFit
    att: _AttentionFits
    bandwidth: float
    mem_curve: EfficiencyCurve
    vec: dict[str, VectorFit]
    ref: str  # the dtype whose vector efficiency is the shared one
    dropout: list[dict[str, Any]]
    add_fp32: dict[int, float]
    kernel_overhead: float
    sigma: float
    spread: dict[str, float]  # dtypes whose three GEMM layouts of one shape run >= 2x apart


def _fit_compute(raw: dict[str, Any]) -> _ComputeFits:
    curve_dtype = raw["curve_dtype"]
    mm = fit_matmul(raw["gemm"], curve_dtype, raw["gemm_zero_s"])
    att = _fit_attention_all(raw, mm, curve_dtype)
    bandwidth, mem_curve = fit_memory(raw["copy"], raw["copy_zero_s"])
    vec = fit_vector(raw["vector"], raw["vector_zero_s"], bandwidth, mem_curve)
    if not vec:
        raise CalibrationError("no usable elementwise measurements")
    ov = raw["overhead"]
    return _ComputeFits(
        curve_dtype=curve_dtype,
        mm=mm,
        att=att,
        bandwidth=bandwidth,
        mem_curve=mem_curve,
        vec=vec,
        ref=curve_dtype if curve_dtype in vec else sorted(vec)[0],
        dropout=[p for p in raw["vector"] if p["op"] == "dropout_add"],
        add_fp32={p["elems"]: p["seconds"] for p in raw["vector"] if p["op"] == "add" and p["dtype"] == "fp32"},
        kernel_overhead=ov["layer_s"] / ov["layer_kernels"],
        sigma=raw.get("overlap", {}).get("sigma", 0.0),
        spread={d: r for d, r in layout_spread(raw["gemm"], raw["gemm_zero_s"]).items() if r >= 2.0},
    )


def _per_dtype(fits: _ComputeFits) -> dict[str, dict[str, Any]]:
    """Every measured dtype's own curves; the curve dtype's are also the shared ones."""
    mm, vec = fits.mm, fits.vec
    per_dtype: dict[str, dict[str, Any]] = {}
    for dtype in [d for d in ("fp32", "tf32", "fp16", "bf16") if d in mm.curves or d in vec]:
        entry: dict[str, Any] = {}
        if dtype in mm.curves:
            entry["matrix_efficiency"] = _curve_yaml(mm.curves[dtype][0], fmt_flops)
            entry["matrix_dim_efficiency"] = _curve_yaml(mm.curves[dtype][1], None)
        if dtype in fits.att.curves:
            entry["attention_efficiency"] = _curve_yaml(fits.att.curves[dtype], fmt_flops)
        if dtype in vec:
            entry["vector_efficiency"] = vec[dtype].efficiency
        per_dtype[dtype] = entry
    return per_dtype


def _errs(errors: dict[str, tuple[float, float]]) -> str:
    return ", ".join(f"{d} median {e[0]:.0%} / max {e[1]:.0%}" for d, e in errors.items())


def _matrix_sources(raw: dict[str, Any], fits: _ComputeFits, prov: _Provenance) -> dict[str, str]:
    """`sources` of the GEMM figures: the peaks, the per-dtype and the shared curves."""
    stamp, mm, curve_dtype = prov.stamp, fits.mm, fits.curve_dtype
    n_gemm = {d: sum(1 for p in raw["gemm"] if p["dtype"] == d) for d in mm.peaks}
    spread_text = (
        (
            "; the three GEMMs of one linear-layer shape differ by up to "
            + ", ".join(f"{r:.1f}x in {d}" for d, r in fits.spread.items())
            + " (the simulator gives them one time: no curve removes that)"
        )
        if fits.spread
        else ""
    )
    skipped = {k: v for k, v in raw["unsupported"].items() if k.startswith(("matmul", "attention"))}
    skipped_text = "; ".join(f"{k} ({v})" for k, v in skipped.items())
    return {
        "compute.matrix": (
            f"{stamp}; {prov.together}. Each dtype: its best rate, after each call's fixed cost (an 8x8 GEMM), over "
            "its GEMMs (square, and forward / input-gradient / weight-gradient GEMMs of linear layers; "
            + ", ".join(f"{n} {d}" for d, n in n_gemm.items())
            + "): the peak that dtype's own curves under per_dtype are relative to. Predicted vs measured per GEMM "
            f"with each dtype's own curves: {_errs(mm.errors)}"
            + (
                f" (one set of {curve_dtype} curves shared by all: {_errs(mm.shared_errors)})"
                if len(mm.peaks) > 1
                else ""
            )
            + spread_text
            + (f"; skipped: {skipped_text}" if skipped else "")
        ),
        "compute.per_dtype": (
            f"{stamp}; every measured dtype's own curves, fitted on that dtype's timings alone: matrix_efficiency and "
            "matrix_dim_efficiency as below on its GEMMs against its own compute.matrix peak, attention_efficiency on "
            "its SDPA timings against its own matrix peak, vector_efficiency on its elementwise ops against its own "
            f"compute.vector peak. The {curve_dtype} entry repeats the shared curves"
            + (f"; curves end at the largest size measured: {skipped_text}" if skipped else "")
        ),
        "compute.matrix_efficiency": (
            f"{stamp}; least-squares fit of log efficiency = f(FLOPs) + g(smallest dim) over the GEMMs of one dtype, "
            "after subtracting each call's fixed cost, both parts never falling with size; this shared curve is "
            f"{curve_dtype}'s (--curve-dtype), for dtypes without their own under per_dtype"
        ),
        "compute.matrix_dim_efficiency": (
            f"{stamp}; the g(smallest dim) part of the same fit, 1 at its widest point ({curve_dtype}'s)"
        ),
    }


def _other_compute_sources(raw: dict[str, Any], fits: _ComputeFits, prov: _Provenance) -> dict[str, str]:
    """`sources` of attention, the elementwise ops, the kernel overhead and the overlap slowdown."""
    stamp, att, curve_dtype, ov = prov.stamp, fits.att, fits.curve_dtype, raw["overhead"]
    dropout_ns = ""
    if fits.dropout:
        big = max(fits.dropout, key=lambda p: p["elems"])
        dropout_ns = (
            f"; dropout (fp32, as GPT trains) is not in the fit: {big['seconds'] / big['elems'] * 1e9:.3g} ns per "
            f"element at {big['elems']} elements, "
            f"{big['seconds'] / fits.add_fp32.get(big['elems'], big['seconds']):.3g}x "
            "an add of the same size, which the simulator's 2 FLOPs per element do not capture"
        )
    return {
        "compute.attention_efficiency": (
            f"{stamp}; causal scaled_dot_product_attention forward (at its FLOPs, 2*b*h*s^2*d) and backward (at 2.5x), "
            f"relative to the dtype's own matrix peak; this shared curve is {curve_dtype}'s. "
            f"Forward+backward predicted vs measured with each dtype's own curve: {_errs(att.errors)}"
            + (f" (the {curve_dtype} curve shared by all: {_errs(att.shared_errors)})" if len(att.errors) > 1 else "")
        ),
        "compute.vector": (
            f"{stamp}; {prov.together}; layer/RMS norm, add, GELU, SiLU*mul, softmax at "
            f"{min(raw['sweep_vector_elems'])}..{max(raw['sweep_vector_elems'])} elements with workloads' FLOP and "
            "byte counts, per dtype: the best single-op rate is the peak, and its vector_efficiency (per_dtype) makes "
            "peak x efficiency the rate at which the roofline reproduces their total time; predicted vs measured per "
            "op: " + _errs({d: v.errors for d, v in fits.vec.items()}) + dropout_ns
        ),
        "compute.vector_efficiency": (
            f"{stamp}; {fits.ref}'s (see compute.vector), for dtypes without their own under per_dtype"
        ),
        "compute.kernel_overhead": (
            f"{stamp}; a tiny GPT decoder layer (h=32, 8 tokens), forward+backward in training mode, "
            f"{ov['layer_s'] * 1e6:.0f} us over the {ov['layer_kernels']:.0f} kernels the simulator counts for it "
            f"(a bare op dispatch is {ov['dispatch_s'] * 1e6:.2g} us)"
        ),
        "compute.comm_overlap_slowdown": (
            f"{stamp}; {raw['overlap']['dtype']} {raw['overlap']['gemm_n']}^3 GEMMs alone vs beside asynchronous "
            f"all-reduces on every rank (per rank: {', '.join(f'{s:.2f}' for s in raw['overlap']['per_rank'])})"
            if "overlap" in raw
            else "not measured (one rank): no collective runs beside compute"
        ),
    }


def _memory_sources(raw: dict[str, Any], device_type: str, prov: _Provenance, host_mem: float) -> dict[str, str]:
    import torch

    stamp = prov.stamp
    return {
        "memory.capacity": (
            f"{stamp}; {torch.cuda.get_device_properties(0).total_memory / GiB:.1f} GiB reported by the driver"
            if device_type == "cuda"
            else f"{stamp}; MemTotal {host_mem / GiB:.2f} GiB of /proc/meminfo split among {raw['ranks']} rank(s)"
        ),
        "memory.bandwidth": (
            f"{stamp}; {prov.together}; best rate of tensor copies from "
            f"{fmt_bytes(min(p['bytes'] for p in raw['copy']))} to {fmt_bytes(max(p['bytes'] for p in raw['copy']))} "
            "(bytes moved = read + write)"
        ),
        "memory.efficiency": f"{stamp}; copy rate / bandwidth per size (bytes moved), after each copy's fixed cost",
        "memory.reserved": (
            f"{stamp}; "
            + (
                "memory in use on the GPU after CUDA and NCCL start (mem_get_info)"
                if device_type == "cuda"
                else "resident memory of a rank after importing torch and starting gloo (VmRSS)"
            )
        ),
    }


def _device_mapping(
    raw: dict[str, Any], fits: _ComputeFits, prov: _Provenance, *, name: str, device_type: str, host_mem: float
) -> dict[str, Any]:
    """The device spec as YAML data: one rank's share of this machine."""
    import torch

    ranks, mm, vec = raw["ranks"], fits.mm, fits.vec
    # A GPU's own memory; on a CPU each rank's share of the host's.
    capacity = float(torch.cuda.get_device_properties(0).total_memory) if device_type == "cuda" else host_mem / ranks
    return {
        "name": f"{name}-device",
        "description": (
            f"{prov.what.split(',')[0]}: one of {ranks} rank(s)"
            + (f", {raw['threads_per_rank']} thread(s) each" if device_type == "cpu" else "")
            + f", calibrated {prov.when}"
        ),
        "vendor": prov.vendor,
        "kind": "gpu" if device_type == "cuda" else "cpu",
        "compute": {
            "matrix": {d: fmt_flop_rate(mm.peaks[d]) for d in ("fp32", "tf32", "fp16", "bf16") if d in mm.peaks},
            "vector": {d: fmt_flop_rate(vec[d].peak) for d in ("fp32", "fp16", "bf16") if d in vec},
            "matrix_efficiency": _curve_yaml(mm.flops_curve, fmt_flops),
            "matrix_dim_efficiency": _curve_yaml(mm.dim_curve, None),
            "attention_efficiency": _curve_yaml(fits.att.curves[fits.curve_dtype], fmt_flops),
            "vector_efficiency": vec[fits.ref].efficiency,
            "kernel_overhead": fmt_seconds(fits.kernel_overhead),
            "comm_overlap_slowdown": round(fits.sigma, 4),
            "per_dtype": _per_dtype(fits),
        },
        "memory": {
            "capacity": fmt_bytes(capacity),
            "bandwidth": fmt_bandwidth(fits.bandwidth),
            "efficiency": _curve_yaml(fits.mem_curve, fmt_bytes),
            "reserved": fmt_bytes(float(np.max(raw["per_rank_reserved_bytes"]))),
        },
        "sources": {
            **_matrix_sources(raw, fits, prov),
            **_other_compute_sources(raw, fits, prov),
            **_memory_sources(raw, device_type, prov, host_mem),
        },
    }


@dataclass
class _Links:
    """The node's intra-node link (measured or a placeholder), its fits and what to tell the user."""

    intra: dict[str, Any]
    link: LinkFit | None
    by_kind: dict[str, LinkFit]
    notes: list[str] = field(default_factory=list)


def _collective_sources(
    coll: list[dict[str, Any]],
    raw: dict[str, Any],
    link: LinkFit,
    by_kind: dict[str, LinkFit],
    stamp: str,
    device_type: str,
) -> dict[str, str]:
    """`sources` of the intra-node link: the joint fit, and each collective kind's own fit."""
    kinds = [k for k in COLLECTIVE_KINDS if any(c["kind"] == k for c in coll)]
    sizes = sorted({c["group_size"] for c in coll})
    backend = "nccl" if device_type == "cuda" else "gloo"
    missing = {k: v for k, v in raw["unsupported"].items() if k in COLLECTIVE_KINDS}
    measured_on = (
        f"{backend} over group sizes {', '.join(map(str, sizes))} and {fmt_bytes(min(c['bytes'] for c in coll))}.."
        f"{fmt_bytes(max(c['bytes'] for c in coll))} messages (bytes as simulator.cost.collectives counts them; "
        "send/recv between two ranks, one way: half a round trip)"
    )
    sources = {
        "bandwidth": (
            f"{stamp}; joint alpha-beta fit of simulator.cost.collectives' formulas to {', '.join(kinds)} on "
            f"{measured_on} (least squares on log time, every kind weighing the same): the figures for kinds without "
            "their own fit under collectives; predicted vs measured: "
            + ", ".join(f"{k} median {e[0]:.0%} / max {e[1]:.0%}" for k, e in link.errors.items())
            + (
                f"; not supported by the backend: {', '.join(f'{k} ({v})' for k, v in missing.items())}"
                if missing
                else ""
            )
        ),
        "latency": f"{stamp}; the alpha (per latency step) of the same joint fit",
        "efficiency": "1: the fitted bandwidth is already the achieved one",
        "collectives": (
            f"{stamp}; each kind's own alpha-beta fit on {measured_on}, of the simulator's formula for that kind over "
            "one node of p ranks: all-gather, reduce-scatter and all-to-all (p-1)/p x bytes / bandwidth + "
            "min(p-1, ceil(log2 p)) x latency, all-reduce twice that, send/recv bytes / bandwidth + latency (least "
            "squares on log time); bandwidth is what one rank achieves in the simulator's terms, latency per step"
        ),
    }
    for kind, fit in by_kind.items():
        med, mx = fit.errors[kind]
        jmed, jmx = link.errors[kind]
        n = sum(1 for c in coll if c["kind"] == kind)
        sources[f"collectives.{kind}"] = (
            f"{n} timings; predicted vs measured median {med:.0%} / max {mx:.0%} "
            f"(the joint fit: {jmed:.0%} / {jmx:.0%})"
        )
    return sources


def _intra_node(raw: dict[str, Any], stamp: str, device_type: str) -> _Links:
    """The intra-node link from the collectives, or a placeholder where none were measured (one device)."""
    coll = raw["collectives"]
    if not coll:
        intra: dict[str, Any] = {
            "kind": "shared_memory" if device_type == "cpu" else "pcie",
            "bandwidth": "1 GB/s",
            "latency": "10 us",
            "efficiency": 1.0,
            "sources": {"bandwidth": "not measured (one device): placeholder [E]"},
        }
        return _Links(intra, None, {}, ["intra-node link not measured"])
    link, by_kind = fit_collectives(coll)
    kind = "shared_memory" if device_type == "cpu" else _gpu_link_kind(link.bandwidth, raw["ranks"])
    intra = {
        "kind": kind,
        "bandwidth": fmt_bandwidth(link.bandwidth),
        "latency": fmt_seconds(link.latency),
        "efficiency": 1.0,
        "collectives": {
            k: {"bandwidth": fmt_bandwidth(f.bandwidth), "latency": fmt_seconds(f.latency)} for k, f in by_kind.items()
        },
        "sources": _collective_sources(coll, raw, link, by_kind, stamp, device_type),
    }
    kinds = {c["kind"] for c in coll}
    missing = {k: v for k, v in raw["unsupported"].items() if k in COLLECTIVE_KINDS}
    notes = []
    for k in COLLECTIVE_KINDS:
        if k not in by_kind:
            why = missing.get(k) or ("too few message sizes to fit" if k in kinds else "not measured")
            notes.append(f"{k}: no fit of its own ({why}); the simulator uses the joint link figures for it")
    return _Links(intra, link, by_kind, notes)


def _host_link(raw: dict[str, Any], prov: _Provenance, device_type: str) -> dict[str, Any]:
    """Pinned host <-> device copies on CUDA (the slower direction); an in-memory copy on a CPU."""
    stamp = prov.stamp
    if device_type == "cuda" and "host_h2d" in raw:
        h2d = fit_alpha_beta([{"kind": "send_recv", "group_size": 2, **r} for r in raw["host_h2d"]])
        d2h = fit_alpha_beta([{"kind": "send_recv", "group_size": 2, **r} for r in raw["host_d2h"]])
        slow = h2d if h2d.bandwidth <= d2h.bandwidth else d2h
        return {
            "kind": "pcie",
            "bandwidth": fmt_bandwidth(slow.bandwidth),
            "latency": fmt_seconds(slow.latency),
            "efficiency": 1.0,
            "sources": {
                "bandwidth": f"{stamp}; pinned copies, every rank at once: host-to-device "
                f"{fmt_bandwidth(h2d.bandwidth)}, device-to-host {fmt_bandwidth(d2h.bandwidth)}; the slower direction "
                "is written"
            },
        }
    big = max(raw["copy"], key=lambda p: p["bytes"])
    return {
        "kind": "shared_memory",
        "bandwidth": fmt_bandwidth(big["bytes"] / big["seconds"]),
        "latency": fmt_seconds(raw["copy_zero_s"]),
        "efficiency": 1.0,
        "sources": {
            "bandwidth": f"{stamp}; no host-device copies on a CPU: a {fmt_bytes(big['bytes'])} in-memory copy "
            f"per rank ({prov.together}), bytes transferred per second; latency: a tiny copy"
        },
    }


def _host(raw: dict[str, Any], stamp: str, host_mem: float) -> tuple[dict[str, Any], float]:
    """The node's host (memory, its bandwidth, cores) and the node memory bandwidth in bytes/s.

    Node DRAM bandwidth: on a CPU every rank copying its largest tensor at once, summed; on a GPU node the
    ranks measured their GPUs, so the parent measured the host on its own."""
    per_rank_big = [rows[-1] for rows in raw["copy_per_rank"] if rows]
    big_bytes = max(p["bytes"] for p in raw["copy"])
    if "host_memory_bandwidth" in raw:
        node_bw = raw["host_memory_bandwidth"]
        node_bw_how = "a 256 MiB CPU tensor copy on all cores, bytes moved (read + write)"
    else:
        node_bw = sum(2.0 * big_bytes / s for s in per_rank_big)
        node_bw_how = f"{raw['ranks']} rank(s) each copying {fmt_bytes(big_bytes)} at once, bytes moved summed"
    host = {
        "memory": fmt_bytes(host_mem),
        "memory_bandwidth": fmt_bandwidth(node_bw),
        "num_cores": os.cpu_count() or 1,
        "sources": {
            "memory": f"{stamp}; MemTotal of /proc/meminfo",
            "memory_bandwidth": f"{stamp}; {node_bw_how}",
            "num_cores": "os.cpu_count()",
        },
    }
    return host, node_bw


def _storage(st: dict[str, Any], stamp: str) -> dict[str, Any]:
    return {
        "capacity": fmt_bytes(st["free_bytes"]),
        "read_bandwidth": fmt_bandwidth(st["bytes"] / st["read_s"]),
        "write_bandwidth": fmt_bandwidth(st["bytes"] / st["write_s"]),
        "latency": fmt_seconds(st["latency_s"]),
        "sources": {
            "all": (
                f"{stamp}; a {fmt_bytes(st['bytes'])} file in {st['filesystem']}: sequential 4 MiB writes then fsync; "
                f"sequential reads after dropping its pages from the cache"
                + ("" if st.get("page_cache_dropped") else " (could not drop the page cache: reads may be cached)")
                + "; latency: median 4 KiB random read; capacity: free space on the volume"
            ),
        },
    }


def _cluster_mapping(
    node: dict[str, Any], prov: _Provenance, *, name: str, ranks: int, threads: int, device_type: str
) -> dict[str, Any]:
    return {
        "name": name,
        "description": (
            f"this machine as calibrated on {prov.when}: {ranks} {'GPU' if device_type == 'cuda' else 'CPU'} rank(s)"
            + (f" of {threads} thread(s)" if device_type == "cpu" else "")
            + f" over {node['intra_node']['kind']}; one node (no inter-node network was measured)"
        ),
        "node_groups": [{"name": "local", "count": 1, "node": node}],
        "sources": {
            "all": f"{prov.stamp}; every figure measured on this machine (see each part's sources)",
            "network": "absent: a single machine has no inter-node network to measure; --nodes > 1 needs one",
        },
    }


def _header(raw: dict[str, Any], prov: _Provenance, elapsed_s: float) -> str:
    curve_dtype = raw["curve_dtype"]
    return (
        f"# Written by `execute calibrate` on {prov.when} ({raw['sweep']} mode, {elapsed_s:.0f} s).\n"
        f"# Machine: {prov.what}. One device per rank; every device figure was measured with {prov.together}.\n"
        "# Every measured dtype has its own efficiency curves "
        f"(compute.per_dtype; the shared ones are {curve_dtype}'s) and every\n"
        "# measured collective kind its own bandwidth and latency (intra_node.collectives); `sources` says how each "
        "was measured.\n"
    )


def build_specs(raw: dict[str, Any], *, name: str, device_type: str, elapsed_s: float = 0.0) -> Calibration:
    """Fit the measurements in `raw` (as `calibrate` collects them) and build validated specs.

    Raises:
        CalibrationError: too few usable measurements to fit (no curve-dtype attention, no elementwise op).
    """
    prov = _provenance(raw, device_type)
    fits = _fit_compute(raw)
    host_mem = host_memory_bytes()
    device_map = _device_mapping(raw, fits, prov, name=name, device_type=device_type, host_mem=host_mem)
    links = _intra_node(raw, prov.stamp, device_type)
    host, node_bw = _host(raw, prov.stamp, host_mem)
    node = {
        "device": device_map,
        "num_devices": raw["ranks"],
        "intra_node": links.intra,
        "host_link": _host_link(raw, prov, device_type),
        "host": host,
        "storage": _storage(raw["storage"], prov.stamp),
    }
    cluster_map = _cluster_mapping(
        node, prov, name=name, ranks=raw["ranks"], threads=raw["threads_per_rank"], device_type=device_type
    )
    device = validate(DeviceSpec, device_map, f"calibrated device {device_map['name']}", {"strict_units": True})
    cluster = validate(ClusterSpec, cluster_map, f"calibrated cluster {name}", {"strict_units": True})
    mm = fits.mm
    fit_record = {
        "matmul": mm,
        "matmul_errors": mm.errors,
        "matmul_shared_errors": mm.shared_errors,
        "attention_errors": fits.att.errors,
        "attention_shared_errors": fits.att.shared_errors,
        "link": links.link,
        "link_by_kind": links.by_kind,
        "vector": fits.vec,
        "kernel_overhead": fits.kernel_overhead,
        "dispatch_s": raw["overhead"]["dispatch_s"],
        "node_memory_bandwidth": node_bw,
        "dropout": fits.dropout,
        "add_fp32": fits.add_fp32,
    }
    # The GEMM layout spread goes first, as it always did, then what the links lack.
    notes = [
        f"{d} GEMMs: at the same shape the forward, input-gradient and weight-gradient layouts run up to {r:.1f}x "
        f"apart; the simulator has no layout term, so single {d} GEMMs are off by up to that factor"
        for d, r in fits.spread.items()
    ] + links.notes
    header = _header(raw, prov, elapsed_s)
    return Calibration(device, cluster, device_map, cluster_map, header, raw, fit_record, elapsed_s, notes)


def _gpu_link_kind(bandwidth: float, ranks: int) -> str:
    """NVLink when GPUs talk faster than any PCIe 5.0 x16 link could carry (64 GB/s), else PCIe."""
    return "nvlink" if ranks > 1 and bandwidth > 64e9 else "pcie"
