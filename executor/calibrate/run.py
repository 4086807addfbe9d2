"""Calibration: measure this machine and write the cluster spec that `simulate` then uses.

The simulator turns FLOPs and bytes into time with a roofline per operator (`simulator.cost.compute`)::

    time(op) = max(FLOPs / (peak * eff(op)), bytes / (memory.bandwidth * memory.efficiency(bytes)))
               + kernels * kernel_overhead

and collectives with alpha-beta formulas over the link tiers a group spans (`simulator.cost.collectives`).
Calibration measures each term of those formulas on the real machine, with the same conventions, so
that the spec reproduces what was measured:

============================  =====================================================================
spec field                    measurement
============================  =====================================================================
compute.matrix[dtype]         every dtype: its best rate over square GEMMs and the three GEMMs of a
                              linear layer (forward, input gradient, weight gradient), after each
                              call's fixed cost: the peak its own curves are relative to
compute.per_dtype[dtype]      every measured dtype's own curves, fitted on that dtype's timings alone:
  .matrix_efficiency          } joint least-squares fit of log(efficiency) = f(FLOPs) + g(smallest
  .matrix_dim_efficiency      } dimension) over its GEMMs (the simulator multiplies the two), both never
                              falling with size, the widest dimension at 1, against its own peak
  .attention_efficiency       causal `scaled_dot_product_attention`, forward and backward, FLOPs as
                              `workloads.transformer` counts them (forward 2*b*h*s*s*d, backward
                              2.5x), against the dtype's own matrix peak
  .vector_efficiency          layer/RMS norm, add, GELU, SiLU*mul, softmax with `workloads`' FLOP and
compute.vector[dtype]         byte counts: the best single-op rate is the peak, and peak x efficiency
                              the rate at which the roofline reproduces their total time (dropout is
                              timed and reported, not fitted: see `measure._Worker._vector`)
compute.matrix_efficiency,    the curve dtype's (`--curve-dtype`, default bf16) curves again: what a
  .matrix_dim_efficiency,     dtype without an entry of its own (one not measured) falls back to
  .attention_efficiency,
  .vector_efficiency
compute.kernel_overhead       one GPT decoder layer at tiny sizes, forward + backward, divided by the
                              kernels the simulator counts for that layer
compute.comm_overlap_slowdown GEMMs timed alone and while all-reduces run beside them
memory.bandwidth, .efficiency tensor copies over sizes (bytes moved = read + write, as `workloads`)
memory.capacity, .reserved    host memory split among ranks; a rank's resident memory after start-up
node.intra_node.collectives   all-reduce, all-gather, reduce-scatter, all-to-all and send/recv over the
                              real backend for every group size: each kind's own alpha-beta fit of the
                              simulator's formula for it (least squares on log time)
node.intra_node               bandwidth and latency: one alpha-beta fit of all kinds together (every
                              kind weighing the same), for kinds without a fit of their own
node.host_link                pinned host <-> device copies (CUDA); an in-memory copy on CPU
node.host, node.storage       /proc/meminfo, core count; sequential write (fsync) and read of a file
============================  =====================================================================

How the machine is split: one device per rank. N ranks run with `cores // N` threads each (or
OMP_NUM_THREADS), which is how `execute` runs N ranks on one box, and every device figure is measured
with all N ranks running the same benchmark at the same moment, so shared caches, memory bandwidth and
cores are contended as they are in a real run. A device is therefore "one rank of N on this machine";
a plan that runs fewer ranks with more threads each needs its own calibration (`--ranks`).

Timing: a single-threaded CPU kernel (the usual case: N ranks on N cores) is timed in the thread's
CPU time (`time.thread_time`): the kernel runs on that thread, its CPU time includes memory stalls
(so contention between our own ranks shows), but not the time other processes on a shared machine
took the core. Everything else is wall time (`time.perf_counter`, after a device synchronize on
CUDA): multi-threaded kernels (CPU time would sum the threads), GPUs, collectives and the overlap
probe (waiting for peers and sharing a core with the backend's threads is the point there), storage.
Every figure is the median of several samples after a warm-up call; a sample repeats a short
operation until it lasts a few milliseconds, and samples of all items of a phase are interleaved
(one pass takes one sample of each), so a burst of load spoils one sample of many items, which the
median rejects, rather than every sample of one. The load average before the run is recorded. Each
operation's fixed cost is measured on a tiny instance of it and subtracted before an efficiency is
computed, since the simulator adds that cost separately (`kernel_overhead`); sizes whose time is mostly
that fixed cost are left out of the curves, which hold their smallest point below.

The fits that turn the timings into those figures are `executor.calibrate.fit`. Each measured dtype
predicts with its own curves and peaks, and each collective kind with its own
bandwidth and latency; the printed fit table shows, next to each, how far the single shared curves
(or the single link figure) of older calibrations were off on the same timings. fp16 on a CPU without
fp16 units runs hundreds of times slower than fp32: its GEMMs and attention are measured up to a call
of `Sweep.max_call_s`, and its curves are held constant beyond the largest size measured.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from executor.calibrate.fit import (
    CalibrationError,
)
from executor.calibrate.measure import (
    MiB,
    ProgressSink,
    Sweep,
    WorkerJob,
    make_sweep,
    measure_host_memory,
    measure_storage,
    phase_totals,
    run_workers,
)
from executor.calibrate.spec import (
    Calibration,
    build_specs,
    fmt_bandwidth,
    fmt_bytes,
    fmt_flop_rate,
    fmt_flops,
    fmt_seconds,
)
from hwmodel.catalog import clear_caches, load_cluster
from hwmodel.cluster import ClusterSpec, NodeSpec
from hwmodel.components import DeviceSpec, MemorySpec
from hwmodel.curves import EfficiencyCurve

DEFAULT_NAME = "cpu-local-calibrated"
MAX_RANKS = 64


def threads_per_rank(ranks: int) -> int:
    """Threads each rank uses, as `execute` sets them: OMP_NUM_THREADS when set, else cores // ranks."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, (os.cpu_count() or 1) // ranks)


def _check_name(name: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name or ""):
        raise CalibrationError(f"--name {name!r}: use letters, digits, '.', '_' and '-' (e.g. {DEFAULT_NAME!r})")


def check_outputs(out: Path, device_out: Path | None, force: bool) -> None:
    """Refuse, before measuring anything, outputs that would replace a file or cannot be loaded."""
    paths = [("--out", out)] + ([("--device-out", device_out)] if device_out is not None else [])
    for option, path in paths:
        if path.suffix.lower() not in (".yaml", ".yml"):
            raise CalibrationError(
                f"{option} {path}: name the file *.yaml or *.yml "
                "(that is how `simulate --cluster` tells a file from a catalog name)"
            )
        if path.exists() and not force:
            raise CalibrationError(f"{path} already exists; choose another name or pass --force to replace it")
        if path.exists() and path.is_dir():
            raise CalibrationError(f"{option} {path} is a directory")
        if not path.parent.exists():
            raise CalibrationError(f"{option} {path}: folder {path.parent} does not exist")
    if device_out is not None and out.resolve() == device_out.resolve():
        raise CalibrationError("--out and --device-out name the same file")


def resolve_storage_dir(storage_dir: Path | None) -> Path:
    directory = Path(storage_dir) if storage_dir is not None else Path(tempfile.gettempdir())
    if not directory.is_dir():
        raise CalibrationError(f"--storage-dir {directory}: no such directory")
    if not os.access(directory, os.W_OK):
        raise CalibrationError(f"--storage-dir {directory}: not writable")
    return directory


@dataclass(frozen=True)
class Options:
    """Calibration options with defaults filled in and checked (see `resolve_options`)."""

    ranks: int
    quick: bool
    storage_dir: Path
    name: str
    curve_dtype: str
    device_type: str
    dtypes: tuple[str, ...]
    threads: int
    num_gpus: int
    timeout_s: float
    notes: tuple[str, ...] = ()


def resolve_options(
    *,
    ranks: int | None = None,
    quick: bool = False,
    storage_dir: Path | None = None,
    name: str = DEFAULT_NAME,
    curve_dtype: str | None = None,
    device_type: str | None = None,
    timeout_s: float = 900.0,
) -> Options:
    """Fill in defaults and check every option, before anything is measured (see `calibrate`).

    Raises:
        CalibrationError: naming the option, the value and what is accepted.
    """
    import torch

    _check_name(name)
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type not in ("cpu", "cuda"):
        raise CalibrationError(f"device type {device_type!r}: use 'cpu' or 'cuda'")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise CalibrationError("CUDA was asked for, but torch sees no CUDA device")
    if not timeout_s > 0:
        raise CalibrationError(f"--timeout {timeout_s}: must be positive (seconds)")
    cores = os.cpu_count() or 1
    num_gpus = torch.cuda.device_count() if device_type == "cuda" else 0
    if ranks is None:
        ranks = num_gpus if device_type == "cuda" else cores
    if not 1 <= ranks <= MAX_RANKS:
        raise CalibrationError(f"--ranks {ranks}: use 1..{MAX_RANKS}")
    if device_type == "cuda" and ranks > num_gpus:
        raise CalibrationError(f"--ranks {ranks}: this machine has {num_gpus} CUDA device(s), one per rank")
    notes = []
    if device_type == "cpu" and ranks > cores:
        notes.append(f"{ranks} ranks on {cores} cores: the ranks share cores, and every figure says so")
    directory = resolve_storage_dir(storage_dir)
    dtypes: tuple[str, ...] = ("fp32", "tf32", "bf16", "fp16") if device_type == "cuda" else ("fp32", "bf16", "fp16")
    if device_type == "cuda" and not torch.cuda.is_bf16_supported():
        dtypes = tuple(d for d in dtypes if d != "bf16")
    if curve_dtype is None:
        from simulator.plan import Plan

        default = Plan.model_fields["dtype"].default
        curve_dtype = default if default in dtypes else "fp32"
    if curve_dtype not in dtypes:
        raise CalibrationError(f"--curve-dtype {curve_dtype!r}: measured dtypes here are {', '.join(dtypes)}")
    return Options(
        ranks,
        quick,
        directory,
        name,
        curve_dtype,
        device_type,
        dtypes,
        threads_per_rank(ranks),
        num_gpus,
        float(timeout_s),
        tuple(notes),
    )


def calibrate(
    *,
    ranks: int | None = None,
    quick: bool = False,
    storage_dir: Path | None = None,
    name: str = DEFAULT_NAME,
    curve_dtype: str | None = None,
    device_type: str | None = None,
    timeout_s: float = 900.0,
    progress: ProgressSink | None = None,
) -> Calibration:
    """Measure this machine and build its device and cluster specs.

    Args:
        ranks: devices (processes) of the node; default: GPUs on CUDA, else the CPU cores.
        quick: a short sweep (~10-20 s on a 2-core CPU) for tests and smoke checks.
        storage_dir: where the storage benchmark writes its temporary file (default: the temp dir).
        name: the cluster's name; its device is called `<name>-device`.
        curve_dtype: the dtype whose own curves are also written as the shared ones (for dtypes without
            a `per_dtype` entry) and whose GEMMs the overlap probe runs (default: the simulator's default
            plan dtype, bf16, where supported). Every measured dtype gets its own curves regardless.
        device_type: "cpu" or "cuda" (default: cuda when available).
        timeout_s: give up when the benchmark ranks have not finished by then.
        progress: receives progress per phase.

    Returns:
        The `Calibration` with validated `DeviceSpec` / `ClusterSpec` and their YAML mappings.

    Raises:
        CalibrationError: an option cannot be honoured or a benchmark process failed.
    """
    opts = resolve_options(
        ranks=ranks,
        quick=quick,
        storage_dir=storage_dir,
        name=name,
        curve_dtype=curve_dtype,
        device_type=device_type,
        timeout_s=timeout_s,
    )
    start = time.monotonic()
    # Other processes' load, before ours starts: wall-time figures cannot be shielded from it.
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    sink = progress or ProgressSink()
    notes = list(opts.notes)
    sweep = make_sweep(opts.quick, opts.device_type)
    jobs = _worker_jobs(opts, sweep, notes)
    _start_progress(sink, sweep, opts, jobs)
    results = run_workers(jobs[0], sink, opts.timeout_s)
    link_results = run_workers(jobs[1], sink, opts.timeout_s) if len(jobs) > 1 else []
    storage = measure_storage(opts.storage_dir, sweep.storage_bytes, sweep.storage_probes, 1 if opts.quick else 3, sink)
    raw = _merge(results, link_results)
    raw["storage"] = storage
    if opts.device_type == "cuda":
        raw["host_memory_bandwidth"] = measure_host_memory()
    raw.update(
        sweep=sweep.name,
        ranks=opts.ranks,
        threads_per_rank=opts.threads,
        curve_dtype=opts.curve_dtype,
        sweep_vector_elems=list(sweep.vector_elems),
        load_average_before=load_before,
    )
    notes += _load_notes(load_before)
    raw["notes"] = notes
    cal = build_specs(raw, name=opts.name, device_type=opts.device_type, elapsed_s=time.monotonic() - start)
    cal.notes.extend(notes)
    return cal


def _worker_jobs(opts: Options, sweep: Sweep, notes: list[str]) -> list[WorkerJob]:
    """What the benchmark ranks run: one launch measures the device (all ranks at once) and the
    collectives of every group size; with one rank, the link needs a second launch of two ranks."""
    ranks = opts.ranks
    device_job = WorkerJob(
        world_size=ranks,
        device_type=opts.device_type,
        threads=opts.threads,
        sweep=sweep,
        dtypes=opts.dtypes,
        curve_dtype=opts.curve_dtype,
        device_phase=True,
        group_sizes=tuple(range(2, ranks + 1)),
        overlap=ranks >= 2,
    )
    if ranks != 1:
        return [device_job]
    if opts.device_type == "cuda" and opts.num_gpus < 2:
        notes.append("one CUDA device: no collectives measured; the intra-node link is not calibrated")
        return [device_job]
    link_job = replace(
        device_job, world_size=2, device_phase=False, group_sizes=(2,), overlap=False, threads=threads_per_rank(2)
    )
    return [device_job, link_job]


def _start_progress(sink: ProgressSink, sweep: Sweep, opts: Options, jobs: list[WorkerJob]) -> None:
    """One progress phase per kind of measurement, with the items of every launch and the storage probe."""
    totals: dict[str, int] = {}
    for job in jobs:
        for phase, total in phase_totals(
            sweep, opts.dtypes, opts.curve_dtype, opts.device_type, job.device_phase, job.group_sizes, job.overlap
        ).items():
            totals[phase] = totals.get(phase, 0) + total
    totals["storage"] = 3
    for phase, total in totals.items():
        sink.start(phase, total)


def _load_notes(load_before: float) -> list[str]:
    cores = os.cpu_count() or 1
    if load_before <= 0.5 * cores:
        return []
    return [
        f"the machine was busy (load average {load_before:.1f} on {cores} cores before calibrating): compute "
        "figures timed in thread CPU time are shielded from that, but wall-time figures (collectives, overlap, "
        "storage) include other processes' interference; rerun when the machine is idle"
    ]


def _merge(results: list[dict], link_results: list[dict]) -> dict[str, Any]:
    """One table per measurement: device figures averaged over ranks (they ran the same items in the
    same order at the same time), collectives from rank 0 (already the slowest rank per sample)."""
    first = results[0]
    raw: dict[str, Any] = {
        "per_rank_reserved_bytes": [r["reserved_bytes"] for r in results],
        "clock": first.get("clock", "wall time"),
    }

    def mean_rows(key: str, fields: Sequence[str]) -> list[dict]:
        rows = [dict(r) for r in first.get(key, [])]
        for i, row in enumerate(rows):
            for f in fields:
                row[f] = float(np.mean([res[key][i][f] for res in results]))
        return rows

    raw["gemm"] = mean_rows("gemm", ("seconds",))
    raw["gemm_zero_s"] = {
        d: float(np.mean([r["gemm_zero_s"][d] for r in results])) for d in first.get("gemm_zero_s", {})
    }
    raw["gemm_dtypes"] = first.get("gemm_dtypes", [])
    raw["attention"] = mean_rows("attention", ("fwd_s", "fwd_bwd_s"))
    raw["attention_zero"] = {
        d: {k: float(np.mean([r["attention_zero"][d][k] for r in results])) for k in ("fwd_s", "fwd_bwd_s")}
        for d in first.get("attention_zero", {})
    }
    raw["copy"] = mean_rows("copy", ("seconds",))
    raw["copy_per_rank"] = [[row["seconds"] for row in r.get("copy", [])] for r in results]
    raw["copy_zero_s"] = float(np.mean([r["copy_zero_s"] for r in results]))
    for key in ("host_h2d", "host_d2h"):
        if key in first:
            raw[key] = mean_rows(key, ("seconds",))
    raw["vector"] = mean_rows("vector", ("seconds",))
    raw["vector_zero_s"] = {
        k: float(np.mean([r["vector_zero_s"][k] for r in results])) for k in first.get("vector_zero_s", {})
    }
    raw["overhead"] = {k: float(np.mean([r["overhead"][k] for r in results])) for k in first["overhead"]}
    raw["collectives"] = (link_results[0] if link_results else first).get("collectives", [])
    if "overlap" in first:
        raw["overlap"] = {
            "sigma": float(np.mean([r["overlap"]["sigma"] for r in results])),
            "per_rank": [r["overlap"]["sigma"] for r in results],
            "gemm_n": first["overlap"]["gemm_n"],
            "dtype": first["overlap"]["dtype"],
        }
    unsupported: dict[str, str] = {}
    for r in results + link_results:
        unsupported.update(r.get("unsupported", {}))
    raw["unsupported"] = unsupported
    return raw


def write_calibration(
    cal: Calibration, out: Path, device_out: Path | None = None, force: bool = False, raw_out: Path | None = None
) -> None:
    """Write the cluster YAML (device inline) and, if asked, the device YAML and the raw timings (JSON);
    then load the cluster back through `hwmodel.load_cluster` as `simulate` will."""
    check_outputs(out, device_out, force)
    if raw_out is not None and raw_out.exists() and not force:
        raise CalibrationError(f"{raw_out} already exists; choose another name or pass --force to replace it")
    out.write_text(cal.cluster_yaml(), encoding="utf-8")
    if device_out is not None:
        device_out.write_text(cal.device_yaml(), encoding="utf-8")
    if raw_out is not None:
        raw_out.write_text(json.dumps(cal.raw, indent=1, default=str), encoding="utf-8")
    clear_caches()  # the catalog caches files by path; a replaced file must be read again
    load_cluster(str(out))


# ================================================================================================
# Summary: measured vs a catalog spec
# ================================================================================================
Row = tuple[str, str, str, str]


class _Rows:
    """The summary table being built: (figure, measured, baseline, measured / baseline)."""

    def __init__(self) -> None:
        self.rows: list[Row] = []

    def add(self, label: str, mine: float | None, base: float | None, fmt: Callable[[float], str]) -> None:
        ratio = f"{mine / base:.2f}x" if mine is not None and base else ""
        self.rows.append((label, fmt(mine) if mine is not None else "-", fmt(base) if base is not None else "-", ratio))


def _pct(v: float) -> str:
    return f"{v:.3f}"


def _compute_rows(rows: _Rows, d: DeviceSpec, baseline: DeviceSpec | None) -> None:
    """Peaks, each dtype's own efficiencies (the baseline's shared ones where it has no per_dtype),
    vector rates, kernel overhead and the overlap slowdown."""
    dtypes = [dt for dt in ("fp32", "tf32", "bf16", "fp16") if dt in d.compute.matrix]
    for dtype in dtypes:
        base_peak = baseline.compute.peak(dtype, "matrix") if baseline else None
        rows.add(f"matrix peak {dtype}", d.compute.matrix[dtype], base_peak, fmt_flop_rate)
    for dtype in dtypes:
        mine = d.compute.efficiencies(dtype)
        base = baseline.compute.efficiencies(dtype) if baseline else None
        for size in (1e6, 1e9):
            rows.add(f"{dtype} GEMM eff @ {fmt_flops(size)}", mine[0](size), base[0](size) if base else None, _pct)
        rows.add(f"{dtype} GEMM dim eff @ 16", mine[1](16), base[1](16) if base else None, _pct)
        if dtype != "tf32":
            for size in (1e7, 1e9):
                label = f"{dtype} attention eff @ {fmt_flops(size)}"
                rows.add(label, mine[2](size), base[2](size) if base else None, _pct)
    for dtype in ("fp32", "bf16", "fp16"):
        if dtype in d.compute.vector:
            rows.add(
                f"{dtype} vector rate (x eff)",
                d.compute.peak(dtype, "vector") * d.compute.efficiencies(dtype)[3],
                baseline.compute.peak(dtype, "vector") * baseline.compute.efficiencies(dtype)[3] if baseline else None,
                fmt_flop_rate,
            )
    rows.add(
        "kernel overhead",
        d.compute.kernel_overhead,
        baseline.compute.kernel_overhead if baseline else None,
        fmt_seconds,
    )
    rows.add(
        "comm overlap slowdown",
        d.compute.comm_overlap_slowdown,
        baseline.compute.comm_overlap_slowdown if baseline else None,
        _pct,
    )


def _memory_rate(memory: MemorySpec, size: float) -> float:
    """Bytes/s a copy moving `size` bytes reaches on `memory`."""
    curve: EfficiencyCurve = memory.efficiency
    return memory.bandwidth * curve(size)


def _memory_rows(rows: _Rows, d: DeviceSpec, baseline: DeviceSpec | None) -> None:
    bmem = baseline.memory if baseline else None
    rows.add("memory bandwidth (peak)", d.memory.bandwidth, bmem.bandwidth if bmem else None, fmt_bandwidth)
    for size in (1 * MiB, 64 * MiB):
        label = f"memory rate @ {fmt_bytes(size)} moved"
        rows.add(label, _memory_rate(d.memory, size), _memory_rate(bmem, size) if bmem else None, fmt_bandwidth)
    rows.add("memory capacity per device", d.memory.capacity, bmem.capacity if bmem else None, fmt_bytes)
    rows.add("memory reserved", d.memory.reserved, bmem.reserved if bmem else None, fmt_bytes)


def _node_rows(rows: _Rows, node: NodeSpec, bnode: NodeSpec | None) -> None:
    """The intra-node link (joint and per collective kind), host link, host and storage."""
    intra, bintra = node.intra_node, bnode.intra_node if bnode else None
    rows.add(
        "intra-node bw (joint fit)",
        intra.effective_bandwidth,
        bintra.effective_bandwidth if bintra else None,
        fmt_bandwidth,
    )
    rows.add("intra-node latency (joint)", intra.latency, bintra.latency if bintra else None, fmt_seconds)
    for kind in intra.collectives:
        # Bandwidth + latency of the kind's own fit; the ratio is of the bandwidths.
        bw, lat = intra.achieved(kind)
        theirs = bintra.achieved(kind) if bintra else None
        rows.rows.append(
            (
                f"{kind} bw + latency",
                f"{fmt_bandwidth(bw)} + {fmt_seconds(lat)}",
                f"{fmt_bandwidth(theirs[0])} + {fmt_seconds(theirs[1])}" if theirs else "-",
                f"{bw / theirs[0]:.2f}x" if theirs else "",
            )
        )
    rows.add(
        "host link bandwidth",
        node.host_link.effective_bandwidth,
        bnode.host_link.effective_bandwidth if bnode else None,
        fmt_bandwidth,
    )
    bhost = bnode.host if bnode else None
    rows.add("host memory", node.host.memory, bhost.memory if bhost else None, fmt_bytes)
    rows.add(
        "host memory bandwidth", node.host.memory_bandwidth, bhost.memory_bandwidth if bhost else None, fmt_bandwidth
    )
    if node.storage is not None:
        bst = bnode.storage if bnode else None
        rows.add("storage read", node.storage.read_bandwidth, bst.read_bandwidth if bst else None, fmt_bandwidth)
        rows.add("storage write", node.storage.write_bandwidth, bst.write_bandwidth if bst else None, fmt_bandwidth)
        rows.add("storage latency", node.storage.latency, bst.latency if bst else None, fmt_seconds)


def summary_rows(cal: Calibration, baseline: DeviceSpec | None, baseline_cluster: ClusterSpec | None) -> list[Row]:
    """(figure, measured, baseline, measured / baseline) rows for the printed table."""
    node = cal.cluster.node_groups[0].node
    bnode = baseline_cluster.node_groups[0].node if baseline_cluster is not None else None
    rows = _Rows()
    _compute_rows(rows, cal.device, baseline)
    _memory_rows(rows, cal.device, baseline)
    _node_rows(rows, node, bnode)
    return rows.rows


def fit_rows(cal: Calibration) -> list[tuple[str, str, str, str]]:
    """(what, median |error|, max |error|, median |error| before) of the spec's predictions against the
    measurements; "before" is what one set of curves shared by all dtypes, or one link figure for all
    collective kinds, gives on the same timings (the spec format before per_dtype / collectives)."""
    rows = []
    f = cal.fits
    for dtype, (med, mx) in f["matmul_errors"].items():
        before = f.get("matmul_shared_errors", {}).get(dtype)
        rows.append((f"GEMM time, {dtype}", f"{med:.0%}", f"{mx:.0%}", f"{before[0]:.0%}" if before else ""))
    for dtype, (med, mx) in f["attention_errors"].items():
        before = f.get("attention_shared_errors", {}).get(dtype)
        rows.append(
            (f"attention fwd+bwd time, {dtype}", f"{med:.0%}", f"{mx:.0%}", f"{before[0]:.0%}" if before else "")
        )
    for dtype, v in f.get("vector", {}).items():
        rows.append((f"elementwise op time, {dtype}", f"{v.errors[0]:.0%}", f"{v.errors[1]:.0%}", ""))
    link = f["link"]
    if link is not None:
        for kind, (med, mx) in link.errors.items():
            own = f["link_by_kind"].get(kind)
            if own is not None:
                omed, omx = own.errors[kind]
                rows.append((f"{kind} time", f"{omed:.0%}", f"{omx:.0%}", f"{med:.0%}"))
            else:
                rows.append((f"{kind} time (joint link fit)", f"{med:.0%}", f"{mx:.0%}", ""))
    return rows
