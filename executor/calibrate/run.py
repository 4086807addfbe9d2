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
                              timed and reported, not fitted: see `calibrate_measure._Worker._vector`)
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

import datetime
import json
import os
import platform
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from executor.calibrate.fit import (
    COLLECTIVE_KINDS,
    CalibrationError,
    attention_error,
    fit_alpha_beta,
    fit_attention,
    fit_collectives,
    fit_matmul,
    fit_memory,
    fit_vector,
    layout_spread,
)
from executor.calibrate.measure import (
    GiB,
    MiB,
    ProgressSink,
    make_sweep,
    measure_host_memory,
    measure_storage,
    phase_totals,
    run_workers,
)
from hwmodel.catalog import clear_caches, load_cluster
from hwmodel.cluster import ClusterSpec
from hwmodel.components import DeviceSpec
from hwmodel.curves import EfficiencyCurve
from hwmodel.loading import validate
from hwmodel.units import format_bandwidth, format_bytes, format_flop_rate, format_flops, format_seconds

DEFAULT_NAME = "cpu-local-calibrated"
MAX_RANKS = 64


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


def threads_per_rank(ranks: int) -> int:
    """Threads each rank uses, as `execute` sets them: OMP_NUM_THREADS when set, else cores // ranks."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, (os.cpu_count() or 1) // ranks)


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


def _check_name(name: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name or ""):
        raise CalibrationError(f"--name {name!r}: use letters, digits, '.', '_' and '-' (e.g. {DEFAULT_NAME!r})")


def check_outputs(out: Path, device_out: Path | None, force: bool) -> None:
    """Refuse, before measuring anything, outputs that would replace a file or cannot be loaded."""
    paths = [("--out", out)] + ([("--device-out", device_out)] if device_out is not None else [])
    for option, path in paths:
        if path.suffix.lower() not in (".yaml", ".yml"):
            raise CalibrationError(
                f"{option} {path}: name the file *.yaml or *.yml (that is how `simulate --cluster` tells a file from a catalog name)"
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
    ranks, device_type, dtypes, curve_dtype = opts.ranks, opts.device_type, opts.dtypes, opts.curve_dtype
    threads, num_gpus, directory, timeout_s, name = (
        opts.threads,
        opts.num_gpus,
        opts.storage_dir,
        opts.timeout_s,
        opts.name,
    )
    notes = list(opts.notes)
    sweep = make_sweep(quick, device_type)

    # One spawn measures the device (all ranks at once) and the collectives of every group size; with
    # one rank, the link needs a second spawn of two ranks.
    device_job = dict(
        world_size=ranks,
        device_type=device_type,
        threads=threads,
        sweep=sweep,
        dtypes=dtypes,
        curve_dtype=curve_dtype,
        device_phase=True,
        group_sizes=tuple(range(2, ranks + 1)),
        overlap=ranks >= 2,
    )
    link_ranks = 2 if ranks == 1 else 0
    if link_ranks and device_type == "cuda" and num_gpus < 2:
        link_ranks = 0
        notes.append("one CUDA device: no collectives measured; the intra-node link is not calibrated")
    link_job = (
        dict(device_job, world_size=2, device_phase=False, group_sizes=(2,), overlap=False, threads=threads_per_rank(2))
        if link_ranks
        else None
    )
    totals: dict[str, int] = {}
    for job in [device_job] + ([link_job] if link_job else []):
        for phase, total in phase_totals(
            sweep, dtypes, curve_dtype, device_type, job["device_phase"], job["group_sizes"], job["overlap"]
        ).items():
            totals[phase] = totals.get(phase, 0) + total
    totals["storage"] = 3
    for phase, total in totals.items():
        sink.start(phase, total)

    results = run_workers(device_job, ranks, sink, timeout_s)
    link_results = run_workers(link_job, 2, sink, timeout_s) if link_job else []
    storage = measure_storage(directory, sweep.storage_bytes, sweep.storage_probes, 1 if quick else 3, sink)

    raw = _merge(results, link_results)
    raw["storage"] = storage
    if device_type == "cuda":
        raw["host_memory_bandwidth"] = measure_host_memory()
    raw["sweep"] = sweep.name
    raw["ranks"] = ranks
    raw["threads_per_rank"] = threads
    raw["curve_dtype"] = curve_dtype
    raw["sweep_vector_elems"] = list(sweep.vector_elems)
    raw["load_average_before"] = load_before
    cores = os.cpu_count() or 1
    if load_before > 0.5 * cores:
        notes.append(
            f"the machine was busy (load average {load_before:.1f} on {cores} cores before calibrating): compute figures "
            "timed in thread CPU time are shielded from that, but wall-time figures (collectives, overlap, storage) "
            "include other processes' interference; rerun when the machine is idle"
        )
    raw["notes"] = notes
    cal = build_specs(raw, name=name, device_type=device_type, elapsed_s=time.monotonic() - start)
    cal.notes.extend(notes)
    return cal


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


def build_specs(raw: dict[str, Any], *, name: str, device_type: str, elapsed_s: float = 0.0) -> Calibration:
    """Fit the measurements in `raw` (as `calibrate` collects them) and build validated specs."""
    import torch

    ranks, threads, curve_dtype = raw["ranks"], raw["threads_per_rank"], raw["curve_dtype"]
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

    # ---- matmul: every dtype its own peak and curves ----
    mm = fit_matmul(raw["gemm"], curve_dtype, raw["gemm_zero_s"])
    # ---- attention: every dtype against its own matrix peak ----
    att_curves: dict[str, EfficiencyCurve] = {}
    att_errors: dict[str, tuple[float, float]] = {}
    att_shared_errors: dict[str, tuple[float, float]] = {}
    att_points = {
        d: sum(1 for p in raw["attention"] if p["dtype"] == d) for d in {p["dtype"] for p in raw["attention"]}
    }
    for dtype in [curve_dtype] + sorted(set(att_points) - {curve_dtype}):
        if dtype not in mm.peaks:
            continue
        try:
            att_curves[dtype], att_errors[dtype] = fit_attention(
                raw["attention"], mm.peaks[dtype], raw["attention_zero"].get(dtype), dtype
            )
        except CalibrationError:
            if dtype == curve_dtype:
                raise
    if curve_dtype not in att_curves:
        raise CalibrationError(f"no usable {curve_dtype} attention measurements")
    att_curve = att_curves[curve_dtype]
    for dtype in att_curves:
        # For the record: the curve dtype's attention curve shared by all, each dtype at the matrix peak
        # the shared GEMM curves give it (calibrations before per_dtype).
        att_shared_errors[dtype] = attention_error(
            [p for p in raw["attention"] if p["dtype"] == dtype],
            mm.shared_peaks[dtype],
            att_curve,
            raw["attention_zero"].get(dtype, {}),
        )
    # ---- memory ----
    bandwidth, mem_curve = fit_memory(raw["copy"], raw["copy_zero_s"])
    # ---- vector: every dtype its own peak and efficiency ----
    vec = fit_vector(raw["vector"], raw["vector_zero_s"], bandwidth, mem_curve)
    if not vec:
        raise CalibrationError("no usable elementwise measurements")
    ref = curve_dtype if curve_dtype in vec else sorted(vec)[0]
    vector_eff = vec[ref].efficiency
    dropout = [p for p in raw["vector"] if p["op"] == "dropout_add"]
    add_fp32 = {p["elems"]: p["seconds"] for p in raw["vector"] if p["op"] == "add" and p["dtype"] == "fp32"}
    # ---- overhead ----
    ov = raw["overhead"]
    kernel_overhead = ov["layer_s"] / ov["layer_kernels"]
    # ---- overlap ----
    sigma = raw.get("overlap", {}).get("sigma", 0.0)
    # ---- memory capacity ----
    host_mem = host_memory_bytes()
    reserved = float(np.max(raw["per_rank_reserved_bytes"]))
    if device_type == "cuda":
        capacity = float(torch.cuda.get_device_properties(0).total_memory)
    else:
        capacity = host_mem / ranks

    dev_name = f"{name}-device"
    order = [d for d in ("fp32", "tf32", "fp16", "bf16") if d in mm.peaks]
    matrix = {d: fmt_flop_rate(mm.peaks[d]) for d in order}
    vector = {d: fmt_flop_rate(vec[d].peak) for d in ("fp32", "fp16", "bf16") if d in vec}
    # Every measured dtype's own curves; the curve dtype's are also the shared ones.
    per_dtype: dict[str, dict[str, Any]] = {}
    for dtype in [d for d in ("fp32", "tf32", "fp16", "bf16") if d in mm.curves or d in vec]:
        entry: dict[str, Any] = {}
        if dtype in mm.curves:
            entry["matrix_efficiency"] = _curve_yaml(mm.curves[dtype][0], fmt_flops)
            entry["matrix_dim_efficiency"] = _curve_yaml(mm.curves[dtype][1], None)
        if dtype in att_curves:
            entry["attention_efficiency"] = _curve_yaml(att_curves[dtype], fmt_flops)
        if dtype in vec:
            entry["vector_efficiency"] = vec[dtype].efficiency
        per_dtype[dtype] = entry

    def errs(errors: dict[str, tuple[float, float]]) -> str:
        return ", ".join(f"{d} median {e[0]:.0%} / max {e[1]:.0%}" for d, e in errors.items())

    n_gemm = {d: sum(1 for p in raw["gemm"] if p["dtype"] == d) for d in mm.peaks}
    spread = {d: r for d, r in layout_spread(raw["gemm"], raw["gemm_zero_s"]).items() if r >= 2.0}
    spread_text = (
        (
            "; the three GEMMs of one linear-layer shape differ by up to "
            + ", ".join(f"{r:.1f}x in {d}" for d, r in spread.items())
            + " (the simulator gives them one time: no curve removes that)"
        )
        if spread
        else ""
    )
    skipped = {k: v for k, v in raw["unsupported"].items() if k.startswith(("matmul", "attention"))}
    dropout_ns = ""
    if dropout:
        big = max(dropout, key=lambda p: p["elems"])
        dropout_ns = (
            f"; dropout (fp32, as GPT trains) is not in the fit: {big['seconds'] / big['elems'] * 1e9:.3g} ns per "
            f"element at {big['elems']} elements, {big['seconds'] / add_fp32.get(big['elems'], big['seconds']):.3g}x "
            "an add of the same size, which the simulator's 2 FLOPs per element do not capture"
        )
    device_sources = {
        "compute.matrix": (
            f"{stamp}; {together}. Each dtype: its best rate, after each call's fixed cost (an 8x8 GEMM), over its GEMMs "
            f"(square, and forward / input-gradient / weight-gradient GEMMs of linear layers; "
            + ", ".join(f"{n} {d}" for d, n in n_gemm.items())
            + "): the peak that dtype's own curves under per_dtype are relative to. Predicted vs measured per GEMM "
            f"with each dtype's own curves: {errs(mm.errors)}"
            + (
                f" (one set of {curve_dtype} curves shared by all: {errs(mm.shared_errors)})"
                if len(mm.peaks) > 1
                else ""
            )
            + spread_text
            + (f"; skipped: {'; '.join(f'{k} ({v})' for k, v in skipped.items())}" if skipped else "")
        ),
        "compute.per_dtype": (
            f"{stamp}; every measured dtype's own curves, fitted on that dtype's timings alone: matrix_efficiency and "
            "matrix_dim_efficiency as below on its GEMMs against its own compute.matrix peak, attention_efficiency on its "
            "SDPA timings against its own matrix peak, vector_efficiency on its elementwise ops against its own "
            f"compute.vector peak. The {curve_dtype} entry repeats the shared curves"
            + (
                f"; curves end at the largest size measured: {'; '.join(f'{k} ({v})' for k, v in skipped.items())}"
                if skipped
                else ""
            )
        ),
        "compute.matrix_efficiency": (
            f"{stamp}; least-squares fit of log efficiency = f(FLOPs) + g(smallest dim) over the GEMMs of one dtype, after "
            f"subtracting each call's fixed cost, both parts never falling with size; this shared curve is {curve_dtype}'s "
            "(--curve-dtype), for dtypes without their own under per_dtype"
        ),
        "compute.matrix_dim_efficiency": f"{stamp}; the g(smallest dim) part of the same fit, 1 at its widest point ({curve_dtype}'s)",
        "compute.attention_efficiency": (
            f"{stamp}; causal scaled_dot_product_attention forward (at its FLOPs, 2*b*h*s^2*d) and backward (at 2.5x), "
            f"relative to the dtype's own matrix peak; this shared curve is {curve_dtype}'s. Forward+backward predicted vs "
            f"measured with each dtype's own curve: {errs(att_errors)}"
            + (f" (the {curve_dtype} curve shared by all: {errs(att_shared_errors)})" if len(att_errors) > 1 else "")
        ),
        "compute.vector": (
            f"{stamp}; {together}; layer/RMS norm, add, GELU, SiLU*mul, softmax at {min(raw['sweep_vector_elems'])}.."
            f"{max(raw['sweep_vector_elems'])} elements with workloads' FLOP and byte counts, per dtype: the best single-op "
            "rate is the peak, and its vector_efficiency (per_dtype) makes peak x efficiency the rate at which the roofline "
            "reproduces their total time; predicted vs measured per op: "
            + errs({d: v.errors for d, v in vec.items()})
            + dropout_ns
        ),
        "compute.vector_efficiency": f"{stamp}; {ref}'s (see compute.vector), for dtypes without their own under per_dtype",
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
        "memory.capacity": (
            f"{stamp}; {torch.cuda.get_device_properties(0).total_memory / GiB:.1f} GiB reported by the driver"
            if device_type == "cuda"
            else f"{stamp}; MemTotal {host_mem / GiB:.2f} GiB of /proc/meminfo split among {ranks} rank(s)"
        ),
        "memory.bandwidth": (
            f"{stamp}; {together}; best rate of tensor copies from {fmt_bytes(min(p['bytes'] for p in raw['copy']))} to "
            f"{fmt_bytes(max(p['bytes'] for p in raw['copy']))} (bytes moved = read + write)"
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
    device_map: dict[str, Any] = {
        "name": dev_name,
        "description": (
            f"{what.split(',')[0]}: one of {ranks} rank(s)"
            + (f", {threads} thread(s) each" if device_type == "cpu" else "")
            + f", calibrated {when}"
        ),
        "vendor": vendor,
        "kind": "gpu" if device_type == "cuda" else "cpu",
        "compute": {
            "matrix": matrix,
            "vector": vector,
            "matrix_efficiency": _curve_yaml(mm.flops_curve, fmt_flops),
            "matrix_dim_efficiency": _curve_yaml(mm.dim_curve, None),
            "attention_efficiency": _curve_yaml(att_curve, fmt_flops),
            "vector_efficiency": vector_eff,
            "kernel_overhead": fmt_seconds(kernel_overhead),
            "comm_overlap_slowdown": round(sigma, 4),
            "per_dtype": per_dtype,
        },
        "memory": {
            "capacity": fmt_bytes(capacity),
            "bandwidth": fmt_bandwidth(bandwidth),
            "efficiency": _curve_yaml(mem_curve, fmt_bytes),
            "reserved": fmt_bytes(reserved),
        },
        "sources": device_sources,
    }

    # ---- links ----
    coll = raw["collectives"]
    link_notes = [
        f"{d} GEMMs: at the same shape the forward, input-gradient and weight-gradient layouts run up to {r:.1f}x apart; "
        f"the simulator has no layout term, so single {d} GEMMs are off by up to that factor"
        for d, r in spread.items()
    ]
    if coll:
        link, by_kind = fit_collectives(coll)
        kinds = [k for k in COLLECTIVE_KINDS if any(c["kind"] == k for c in coll)]
        sizes = sorted({c["group_size"] for c in coll})
        backend = "nccl" if device_type == "cuda" else "gloo"
        missing = {k: v for k, v in raw["unsupported"].items() if k in COLLECTIVE_KINDS}
        measured_on = (
            f"{backend} over group sizes {', '.join(map(str, sizes))} and {fmt_bytes(min(c['bytes'] for c in coll))}.."
            f"{fmt_bytes(max(c['bytes'] for c in coll))} messages (bytes as simulator.cost.collectives counts them; "
            "send/recv between two ranks, one way: half a round trip)"
        )
        intra_sources = {
            "bandwidth": (
                f"{stamp}; joint alpha-beta fit of simulator.cost.collectives' formulas to {', '.join(kinds)} on {measured_on} "
                "(least squares on log time, every kind weighing the same): the figures for kinds without their own fit "
                "under collectives; predicted vs measured: "
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
                f"{stamp}; each kind's own alpha-beta fit on {measured_on}, of the simulator's formula for that kind over one "
                "node of p ranks: all-gather, reduce-scatter and all-to-all (p-1)/p x bytes / bandwidth + min(p-1, ceil(log2 p)) x "
                "latency, all-reduce twice that, send/recv bytes / bandwidth + latency (least squares on log time); "
                "bandwidth is what one rank achieves in the simulator's terms, latency per step"
            ),
        }
        for kind, fit in by_kind.items():
            med, mx = fit.errors[kind]
            jmed, jmx = link.errors[kind]
            n = sum(1 for c in coll if c["kind"] == kind)
            intra_sources[f"collectives.{kind}"] = (
                f"{n} timings; predicted vs measured median {med:.0%} / max {mx:.0%} (the joint fit: {jmed:.0%} / {jmx:.0%})"
            )
        kind = "shared_memory" if device_type == "cpu" else _gpu_link_kind(link.bandwidth, ranks)
        intra = {
            "kind": kind,
            "bandwidth": fmt_bandwidth(link.bandwidth),
            "latency": fmt_seconds(link.latency),
            "efficiency": 1.0,
            "collectives": {
                k: {"bandwidth": fmt_bandwidth(f.bandwidth), "latency": fmt_seconds(f.latency)}
                for k, f in by_kind.items()
            },
            "sources": intra_sources,
        }
        for k in COLLECTIVE_KINDS:
            if k not in by_kind:
                why = missing.get(k) or ("too few message sizes to fit" if k in kinds else "not measured")
                link_notes.append(f"{k}: no fit of its own ({why}); the simulator uses the joint link figures for it")
    else:
        link, by_kind = None, {}
        intra = {
            "kind": "shared_memory" if device_type == "cpu" else "pcie",
            "bandwidth": "1 GB/s",
            "latency": "10 us",
            "efficiency": 1.0,
            "sources": {"bandwidth": "not measured (one device): placeholder [E]"},
        }
        link_notes.append("intra-node link not measured")
    if device_type == "cuda" and "host_h2d" in raw:
        h2d = fit_alpha_beta([{"kind": "send_recv", "group_size": 2, **r} for r in raw["host_h2d"]])
        d2h = fit_alpha_beta([{"kind": "send_recv", "group_size": 2, **r} for r in raw["host_d2h"]])
        slow = h2d if h2d.bandwidth <= d2h.bandwidth else d2h
        host_link = {
            "kind": "pcie",
            "bandwidth": fmt_bandwidth(slow.bandwidth),
            "latency": fmt_seconds(slow.latency),
            "efficiency": 1.0,
            "sources": {
                "bandwidth": f"{stamp}; pinned copies, every rank at once: host-to-device {fmt_bandwidth(h2d.bandwidth)}, "
                f"device-to-host {fmt_bandwidth(d2h.bandwidth)}; the slower direction is written"
            },
        }
    else:
        big = max(raw["copy"], key=lambda p: p["bytes"])
        host_link = {
            "kind": "shared_memory",
            "bandwidth": fmt_bandwidth(big["bytes"] / big["seconds"]),
            "latency": fmt_seconds(raw["copy_zero_s"]),
            "efficiency": 1.0,
            "sources": {
                "bandwidth": f"{stamp}; no host-device copies on a CPU: a {fmt_bytes(big['bytes'])} in-memory copy "
                f"per rank ({together}), bytes transferred per second; latency: a tiny copy"
            },
        }
    # Node DRAM bandwidth: on a CPU every rank copying its largest tensor at once, summed; on a GPU
    # node the ranks measured their GPUs, so the parent measured the host on its own.
    per_rank_big = [rows[-1] for rows in raw["copy_per_rank"] if rows]
    big_bytes = max(p["bytes"] for p in raw["copy"])
    if "host_memory_bandwidth" in raw:
        node_bw = raw["host_memory_bandwidth"]
        node_bw_how = "a 256 MiB CPU tensor copy on all cores, bytes moved (read + write)"
    else:
        node_bw = sum(2.0 * big_bytes / s for s in per_rank_big)
        node_bw_how = f"{ranks} rank(s) each copying {fmt_bytes(big_bytes)} at once, bytes moved summed"
    st = raw["storage"]
    host = {
        "memory": fmt_bytes(host_mem),
        "memory_bandwidth": fmt_bandwidth(node_bw),
        "num_cores": cores,
        "sources": {
            "memory": f"{stamp}; MemTotal of /proc/meminfo",
            "memory_bandwidth": f"{stamp}; {node_bw_how}",
            "num_cores": "os.cpu_count()",
        },
    }
    storage = {
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
    node = {
        "device": device_map,
        "num_devices": ranks,
        "intra_node": intra,
        "host_link": host_link,
        "host": host,
        "storage": storage,
    }
    cluster_map = {
        "name": name,
        "description": (
            f"this machine as calibrated on {when}: {ranks} {'GPU' if device_type == 'cuda' else 'CPU'} rank(s)"
            + (f" of {threads} thread(s)" if device_type == "cpu" else "")
            + f" over {intra['kind']}; one node (no inter-node network was measured)"
        ),
        "node_groups": [{"name": "local", "count": 1, "node": node}],
        "sources": {
            "all": f"{stamp}; every figure measured on this machine (see each part's sources)",
            "network": "absent: a single machine has no inter-node network to measure; --nodes > 1 needs one",
        },
    }
    header = (
        f"# Written by `execute calibrate` on {when} ({raw['sweep']} mode, {elapsed_s:.0f} s).\n"
        f"# Machine: {what}. One device per rank; every device figure was measured with {together}.\n"
        f"# Every measured dtype has its own efficiency curves (compute.per_dtype; the shared ones are {curve_dtype}'s) and every\n"
        f"# measured collective kind its own bandwidth and latency (intra_node.collectives); `sources` says how each was measured.\n"
    )
    device = validate(DeviceSpec, device_map, f"calibrated device {dev_name}", {"strict_units": True})
    cluster = validate(ClusterSpec, cluster_map, f"calibrated cluster {name}", {"strict_units": True})
    fits = {
        "matmul": mm,
        "matmul_errors": mm.errors,
        "matmul_shared_errors": mm.shared_errors,
        "attention_errors": att_errors,
        "attention_shared_errors": att_shared_errors,
        "link": link,
        "link_by_kind": by_kind,
        "vector": vec,
        "kernel_overhead": kernel_overhead,
        "dispatch_s": ov["dispatch_s"],
        "node_memory_bandwidth": node_bw,
        "dropout": dropout,
        "add_fp32": add_fp32,
    }
    return Calibration(device, cluster, device_map, cluster_map, header, raw, fits, elapsed_s, link_notes)


def _gpu_link_kind(bandwidth: float, ranks: int) -> str:
    """NVLink when GPUs talk faster than any PCIe 5.0 x16 link could carry (64 GB/s), else PCIe."""
    return "nvlink" if ranks > 1 and bandwidth > 64e9 else "pcie"


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
def summary_rows(
    cal: Calibration, baseline: DeviceSpec | None, baseline_cluster: ClusterSpec | None
) -> list[tuple[str, str, str, str]]:
    """(figure, measured, baseline, measured / baseline) rows for the printed table."""
    d, c = cal.device, cal.cluster
    node = c.node_groups[0].node
    bnode = baseline_cluster.node_groups[0].node if baseline_cluster is not None else None
    rows: list[tuple[str, str, str, str]] = []

    def add(label: str, mine: float | None, base: float | None, fmt: Callable[[float], str]) -> None:
        ratio = f"{mine / base:.2f}x" if mine is not None and base else ""
        rows.append((label, fmt(mine) if mine is not None else "-", fmt(base) if base is not None else "-", ratio))

    pct = lambda v: f"{v:.3f}"
    dtypes = [dt for dt in ("fp32", "tf32", "bf16", "fp16") if dt in d.compute.matrix]
    for dtype in dtypes:
        add(
            f"matrix peak {dtype}",
            d.compute.matrix[dtype],
            baseline.compute.peak(dtype, "matrix") if baseline else None,
            fmt_flop_rate,
        )
    # Efficiencies of each dtype's own curves (the baseline's shared ones where it has no per_dtype).
    for dtype in dtypes:
        mine = d.compute.efficiencies(dtype)
        base = baseline.compute.efficiencies(dtype) if baseline else None
        for size in (1e6, 1e9):
            add(f"{dtype} GEMM eff @ {fmt_flops(size)}", mine[0](size), base[0](size) if base else None, pct)
        add(f"{dtype} GEMM dim eff @ 16", mine[1](16), base[1](16) if base else None, pct)
        if dtype != "tf32":
            for size in (1e7, 1e9):
                add(f"{dtype} attention eff @ {fmt_flops(size)}", mine[2](size), base[2](size) if base else None, pct)
    for dtype in ("fp32", "bf16", "fp16"):
        if dtype in d.compute.vector:
            add(
                f"{dtype} vector rate (x eff)",
                d.compute.peak(dtype, "vector") * d.compute.efficiencies(dtype)[3],
                baseline.compute.peak(dtype, "vector") * baseline.compute.efficiencies(dtype)[3] if baseline else None,
                fmt_flop_rate,
            )
    add(
        "kernel overhead",
        d.compute.kernel_overhead,
        baseline.compute.kernel_overhead if baseline else None,
        fmt_seconds,
    )
    add(
        "comm overlap slowdown",
        d.compute.comm_overlap_slowdown,
        baseline.compute.comm_overlap_slowdown if baseline else None,
        pct,
    )
    add("memory bandwidth (peak)", d.memory.bandwidth, baseline.memory.bandwidth if baseline else None, fmt_bandwidth)
    for size in (1 * MiB, 64 * MiB):
        add(
            f"memory rate @ {fmt_bytes(size)} moved",
            d.memory.bandwidth * d.memory.efficiency(size),
            baseline.memory.bandwidth * baseline.memory.efficiency(size) if baseline else None,
            fmt_bandwidth,
        )
    add("memory capacity per device", d.memory.capacity, baseline.memory.capacity if baseline else None, fmt_bytes)
    add("memory reserved", d.memory.reserved, baseline.memory.reserved if baseline else None, fmt_bytes)
    add(
        "intra-node bw (joint fit)",
        node.intra_node.effective_bandwidth,
        bnode.intra_node.effective_bandwidth if bnode else None,
        fmt_bandwidth,
    )
    add("intra-node latency (joint)", node.intra_node.latency, bnode.intra_node.latency if bnode else None, fmt_seconds)
    for kind in node.intra_node.collectives:
        # Bandwidth + latency of the kind's own fit; the ratio is of the bandwidths.
        (bw, lat), base = node.intra_node.achieved(kind), bnode.intra_node.achieved(kind) if bnode else None
        rows.append(
            (
                f"{kind} bw + latency",
                f"{fmt_bandwidth(bw)} + {fmt_seconds(lat)}",
                f"{fmt_bandwidth(base[0])} + {fmt_seconds(base[1])}" if base else "-",
                f"{bw / base[0]:.2f}x" if base else "",
            )
        )
    add(
        "host link bandwidth",
        node.host_link.effective_bandwidth,
        bnode.host_link.effective_bandwidth if bnode else None,
        fmt_bandwidth,
    )
    add("host memory", node.host.memory, bnode.host.memory if bnode else None, fmt_bytes)
    add(
        "host memory bandwidth",
        node.host.memory_bandwidth,
        bnode.host.memory_bandwidth if bnode else None,
        fmt_bandwidth,
    )
    if node.storage is not None:
        bst = bnode.storage if bnode else None
        add("storage read", node.storage.read_bandwidth, bst.read_bandwidth if bst else None, fmt_bandwidth)
        add("storage write", node.storage.write_bandwidth, bst.write_bandwidth if bst else None, fmt_bandwidth)
        add("storage latency", node.storage.latency, bst.latency if bst else None, fmt_seconds)
    return rows


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
