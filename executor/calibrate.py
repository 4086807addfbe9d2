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
                              timed and reported, not fitted: see `_Worker._vector`)
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

The fits that turn the timings into those figures are `executor.calibrate_fit`. Each measured dtype
predicts with its own curves and peaks, and each collective kind with its own
bandwidth and latency; the printed fit table shows, next to each, how far the single shared curves
(or the single link figure) of older calibrations were off on the same timings. fp16 on a CPU without
fp16 units runs hundreds of times slower than fp32: its GEMMs and attention are measured up to a call
of `Sweep.max_call_s`, and its curves are held constant beyond the largest size measured.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import queue as queue_module
import re
import socket
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from hwmodel.units import format_bandwidth, format_bytes, format_flop_rate, format_flops, format_seconds

from hwmodel.catalog import clear_caches, load_cluster
from hwmodel.cluster import ClusterSpec
from hwmodel.components import DeviceSpec
from hwmodel.curves import EfficiencyCurve
from hwmodel.loading import validate

from .calibrate_fit import (
    COLLECTIVE_KINDS,
    VECTOR_OPS,
    CalibrationError,
    attention_error,
    fit_alpha_beta,
    fit_attention,
    fit_collectives,
    fit_matmul,
    fit_memory,
    fit_vector,
    layout_spread,
    overlap_slowdown,
)

KiB, MiB, GiB = 2**10, 2**20, 2**30

DEFAULT_NAME = "cpu-local-calibrated"
MAX_RANKS = 64



# ================================================================================================
# What to measure
# ================================================================================================
@dataclass(frozen=True)
class Sweep:
    """Sizes and repeat counts of one calibration mode; everything a worker measures follows from it.

    Attributes:
        repeats: timed samples per item (the median is kept).
        sample_s: a sample repeats a short operation until it lasts about this long.
        max_call_s: skip a GEMM, or an attention shape's forward + backward, whose single call would
            take longer (fp16 on CPUs without fp16 units runs tens to hundreds of times slower than fp32).
        gemm_square: n of the n x n x n GEMMs.
        gemm_linear: (tokens, in_features, out_features) of linear layers; each gives three GEMMs.
        attention: (batch, heads, seq_len, head_dim) of causal attention.
        copy_bytes: tensor sizes of the copy (memory bandwidth) sweep.
        vector_elems: elements of the elementwise-op sweep, as (elems // vector_hidden, vector_hidden).
        collective_bytes: message sizes (the full tensor, as `simulator.cost.collectives` counts them).
        collective_inner_bytes: a collective sample repeats the op until this many bytes were moved.
        overlap_s: length of the GEMM loop of the compute/communication overlap probe.
        storage_bytes: file size of the storage benchmark; storage_probes: 4 KiB random reads.
    """

    name: str
    repeats: int
    sample_s: float
    max_call_s: float
    gemm_square: tuple[int, ...]
    gemm_linear: tuple[tuple[int, int, int], ...]
    attention: tuple[tuple[int, int, int, int], ...]
    copy_bytes: tuple[int, ...]
    vector_elems: tuple[int, ...]
    vector_hidden: int
    collective_bytes: tuple[int, ...]
    collective_repeats: int
    collective_inner_bytes: int
    overlap_s: float
    storage_bytes: int
    storage_probes: int


def make_sweep(quick: bool, device_type: str) -> Sweep:
    """The sizes measured in default or `--quick` mode on a CPU or a CUDA device."""
    if device_type == "cuda":
        # GPUs need far larger operations to reach their peak; the structure is the same.
        if quick:
            return Sweep(
                "quick", 3, 0.005, 0.05, (256, 1024, 4096), ((64, 4096, 4096), (1024, 4096, 4096)),
                tuple((4, 16, s, 128) for s in (512, 2048)), (64 * KiB, 4 * MiB, 64 * MiB, 256 * MiB),
                (2**16, 2**22), 4096, (64 * KiB, 4 * MiB, 64 * MiB), 3, 64 * MiB, 0.1, 64 * MiB, 16,
            )
        return Sweep(
            "default", 7, 0.01, 0.5, (256, 512, 1024, 2048, 4096, 8192),
            tuple((t, 4096, 16384) for t in (16, 64, 256, 1024, 4096)) + tuple((t, 1024, 4096) for t in (16, 64, 256)),
            tuple((4, 16, s, 128) for s in (512, 1024, 2048, 4096, 8192)),
            tuple(4 * KiB * 4**i for i in range(10)),  # 4 KiB .. 1 GiB (pinned host buffers of that size per rank)
            tuple(2**i for i in range(16, 27, 2)), 8192,
            tuple(4 * KiB * 4**i for i in range(10)), 5, 256 * MiB, 0.3, 256 * MiB, 64,
        )
    if quick:
        return Sweep(
            "quick", 3, 0.003, 0.05, (32, 128, 512), ((8, 512, 2048), (64, 512, 2048)),
            tuple((1, 8, s, 64) for s in (128, 256, 512)), (4 * KiB, 64 * KiB, 1 * MiB, 16 * MiB),
            (2**14, 2**18), 1024, (4 * KiB, 64 * KiB, 1 * MiB, 4 * MiB), 5, 2 * MiB, 0.1, 16 * MiB, 16,
        )
    return Sweep(
        "default", 7, 0.01, 0.5, (32, 64, 128, 256, 512, 1024, 2048),
        # Training micro-batches of one or a few short sequences live at 64-256 tokens: measure them there.
        tuple((t, 1024, 4096) for t in (8, 32, 64, 128, 256, 512)) + tuple((t, 256, 1024) for t in (8, 32, 64, 128)),
        tuple((1, 8, s, 64) for s in (128, 256, 512, 1024, 2048)) + tuple((1, 4, s, 128) for s in (512, 1024)),
        tuple(4 * KiB * 4**i for i in range(9)),  # 4 KiB .. 256 MiB: L1, L2, L3 and DRAM
        tuple(2**i for i in range(14, 23, 2)), 1024,
        tuple(4 * KiB * 4**i for i in range(8)), 7, 8 * MiB, 0.3, 128 * MiB, 64,
    )


@dataclass(frozen=True)
class GemmItem:
    """One GEMM: (m x k) @ (k x n), as `variant` lays it out (square, or a linear layer's fwd/dgrad/wgrad)."""

    dtype: str
    variant: str
    tokens: int
    k: int
    n: int

    @property
    def flops(self) -> float:
        return 2.0 * self.tokens * self.k * self.n

    @property
    def min_dim(self) -> int:
        return min(self.tokens, self.k, self.n)


def gemm_items(sweep: Sweep, dtypes: Sequence[str]) -> list[GemmItem]:
    """Every GEMM of the sweep, per dtype in increasing FLOPs (so a too-slow dtype is cut off early)."""
    items = []
    for dtype in dtypes:
        per = [GemmItem(dtype, "square", n, n, n) for n in sweep.gemm_square]
        for t, k, n in sweep.gemm_linear:
            per += [GemmItem(dtype, v, t, k, n) for v in ("fwd", "dgrad", "wgrad")]
        items += sorted(per, key=lambda it: (it.flops, it.variant))
    return items


def attention_flops(batch: int, heads: int, seq: int, head_dim: int) -> float:
    """Forward FLOPs of causal flash attention as `workloads.transformer` counts them: half of
    4*b*h*s*s*d (the masked half of the score matrix is skipped)."""
    return 0.5 * 4.0 * batch * heads * seq * seq * head_dim


def attention_dtypes(curve_dtype: str, dtypes: Sequence[str]) -> list[str]:
    """Attention is measured in the curve dtype first, then in every other plan dtype (fp32, bf16, fp16)
    measured here: each gets its own `per_dtype` attention curve. (tf32 is no plan dtype.)"""
    return [curve_dtype] + [d for d in ("fp32", "bf16", "fp16") if d in dtypes and d != curve_dtype]


def phase_totals(sweep: Sweep, dtypes: Sequence[str], curve_dtype: str, device_type: str,
                 device_phase: bool, group_sizes: Sequence[int], overlap: bool) -> dict[str, int]:
    """Items per progress phase; workers tick once per item, in this order."""
    totals: dict[str, int] = {}
    if device_phase:
        totals["overhead"] = 1
        totals["gemm"] = len(gemm_items(sweep, dtypes))
        totals["attention"] = 2 * len(sweep.attention) * len(attention_dtypes(curve_dtype, dtypes))
        totals["memory"] = len(sweep.copy_bytes) * (3 if device_type == "cuda" else 1)
        totals["vector"] = (len(VECTOR_OPS) * len(dtypes) + 1) * len(sweep.vector_elems)
    if group_sizes:
        per_size = len(sweep.collective_bytes)
        group_kinds = len(COLLECTIVE_KINDS) - 1  # all but send/recv run at every group size
        totals["collectives"] = sum(group_kinds * per_size + (per_size if k == 2 else 0) for k in group_sizes)
    if overlap:
        totals["overlap"] = 1
    return totals


PHASE_LABELS = {
    "overhead": "kernel overhead",
    "gemm": "matmul throughput",
    "attention": "attention (SDPA)",
    "memory": "memory bandwidth",
    "vector": "elementwise ops",
    "collectives": "collectives",
    "overlap": "compute/comm overlap",
    "storage": "storage",
}


# ================================================================================================
# Progress
# ================================================================================================
class ProgressSink:
    """Receives progress; the default does nothing (library use without a terminal)."""

    def start(self, phase: str, total: int) -> None:  # noqa: D401 - interface
        """A phase with `total` items begins."""

    def advance(self, phase: str, count: int = 1) -> None:
        """`count` items of `phase` are done."""


class RichProgress(ProgressSink):
    """Progress bars on a rich `Progress` (one bar per phase)."""

    def __init__(self, progress):
        self.progress = progress
        self.tasks: dict[str, Any] = {}

    def start(self, phase: str, total: int) -> None:
        self.tasks[phase] = self.progress.add_task(PHASE_LABELS.get(phase, phase), total=total)

    def advance(self, phase: str, count: int = 1) -> None:
        if phase in self.tasks:
            self.progress.advance(self.tasks[phase], count)


# ================================================================================================
# Worker processes: every device figure and every collective is measured here
# ================================================================================================
@dataclass(frozen=True)
class WorkerJob:
    """What each spawned rank measures (picklable)."""

    world_size: int
    port: int
    device_type: str
    threads: int
    sweep: Sweep
    dtypes: tuple[str, ...]
    curve_dtype: str
    device_phase: bool
    group_sizes: tuple[int, ...]
    overlap: bool


def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _rss_bytes() -> float:
    """Resident memory of this process (Linux), 0 where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return 0.0


class _Worker:
    """One rank: measures the device while every other rank measures the same thing, then collectives."""

    def __init__(self, rank: int, job: WorkerJob, events):
        import torch

        self.torch = torch
        self.rank = rank
        self.job = job
        self.sweep = job.sweep
        self.events = events
        self.cuda = job.device_type == "cuda"
        self.device = torch.device("cuda", rank) if self.cuda else torch.device("cpu")
        self.result: dict[str, Any] = {"rank": rank, "threads": job.threads, "unsupported": {}}
        # A single-threaded CPU kernel runs on this thread: its CPU time is the kernel's time (memory
        # stalls included) without the time other processes on a shared machine took the core.
        # Everything else (several threads, CUDA, collectives, overlap, storage) is wall time.
        self.cpu_clock = not self.cuda and job.threads == 1
        self.clock = time.thread_time if self.cpu_clock else time.perf_counter
        self.result["clock"] = "thread CPU time" if self.cpu_clock else "wall time"

    # ---- plumbing ------------------------------------------------------------------------------
    def tick(self, phase: str) -> None:
        if self.rank == 0:
            self.events.put(("tick", phase, 1))

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def barrier(self, group=None) -> None:
        import torch.distributed as dist

        dist.barrier(group=group if group is not None else self.ctrl)

    def agree(self, flag: bool) -> bool:
        """Rank 0's decision, for every rank: all ranks must run the same items in the same order."""
        import torch.distributed as dist

        t = self.torch.tensor([1 if flag else 0])
        dist.broadcast(t, 0, group=self.ctrl)
        return bool(t.item())

    def time_call(self, fn: Callable[[], Any], repeats: int | None = None) -> float:
        """Median seconds per call of `fn` (on `self.clock`), after a warm-up call (allocation, first
        touch, kernel selection). A sample calls `fn` enough times to last about `sweep.sample_s`."""
        perf = self.clock
        fn()
        self.sync()
        t0 = perf()
        fn()
        self.sync()
        one = perf() - t0
        inner = max(1, min(20000, math.ceil(self.sweep.sample_s / max(one, 1e-7))))
        samples = []
        for _ in range(repeats or self.sweep.repeats):
            t0 = perf()
            for _ in range(inner):
                fn()
            self.sync()
            samples.append((perf() - t0) / inner)
        return statistics.median(samples)

    # ---- main ----------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(self.job.threads)
        torch.manual_seed(1234 + self.rank)
        warnings.filterwarnings("ignore", category=FutureWarning)  # deprecated collective names
        if self.cuda:
            torch.cuda.set_device(self.device)
        backend = "nccl" if self.cuda else "gloo"
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{self.job.port}", rank=self.rank,
            world_size=self.job.world_size, timeout=datetime.timedelta(seconds=180),
        )
        try:
            # Decisions and barriers go over gloo even on CUDA: they are tiny and need no device sync.
            self.ctrl = dist.new_group(backend="gloo") if self.cuda else dist.group.WORLD
            warm = torch.ones(1024, device=self.device)
            dist.all_reduce(warm)
            self.sync()
            self.result["reserved_bytes"] = self._reserved_bytes()
            if self.job.device_phase:
                self._overhead()
                self._gemm()
                self._attention()
                self._memory()
                self._vector()
            for k in self.job.group_sizes:
                self._collectives(k)
            if self.job.overlap:
                self._overlap()
            self.barrier()
        finally:
            dist.destroy_process_group()
        return self.result

    def _reserved_bytes(self) -> float:
        """Memory a rank holds before the job allocates anything: interpreter, torch, backend."""
        if self.cuda:
            free, total = self.torch.cuda.mem_get_info(self.device)
            return float(total - free)
        return _rss_bytes()

    # ---- kernel overhead -----------------------------------------------------------------------
    def _overhead(self) -> None:
        """Per-kernel overhead as the simulator counts kernels: a GPT decoder layer at tiny sizes
        (its compute is negligible), forward and backward, divided by the layer's kernel count in
        `workloads.transformer`. It includes what eager PyTorch adds around each counted kernel
        (module calls, views, autograd bookkeeping), so the simulator reproduces a layer's fixed cost."""
        torch = self.torch
        from torch import nn
        from torch.nn import functional as F

        from workloads.config import WorkloadConfig
        from workloads.ops import ShardShape
        from workloads.transformer import layer_profile

        h, heads, seq = 32, 2, 8
        cfg = WorkloadConfig(name="calibration-probe", family="gpt", num_layers=1, hidden_size=h,
                             num_heads=heads, vocab_size=64, seq_len=seq)
        prof = layer_profile(cfg, "decoder", ShardShape(micro_batch=1, seq_len=seq, dtype_bytes=4))
        kernels = float(prof.fwd_kernels.sum() + prof.bwd_kernels.sum())

        class Block(nn.Module):
            """GPT-2 pre-norm block, separate q/k/v projections, dropout as GPT trains with it."""

            def __init__(self):
                super().__init__()
                self.ln1, self.ln2 = nn.LayerNorm(h), nn.LayerNorm(h)
                self.wq, self.wk, self.wv, self.wo = (nn.Linear(h, h) for _ in range(4))
                self.fc1, self.fc2 = nn.Linear(h, 4 * h), nn.Linear(4 * h, h)
                self.drop = nn.Dropout(0.1)

            def forward(self, x):
                b, s, _ = x.shape
                y = self.ln1(x)
                q, k, v = (w(y).view(b, s, heads, h // heads).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
                a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                x = x + self.drop(self.wo(a.transpose(1, 2).reshape(b, s, h)))
                return x + self.drop(self.fc2(F.gelu(self.fc1(self.ln2(x)))))

        block = Block().to(self.device).train()
        x = torch.randn(1, seq, h, device=self.device, requires_grad=True)
        params = list(block.parameters())

        def step():
            for p in params:
                p.grad = None
            block(x).sum().backward()

        self.barrier()
        layer_s = self.time_call(step)
        a = torch.ones(1, device=self.device)
        with torch.no_grad():
            dispatch_s = self.time_call(lambda: torch.add(a, a))
        self.result["overhead"] = {"layer_s": layer_s, "layer_kernels": kernels, "dispatch_s": dispatch_s}
        self.tick("overhead")

    # ---- interleaved measurement ---------------------------------------------------------------
    def measure(self, phase: str, builders: Sequence[Callable[[], Callable[[], Any] | None]],
                interleave: bool = True, first_call: Callable[[int, float], None] | None = None) -> list[float | None]:
        """Median seconds per call (on `self.clock`) of each item's operation.

        Pass 0 builds every item (a builder may return None: skipped), warms it up, times one call and
        sizes its samples to about `sweep.sample_s`. Then each of `sweep.repeats` passes takes one
        sample of every item in turn, so a burst of load from another process on a shared machine
        spoils one sample of many items -- which the median rejects -- rather than every sample of one
        item. `interleave=False` samples each item right away and drops it (for large pinned buffers).
        `first_call(i, seconds)` sees each single timed call of pass 0 (to size the next items).
        """
        clock = self.clock
        entries: list[list | None] = []
        for i, build in enumerate(builders):
            fn = build()
            if fn is None:
                entries.append(None)
                self.tick(phase)
                continue
            self.barrier()
            fn()
            self.sync()
            t0 = clock()
            fn()
            self.sync()
            one = clock() - t0
            if first_call is not None:
                first_call(i, one)
            inner = max(1, min(20000, math.ceil(self.sweep.sample_s / max(one, 1e-7))))
            entry = [fn, inner, []]
            if not interleave:
                entry[2] = [self._sample(fn, inner) for _ in range(self.sweep.repeats)]
                entry[0] = None  # free the buffers now
            entries.append(entry)
            self.tick(phase)
        if interleave:
            for _ in range(self.sweep.repeats):
                for entry in entries:
                    if entry is not None:
                        self.barrier()
                        entry[2].append(self._sample(entry[0], entry[1]))
        return [statistics.median(e[2]) if e is not None else None for e in entries]

    def _sample(self, fn: Callable[[], Any], inner: int) -> float:
        clock = self.clock
        t0 = clock()
        for _ in range(inner):
            fn()
        self.sync()
        return (clock() - t0) / inner

    # ---- GEMMs ---------------------------------------------------------------------------------
    def _gemm(self) -> None:
        torch = self.torch
        supported = []
        for dtype in self.job.dtypes:
            ok = True
            try:
                a = torch.ones(8, 8, dtype=_torch_dtype(dtype), device=self.device)
                torch.mm(a, a)
            except (RuntimeError, TypeError) as exc:
                ok = False
                self.result["unsupported"][f"matmul {dtype}"] = str(exc).splitlines()[0]
            if self.agree(ok):
                supported.append(dtype)
        self.result["gemm_dtypes"] = supported
        # The fixed cost of one GEMM call: an 8x8 one (its 1 kFLOP is nothing).
        zero: dict[str, float] = {}
        for dtype in supported:
            self._set_tf32(dtype)
            a = torch.ones(8, 8, dtype=_torch_dtype(dtype), device=self.device)
            self.barrier()
            with torch.no_grad():
                zero[dtype] = self.time_call(lambda: torch.mm(a, a))
        items = gemm_items(self.sweep, self.job.dtypes)
        last_rate: dict[str, float] = {}
        skipped: dict[str, list[float]] = {}

        def builder(item: GemmItem):
            def build():
                if item.dtype not in supported:
                    return None
                # Rank 0 extrapolates from the last GEMM of this dtype; every rank follows its decision.
                estimate = item.flops / last_rate[item.dtype] if item.dtype in last_rate else 0.0
                if not self.agree(estimate <= self.sweep.max_call_s):
                    skipped.setdefault(item.dtype, []).append(item.flops)
                    flops = skipped[item.dtype]
                    self.result["unsupported"][f"matmul {item.dtype}"] = (
                        f"{len(flops)} GEMM(s) of {min(flops):.3g} to {max(flops):.3g} FLOP skipped: one call would take "
                        f"more than {self.sweep.max_call_s} s at this dtype's measured rate"
                    )
                    return None
                fn = self._gemm_fn(item)
                tf32 = item.dtype == "tf32"

                def call():
                    self._set_tf32("tf32" if tf32 else "fp32")
                    return fn()

                return call if self.cuda else fn

            return build

        def first_call(i: int, seconds: float) -> None:
            last_rate[items[i].dtype] = items[i].flops / max(seconds, 1e-9)

        with torch.no_grad():
            times = self.measure("gemm", [builder(it) for it in items], first_call=first_call)
        self._set_tf32("fp32")
        self.result["gemm"] = [
            {"dtype": it.dtype, "variant": it.variant, "tokens": it.tokens, "k": it.k, "n": it.n, "flops": it.flops,
             "min_dim": it.min_dim, "seconds": t}
            for it, t in zip(items, times) if t is not None
        ]
        self.result["gemm_zero_s"] = zero

    def _set_tf32(self, dtype: str) -> None:
        if self.cuda:
            self.torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"

    def _gemm_fn(self, item: GemmItem) -> Callable[[], Any]:
        """The GEMM as nn.Linear runs it: weight stored (out, in); forward X @ W^T, input gradient
        dY @ W, weight gradient dY^T @ X."""
        torch = self.torch
        dt = _torch_dtype(item.dtype)
        dev = self.device
        t, k, n = item.tokens, item.k, item.n
        if item.variant == "square":
            a, b = torch.randn(t, k, dtype=dt, device=dev), torch.randn(k, n, dtype=dt, device=dev)
            return lambda: torch.mm(a, b)
        x = torch.randn(t, k, dtype=dt, device=dev)
        w = torch.randn(n, k, dtype=dt, device=dev)
        dy = torch.randn(t, n, dtype=dt, device=dev)
        if item.variant == "fwd":
            return lambda: torch.mm(x, w.t())
        if item.variant == "dgrad":
            return lambda: torch.mm(dy, w)
        return lambda: torch.mm(dy.t(), x)

    # ---- attention -----------------------------------------------------------------------------
    def _attention_fns(self, b: int, h: int, s: int, d: int, dtype: str):
        """Causal SDPA forward, and forward + backward (gradients of q, k, v), in training mode."""
        torch = self.torch
        from torch.nn import functional as F

        dt = _torch_dtype(dtype)
        q, k, v = (torch.randn(b, h, s, d, dtype=dt, device=self.device, requires_grad=True) for _ in range(3))
        g = torch.randn(b, h, s, d, dtype=dt, device=self.device)

        def fwd():
            self._set_tf32(dtype)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        def fwd_bwd():
            return torch.autograd.grad(fwd(), (q, k, v), g)

        return fwd, fwd_bwd

    def _attention(self) -> None:
        """Causal SDPA forward and forward + backward in every attention dtype, shapes in increasing
        FLOPs. A shape whose forward + backward would take longer than `sweep.max_call_s` at the rate
        of that dtype's last shape is skipped (fp16 on CPUs without fp16 units), as GEMMs are."""
        dtypes = [d for d in attention_dtypes(self.job.curve_dtype, self.job.dtypes) if d in self.result.get("gemm_dtypes", ())]
        zero = {}
        for dtype in dtypes:
            fwd0, fb0 = self._attention_fns(1, 1, 8, 8, dtype)
            self.barrier()
            zero[dtype] = {"fwd_s": self.time_call(fwd0), "fwd_bwd_s": self.time_call(fb0)}
        ordered = sorted(self.sweep.attention, key=lambda shape: (attention_flops(*shape), shape))
        shapes = [(dtype, shape) for dtype in dtypes for shape in ordered]
        # Forward and forward + backward of one shape share their tensors; each is its own item.
        pairs = [self._attention_fns(*shape, dtype) for dtype, shape in shapes]
        last_rate: dict[str, float] = {}  # dtype -> forward + backward FLOP/s of its last shape (3.5x forward FLOPs)
        chosen: dict[int, bool] = {}
        skipped: dict[str, list[float]] = {}

        def fwd_builder(i: int):
            def build():
                dtype, shape = shapes[i]
                f = attention_flops(*shape)
                estimate = 3.5 * f / last_rate[dtype] if dtype in last_rate else 0.0
                # Rank 0 decides for every rank, as for GEMMs; the forward + backward item follows it.
                chosen[i] = self.agree(estimate <= self.sweep.max_call_s)
                if not chosen[i]:
                    skipped.setdefault(dtype, []).append(f)
                    self.result["unsupported"][f"attention {dtype}"] = (
                        f"{len(skipped[dtype])} shape(s) of {min(skipped[dtype]):.3g} to {max(skipped[dtype]):.3g} forward FLOP "
                        f"skipped: one forward + backward would take more than {self.sweep.max_call_s} s at this dtype's rate"
                    )
                    return None
                return pairs[i][0]

            return build

        def first_call(j: int, seconds: float) -> None:
            i, which = divmod(j, 2)
            if which == 1:
                last_rate[shapes[i][0]] = 3.5 * attention_flops(*shapes[i][1]) / max(seconds, 1e-9)

        builders = []
        for i in range(len(shapes)):
            builders += [fwd_builder(i), lambda i=i: pairs[i][1] if chosen[i] else None]
        times = self.measure("attention", builders, first_call=first_call)
        for _ in range(2 * len(self.sweep.attention) * (len(attention_dtypes(self.job.curve_dtype, self.job.dtypes)) - len(dtypes))):
            self.tick("attention")  # dtypes this device lacks
        self._set_tf32("fp32")
        self.result["attention"] = [
            {"dtype": dtype, "batch": b, "heads": h, "seq": s, "head_dim": d, "fwd_flops": attention_flops(b, h, s, d),
             "fwd_s": times[2 * i], "fwd_bwd_s": times[2 * i + 1]}
            for i, (dtype, (b, h, s, d)) in enumerate(shapes)
            if times[2 * i] is not None and times[2 * i + 1] is not None
        ]
        self.result["attention_zero"] = zero

    # ---- memory --------------------------------------------------------------------------------
    def _memory(self) -> None:
        torch = self.torch
        tiny_src, tiny_dst = torch.ones(16, device=self.device), torch.empty(16, device=self.device)
        self.barrier()
        self.result["copy_zero_s"] = self.time_call(lambda: tiny_dst.copy_(tiny_src))

        def builder(nbytes: int):
            def build():
                src = torch.ones(nbytes // 4, device=self.device)
                dst = torch.empty_like(src)
                return lambda: dst.copy_(src)

            return build

        times = self.measure("memory", [builder(b) for b in self.sweep.copy_bytes])
        self.result["copy"] = [{"bytes": b, "seconds": t} for b, t in zip(self.sweep.copy_bytes, times)]
        if self.cuda:
            self._host_link()

    def _host_link(self) -> None:
        """Pinned host <-> device copies (each rank its own GPU, all at once, as in offloading)."""
        torch = self.torch
        for direction in ("h2d", "d2h"):
            def builder(nbytes: int):
                def build():
                    host = torch.empty(nbytes // 4, pin_memory=True)
                    dev = torch.empty(nbytes // 4, device=self.device)
                    src, dst = (host, dev) if direction == "h2d" else (dev, host)
                    return lambda: dst.copy_(src, non_blocking=True)

                return build

            times = self.measure("memory", [builder(b) for b in self.sweep.copy_bytes], interleave=False)
            self.result[f"host_{direction}"] = [{"bytes": b, "seconds": t} for b, t in zip(self.sweep.copy_bytes, times)]

    # ---- elementwise ---------------------------------------------------------------------------
    def _vector_fn(self, op: str, x, y, w, b):
        torch = self.torch
        from torch.nn import functional as F

        hidden = x.shape[-1]
        return {
            "layer_norm": lambda: F.layer_norm(x, (hidden,), w, b),
            "rms_norm": lambda: F.rms_norm(x, (hidden,), w),
            "add": lambda: torch.add(x, y),
            "gelu": lambda: F.gelu(x),
            "silu_mul": lambda: F.silu(x) * y,
            "softmax": lambda: torch.softmax(x, dim=-1),
            "dropout_add": lambda: F.dropout(x, 0.1, training=True) + y,
        }[op]

    def _vector_inputs(self, rows: int, hidden: int, dtype: str):
        torch = self.torch
        dt = _torch_dtype(dtype)
        return (torch.randn(rows, hidden, dtype=dt, device=self.device), torch.randn(rows, hidden, dtype=dt, device=self.device),
                torch.ones(hidden, dtype=dt, device=self.device), torch.zeros(hidden, dtype=dt, device=self.device))

    def _vector(self) -> None:
        """Elementwise ops in their forward form, FLOPs and bytes as `workloads` counts them. Dropout is
        measured apart: its random numbers cost far more than the 2 FLOPs per element the workloads
        count, and folding it into the shared vector efficiency would slow every other op."""
        torch = self.torch
        hidden = self.sweep.vector_hidden
        dtypes = [d for d in self.job.dtypes if d in self.result.get("gemm_dtypes", self.job.dtypes) and d != "tf32"]
        plan = [(d, op) for d in dtypes for op in VECTOR_OPS] + [("fp32", "dropout_add")]
        zero = {}
        with torch.no_grad():
            for dtype, op in plan:
                tiny = self._vector_fn(op, *self._vector_inputs(1, 16, dtype))
                self.barrier()
                zero[f"{dtype}/{op}"] = self.time_call(tiny)
            # The ops of one dtype and size read the same tensors (as a layer's ops read one activation).
            inputs = {(d, e): self._vector_inputs(max(1, e // hidden), hidden, d)
                      for d in {d for d, _ in plan} for e in self.sweep.vector_elems}
            items = [(d, op, e) for d, op in plan for e in self.sweep.vector_elems]
            times = self.measure("vector", [lambda d=d, op=op, e=e: self._vector_fn(op, *inputs[(d, e)]) for d, op, e in items])
            inputs.clear()  # free the tensors now that they are timed
        # Keep the tick count fixed whatever dtypes were dropped.
        for _ in range((len(VECTOR_OPS) * len(self.job.dtypes) + 1 - len(plan)) * len(self.sweep.vector_elems)):
            self.tick("vector")
        self.result["vector"] = [{"dtype": d, "op": op, "elems": e, "seconds": t} for (d, op, e), t in zip(items, times)]
        self.result["vector_zero_s"] = zero

    # ---- collectives ---------------------------------------------------------------------------
    def _collectives(self, k: int) -> None:
        """Collectives over ranks 0..k-1 (every rank creates the group; the others wait)."""
        import torch.distributed as dist

        torch = self.torch
        world = self.job.world_size
        group = dist.group.WORLD if k == world else dist.new_group(list(range(k)))
        ctrl = self.ctrl if k == world else (dist.new_group(list(range(k)), backend="gloo") if self.cuda else group)
        rows = self.result.setdefault("collectives", [])
        if self.rank < k:
            all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
            reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
            for kind in COLLECTIVE_KINDS:
                if kind == "send_recv" and k != 2:
                    continue
                unsupported = False
                for nbytes in self.sweep.collective_bytes:
                    if unsupported:
                        self.tick("collectives")
                        continue
                    shard = max(1, nbytes // 4 // k)
                    if kind == "all_reduce":
                        buf = torch.zeros(nbytes // 4, device=self.device)
                        moved = buf.numel() * 4
                        op = lambda: dist.all_reduce(buf, group=group)  # noqa: E731
                    elif kind == "all_gather":
                        inp = torch.zeros(shard, device=self.device)
                        out = torch.empty(shard * k, device=self.device)
                        moved = out.numel() * 4
                        op = lambda: all_gather(out, inp, group=group)  # noqa: E731
                    elif kind == "reduce_scatter":
                        inp = torch.zeros(shard * k, device=self.device)
                        out = torch.empty(shard, device=self.device)
                        moved = inp.numel() * 4
                        op = lambda: reduce_scatter(out, inp, group=group)  # noqa: E731
                    elif kind == "all_to_all":
                        # Each rank sends a shard to every peer; bytes are what one rank sends in all.
                        inp = torch.zeros(shard * k, device=self.device)
                        out = torch.empty(shard * k, device=self.device)
                        moved = inp.numel() * 4
                        op = lambda: dist.all_to_all_single(out, inp, group=group)  # noqa: E731
                    else:
                        buf = torch.zeros(nbytes // 4, device=self.device)
                        moved = buf.numel() * 4
                        peer = 1 - self.rank

                        def op():
                            # A round trip: one-way time is half of it.
                            if self.rank == 0:
                                dist.send(buf, peer, group=group)
                                dist.recv(buf, peer, group=group)
                            else:
                                dist.recv(buf, peer, group=group)
                                dist.send(buf, peer, group=group)
                    try:
                        op()
                        self.sync()
                    except (RuntimeError, NotImplementedError, ValueError) as exc:
                        unsupported = True
                        self.result["unsupported"][kind] = f"{dist.get_backend(group)}: {str(exc).splitlines()[0]}"
                        self.tick("collectives")
                        continue
                    inner = max(1, min(50, math.ceil(self.sweep.collective_inner_bytes / moved)))
                    samples = []
                    for _ in range(self.sweep.collective_repeats):
                        dist.barrier(group=ctrl)
                        self.sync()
                        t0 = time.perf_counter()
                        for _ in range(inner):
                            op()
                        self.sync()
                        samples.append((time.perf_counter() - t0) / inner)
                    # A collective ends when its slowest rank does.
                    slowest = torch.tensor(samples, dtype=torch.float64)
                    dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=ctrl)
                    seconds = statistics.median(slowest.tolist())
                    if kind == "send_recv":
                        seconds /= 2.0
                    rows.append({"kind": kind, "group_size": k, "bytes": moved, "seconds": seconds})
                    self.tick("collectives")
        self.barrier()

    # ---- compute/communication overlap ---------------------------------------------------------
    def _overlap(self) -> None:
        """How much compute slows while an all-reduce runs beside it (`comm_overlap_slowdown`).

        GEMMs of the curve dtype run alone, then with a queue of asynchronous all-reduces long enough
        to outlast them. The simulator slows compute to 1 / (1 + sigma) while communication runs; with
        W the time alone, D the time during, and T the time the all-reduces kept running, the GEMM
        loop took D = T + W - T / (1 + sigma) (or D = W (1 + sigma) when T >= D)."""
        import torch.distributed as dist

        torch = self.torch
        dtype = self.job.curve_dtype
        self._set_tf32(dtype)
        dt = _torch_dtype(dtype)
        nbytes = 4 * MiB if not self.cuda else 256 * MiB
        # Rank 0 sizes the probe from its own measurements and every rank runs the same: the largest
        # square GEMM of at most 20 ms per call (the efficient range), and enough all-reduces of
        # `nbytes` to outlast the GEMM loop even if the two slow each other down threefold.
        squares = [p for p in self.result.get("gemm", []) if p["dtype"] == dtype and p["variant"] == "square"]
        n = max([p["tokens"] for p in squares if p["seconds"] <= 0.02], default=512)
        one = next((p["seconds"] for p in squares if p["tokens"] == n), 0.005)
        calls = max(1, round(self.sweep.overlap_s / one))
        ar = [r for r in self.result.get("collectives", []) if r["kind"] == "all_reduce" and r["group_size"] == self.job.world_size]
        near = min(ar, key=lambda r: abs(math.log(r["bytes"] / nbytes)), default=None)
        per = near["seconds"] * nbytes / near["bytes"] if near else 0.01
        count = max(2, math.ceil(3.0 * one * calls / max(per, 1e-6)))
        shape = torch.tensor([n, calls, count])
        dist.broadcast(shape, 0, group=self.ctrl)
        n, calls_n, count_n = (int(v) for v in shape.tolist())
        a, b = torch.randn(n, n, dtype=dt, device=self.device), torch.randn(n, n, dtype=dt, device=self.device)
        buf = torch.zeros(nbytes // 4, device=self.device)
        sigmas = []
        with torch.no_grad():
            torch.mm(a, b)  # warm-up
            for _ in range(3):
                self.barrier()
                t0 = time.perf_counter()
                for _ in range(calls_n):
                    torch.mm(a, b)
                self.sync()
                alone = time.perf_counter() - t0
                self.barrier()
                handles = [dist.all_reduce(buf, async_op=True) for _ in range(count_n)]
                t0 = time.perf_counter()
                for _ in range(calls_n):
                    torch.mm(a, b)
                self._compute_sync()
                during = time.perf_counter() - t0
                for h in handles:
                    h.wait()
                self.sync()
                comm = time.perf_counter() - t0
                sigmas.append(overlap_slowdown(alone, during, comm))
        self._set_tf32("fp32")
        self.result["overlap"] = {"gemm_n": n, "dtype": dtype, "sigma": statistics.median(sigmas), "samples": sigmas}
        self.tick("overlap")

    def _compute_sync(self) -> None:
        """Wait for this stream's compute only (not for the communication stream)."""
        if self.cuda:
            ev = self.torch.cuda.Event()
            ev.record()
            ev.synchronize()




def _worker_main(rank: int, job: WorkerJob, events) -> None:
    """Entry point of a spawned rank: measure, send the result, exit."""
    result = _Worker(rank, job, events).run()
    events.put(("result", rank, result))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(job_args: dict[str, Any], nprocs: int, sink: ProgressSink, timeout_s: float) -> list[dict[str, Any]]:
    """Spawn `nprocs` ranks (torch.multiprocessing, a free local port), forward their progress to
    `sink`, and return each rank's result, rank order. Stops every rank on failure or timeout."""
    import torch.multiprocessing as mp

    last_error = ""
    for _attempt in range(3):  # a port taken between probing and binding is retried with another
        job = WorkerJob(port=_free_port(), **job_args)
        ctx = mp.get_context("spawn")
        events = ctx.Queue()
        procs = mp.start_processes(_worker_main, args=(job, events), nprocs=nprocs, join=False, start_method="spawn")
        results: dict[int, dict] = {}
        deadline = time.monotonic() + timeout_s
        try:
            done = False
            while not done:
                _drain(events, sink, results)
                try:
                    done = procs.join(timeout=0.1)
                except Exception as exc:  # ProcessRaisedException / ProcessExitedException
                    text = str(exc).strip()
                    last_error = text.splitlines()[-1] if text else type(exc).__name__
                    if "address already in use" in text.lower() or "EADDRINUSE" in text:
                        break
                    rank = getattr(exc, "error_index", "?")
                    raise CalibrationError(f"benchmark rank {rank} failed: {last_error}") from None
                if time.monotonic() > deadline:
                    raise CalibrationError(
                        f"the benchmark ranks did not finish within {timeout_s:.0f} s; the machine may be "
                        "overloaded, or a collective hung (raise --timeout or use fewer --ranks)"
                    )
            else:
                _drain(events, sink, results, wait=True, expected=nprocs)
                if len(results) != nprocs:
                    raise CalibrationError(f"only {len(results)} of {nprocs} benchmark ranks reported a result")
                return [results[r] for r in range(nprocs)]
        finally:
            for p in procs.processes:
                if p.is_alive():
                    p.terminate()
                    p.join(5)
    raise CalibrationError(f"could not start the benchmark ranks: {last_error}")


def _drain(events, sink: ProgressSink, results: dict, wait: bool = False, expected: int = 0) -> None:
    deadline = time.monotonic() + 30.0
    while True:
        try:
            kind, *rest = events.get(timeout=0.5) if wait else events.get_nowait()
        except queue_module.Empty:
            if not wait or len(results) >= expected or time.monotonic() > deadline:
                return
            continue
        if kind == "tick":
            sink.advance(rest[0], rest[1])
        elif kind == "result":
            results[rest[0]] = rest[1]
        if wait and len(results) >= expected:
            # Ticks sent before the results are already consumed; nothing else is pending.
            return


# ================================================================================================
# Storage (parent process, after the ranks are gone so they do not compete for the disk)
# ================================================================================================
def measure_storage(directory: Path, nbytes: int, probes: int, repeats: int, sink: ProgressSink) -> dict[str, Any]:
    """Sequential write (with fsync) and read of a temporary file, and 4 KiB random-read latency.

    Reads go to the disk, not the page cache: after fsync the file's clean pages are dropped with
    posix_fadvise(DONTNEED) (no privileges needed). Returns seconds and bytes; the file is removed.
    """
    block = 4 * MiB
    chunk = os.urandom(block)  # incompressible, in case the volume compresses
    fd, name = tempfile.mkstemp(prefix="hetplan-calibrate-", suffix=".bin", dir=directory)
    path = Path(name)
    result: dict[str, Any] = {"bytes": nbytes}
    can_drop = hasattr(os, "posix_fadvise")
    try:
        writes, reads = [], []
        for _ in range(repeats):
            os.lseek(fd, 0, os.SEEK_SET)
            t0 = time.perf_counter()
            written = 0
            while written < nbytes:
                written += os.write(fd, chunk[: min(block, nbytes - written)])
            os.fsync(fd)
            writes.append(time.perf_counter() - t0)
        sink.advance("storage")
        for _ in range(repeats):
            if can_drop:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.lseek(fd, 0, os.SEEK_SET)
            t0 = time.perf_counter()
            while os.read(fd, block):
                pass
            reads.append(time.perf_counter() - t0)
        sink.advance("storage")
        if can_drop:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        rng = np.random.default_rng(0)
        offsets = rng.integers(0, max(1, nbytes // (4 * KiB)), size=probes) * 4 * KiB
        lat = []
        for off in offsets:
            t0 = time.perf_counter()
            os.pread(fd, 4 * KiB, int(off))
            lat.append(time.perf_counter() - t0)
        sink.advance("storage")
        result.update(write_s=statistics.median(writes), read_s=statistics.median(reads),
                      latency_s=statistics.median(lat), page_cache_dropped=can_drop)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    usage = os.statvfs(directory)
    result["free_bytes"] = float(usage.f_bavail * usage.f_frsize)
    result["filesystem"] = _filesystem_of(directory)
    return result


def measure_host_memory(nbytes: int = 256 * MiB, repeats: int = 5) -> float:
    """Bytes moved per second (read + write) by a large CPU tensor copy on all cores: the host DRAM
    bandwidth of a GPU node, whose ranks measure their GPUs' memory instead."""
    import torch

    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        samples.append(time.perf_counter() - t0)
    return 2.0 * nbytes / statistics.median(samples)


def _filesystem_of(directory: Path) -> str:
    """'type on device' of the mount holding `directory` (from /proc/mounts), for the sources."""
    try:
        resolved = str(directory.resolve())
        best = ("", "")
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mount, fstype, *_ = line.split()
            if (resolved == mount or resolved.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best[0]):
                best = (mount, f"{fstype} on {dev}")
        return best[1] or "unknown filesystem"
    except OSError:
        return "unknown filesystem"


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
    return [_Flow([fmt(s) if fmt else int(s) if float(s).is_integer() else s, round(e, 4)])
            for s, e in zip(curve.sizes, curve.efficiencies)]


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
        return self.header + yaml.dump(self.cluster_mapping, Dumper=_Dumper, sort_keys=False, width=120, allow_unicode=True)

    def device_yaml(self) -> str:
        return self.header + yaml.dump(self.device_mapping, Dumper=_Dumper, sort_keys=False, width=120, allow_unicode=True)


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
    return Options(ranks, quick, directory, name, curve_dtype, device_type, dtypes, threads_per_rank(ranks),
                   num_gpus, float(timeout_s), tuple(notes))


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
    opts = resolve_options(ranks=ranks, quick=quick, storage_dir=storage_dir, name=name, curve_dtype=curve_dtype,
                           device_type=device_type, timeout_s=timeout_s)
    start = time.monotonic()
    # Other processes' load, before ours starts: wall-time figures cannot be shielded from it.
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    sink = progress or ProgressSink()
    ranks, device_type, dtypes, curve_dtype = opts.ranks, opts.device_type, opts.dtypes, opts.curve_dtype
    threads, num_gpus, directory, timeout_s, name = opts.threads, opts.num_gpus, opts.storage_dir, opts.timeout_s, opts.name
    notes = list(opts.notes)
    sweep = make_sweep(quick, device_type)

    # One spawn measures the device (all ranks at once) and the collectives of every group size; with
    # one rank, the link needs a second spawn of two ranks.
    device_job = dict(world_size=ranks, device_type=device_type, threads=threads, sweep=sweep, dtypes=dtypes,
                      curve_dtype=curve_dtype, device_phase=True, group_sizes=tuple(range(2, ranks + 1)),
                      overlap=ranks >= 2)
    link_ranks = 2 if ranks == 1 else 0
    if link_ranks and device_type == "cuda" and num_gpus < 2:
        link_ranks = 0
        notes.append("one CUDA device: no collectives measured; the intra-node link is not calibrated")
    link_job = dict(device_job, world_size=2, device_phase=False, group_sizes=(2,), overlap=False,
                    threads=threads_per_rank(2)) if link_ranks else None
    totals: dict[str, int] = {}
    for job in [device_job] + ([link_job] if link_job else []):
        for phase, total in phase_totals(sweep, dtypes, curve_dtype, device_type, job["device_phase"],
                                         job["group_sizes"], job["overlap"]).items():
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
    raw: dict[str, Any] = {"per_rank_reserved_bytes": [r["reserved_bytes"] for r in results], "clock": first.get("clock", "wall time")}

    def mean_rows(key: str, fields: Sequence[str]) -> list[dict]:
        rows = [dict(r) for r in first.get(key, [])]
        for i, row in enumerate(rows):
            for f in fields:
                row[f] = float(np.mean([res[key][i][f] for res in results]))
        return rows

    raw["gemm"] = mean_rows("gemm", ("seconds",))
    raw["gemm_zero_s"] = {d: float(np.mean([r["gemm_zero_s"][d] for r in results])) for d in first.get("gemm_zero_s", {})}
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
    raw["vector_zero_s"] = {k: float(np.mean([r["vector_zero_s"][k] for r in results])) for k in first.get("vector_zero_s", {})}
    raw["overhead"] = {k: float(np.mean([r["overhead"][k] for r in results])) for k in first["overhead"]}
    raw["collectives"] = (link_results[0] if link_results else first).get("collectives", [])
    if "overlap" in first:
        raw["overlap"] = {"sigma": float(np.mean([r["overlap"]["sigma"] for r in results])),
                          "per_rank": [r["overlap"]["sigma"] for r in results], "gemm_n": first["overlap"]["gemm_n"],
                          "dtype": first["overlap"]["dtype"]}
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
    stamp = (f"measured by `execute calibrate` ({raw['sweep']} mode) on {when}; {what}"
             + (f"; load average {load:.1f} before" if load is not None else ""))
    clock = raw.get("clock", "wall time")
    together = ("all ranks running the same benchmark at once" if ranks > 1 else "one rank") + f", timed in {clock}"

    # ---- matmul: every dtype its own peak and curves ----
    mm = fit_matmul(raw["gemm"], curve_dtype, raw["gemm_zero_s"])
    # ---- attention: every dtype against its own matrix peak ----
    att_curves: dict[str, EfficiencyCurve] = {}
    att_errors: dict[str, tuple[float, float]] = {}
    att_shared_errors: dict[str, tuple[float, float]] = {}
    att_points = {d: sum(1 for p in raw["attention"] if p["dtype"] == d) for d in {p["dtype"] for p in raw["attention"]}}
    for dtype in [curve_dtype] + sorted(set(att_points) - {curve_dtype}):
        if dtype not in mm.peaks:
            continue
        try:
            att_curves[dtype], att_errors[dtype] = fit_attention(raw["attention"], mm.peaks[dtype],
                                                                 raw["attention_zero"].get(dtype), dtype)
        except CalibrationError:
            if dtype == curve_dtype:
                raise
    if curve_dtype not in att_curves:
        raise CalibrationError(f"no usable {curve_dtype} attention measurements")
    att_curve = att_curves[curve_dtype]
    for dtype in att_curves:
        # For the record: the curve dtype's attention curve shared by all, each dtype at the matrix peak
        # the shared GEMM curves give it (calibrations before per_dtype).
        att_shared_errors[dtype] = attention_error([p for p in raw["attention"] if p["dtype"] == dtype], mm.shared_peaks[dtype],
                                                   att_curve, raw["attention_zero"].get(dtype, {}))
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
    spread_text = ("; the three GEMMs of one linear-layer shape differ by up to "
                   + ", ".join(f"{r:.1f}x in {d}" for d, r in spread.items())
                   + " (the simulator gives them one time: no curve removes that)") if spread else ""
    skipped = {k: v for k, v in raw["unsupported"].items() if k.startswith(("matmul", "attention"))}
    dropout_ns = ""
    if dropout:
        big = max(dropout, key=lambda p: p["elems"])
        dropout_ns = (f"; dropout (fp32, as GPT trains) is not in the fit: {big['seconds'] / big['elems'] * 1e9:.3g} ns per "
                      f"element at {big['elems']} elements, {big['seconds'] / add_fp32.get(big['elems'], big['seconds']):.3g}x "
                      "an add of the same size, which the simulator's 2 FLOPs per element do not capture")
    device_sources = {
        "compute.matrix": (
            f"{stamp}; {together}. Each dtype: its best rate, after each call's fixed cost (an 8x8 GEMM), over its GEMMs "
            f"(square, and forward / input-gradient / weight-gradient GEMMs of linear layers; "
            + ", ".join(f"{n} {d}" for d, n in n_gemm.items())
            + "): the peak that dtype's own curves under per_dtype are relative to. Predicted vs measured per GEMM "
            f"with each dtype's own curves: {errs(mm.errors)}"
            + (f" (one set of {curve_dtype} curves shared by all: {errs(mm.shared_errors)})" if len(mm.peaks) > 1 else "")
            + spread_text
            + (f"; skipped: {'; '.join(f'{k} ({v})' for k, v in skipped.items())}" if skipped else "")
        ),
        "compute.per_dtype": (
            f"{stamp}; every measured dtype's own curves, fitted on that dtype's timings alone: matrix_efficiency and "
            "matrix_dim_efficiency as below on its GEMMs against its own compute.matrix peak, attention_efficiency on its "
            "SDPA timings against its own matrix peak, vector_efficiency on its elementwise ops against its own "
            f"compute.vector peak. The {curve_dtype} entry repeats the shared curves"
            + (f"; curves end at the largest size measured: {'; '.join(f'{k} ({v})' for k, v in skipped.items())}" if skipped else "")
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
            + errs({d: v.errors for d, v in vec.items()}) + dropout_ns
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
            if "overlap" in raw else "not measured (one rank): no collective runs beside compute"
        ),
        "memory.capacity": (
            f"{stamp}; {torch.cuda.get_device_properties(0).total_memory / GiB:.1f} GiB reported by the driver"
            if device_type == "cuda" else f"{stamp}; MemTotal {host_mem / GiB:.2f} GiB of /proc/meminfo split among {ranks} rank(s)"
        ),
        "memory.bandwidth": (
            f"{stamp}; {together}; best rate of tensor copies from {fmt_bytes(min(p['bytes'] for p in raw['copy']))} to "
            f"{fmt_bytes(max(p['bytes'] for p in raw['copy']))} (bytes moved = read + write)"
        ),
        "memory.efficiency": f"{stamp}; copy rate / bandwidth per size (bytes moved), after each copy's fixed cost",
        "memory.reserved": (
            f"{stamp}; " + ("memory in use on the GPU after CUDA and NCCL start (mem_get_info)" if device_type == "cuda"
                            else "resident memory of a rank after importing torch and starting gloo (VmRSS)")
        ),
    }
    device_map: dict[str, Any] = {
        "name": dev_name,
        "description": (f"{what.split(',')[0]}: one of {ranks} rank(s)" + (f", {threads} thread(s) each" if device_type == "cpu" else "")
                        + f", calibrated {when}"),
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
        measured_on = (f"{backend} over group sizes {', '.join(map(str, sizes))} and {fmt_bytes(min(c['bytes'] for c in coll))}.."
                       f"{fmt_bytes(max(c['bytes'] for c in coll))} messages (bytes as simulator.cost.collectives counts them; "
                       "send/recv between two ranks, one way: half a round trip)")
        intra_sources = {
            "bandwidth": (
                f"{stamp}; joint alpha-beta fit of simulator.cost.collectives' formulas to {', '.join(kinds)} on {measured_on} "
                "(least squares on log time, every kind weighing the same): the figures for kinds without their own fit "
                "under collectives; predicted vs measured: "
                + ", ".join(f"{k} median {e[0]:.0%} / max {e[1]:.0%}" for k, e in link.errors.items())
                + (f"; not supported by the backend: {', '.join(f'{k} ({v})' for k, v in missing.items())}" if missing else "")
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
        intra = {"kind": kind, "bandwidth": fmt_bandwidth(link.bandwidth), "latency": fmt_seconds(link.latency),
                 "efficiency": 1.0,
                 "collectives": {k: {"bandwidth": fmt_bandwidth(f.bandwidth), "latency": fmt_seconds(f.latency)}
                                 for k, f in by_kind.items()},
                 "sources": intra_sources}
        for k in COLLECTIVE_KINDS:
            if k not in by_kind:
                why = missing.get(k) or ("too few message sizes to fit" if k in kinds else "not measured")
                link_notes.append(f"{k}: no fit of its own ({why}); the simulator uses the joint link figures for it")
    else:
        link, by_kind = None, {}
        intra = {"kind": "shared_memory" if device_type == "cpu" else "pcie", "bandwidth": "1 GB/s", "latency": "10 us",
                 "efficiency": 1.0, "sources": {"bandwidth": "not measured (one device): placeholder [E]"}}
        link_notes.append("intra-node link not measured")
    if device_type == "cuda" and "host_h2d" in raw:
        h2d = fit_alpha_beta([{"kind": "send_recv", "group_size": 2, **r} for r in raw["host_h2d"]])
        d2h = fit_alpha_beta([{"kind": "send_recv", "group_size": 2, **r} for r in raw["host_d2h"]])
        slow = h2d if h2d.bandwidth <= d2h.bandwidth else d2h
        host_link = {"kind": "pcie", "bandwidth": fmt_bandwidth(slow.bandwidth), "latency": fmt_seconds(slow.latency),
                     "efficiency": 1.0, "sources": {
                         "bandwidth": f"{stamp}; pinned copies, every rank at once: host-to-device {fmt_bandwidth(h2d.bandwidth)}, "
                                      f"device-to-host {fmt_bandwidth(d2h.bandwidth)}; the slower direction is written"}}
    else:
        big = max(raw["copy"], key=lambda p: p["bytes"])
        host_link = {
            "kind": "shared_memory",
            "bandwidth": fmt_bandwidth(big["bytes"] / big["seconds"]),
            "latency": fmt_seconds(raw["copy_zero_s"]),
            "efficiency": 1.0,
            "sources": {"bandwidth": f"{stamp}; no host-device copies on a CPU: a {fmt_bytes(big['bytes'])} in-memory copy "
                                     f"per rank ({together}), bytes transferred per second; latency: a tiny copy"},
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
            "all": (f"{stamp}; a {fmt_bytes(st['bytes'])} file in {st['filesystem']}: sequential 4 MiB writes then fsync; "
                    f"sequential reads after dropping its pages from the cache"
                    + ("" if st.get("page_cache_dropped") else " (could not drop the page cache: reads may be cached)")
                    + "; latency: median 4 KiB random read; capacity: free space on the volume"),
        },
    }
    node = {"device": device_map, "num_devices": ranks, "intra_node": intra, "host_link": host_link, "host": host,
            "storage": storage}
    cluster_map = {
        "name": name,
        "description": (f"this machine as calibrated on {when}: {ranks} {'GPU' if device_type == 'cuda' else 'CPU'} rank(s)"
                        + (f" of {threads} thread(s)" if device_type == "cpu" else "")
                        + f" over {intra['kind']}; one node (no inter-node network was measured)"),
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
        "matmul": mm, "matmul_errors": mm.errors, "matmul_shared_errors": mm.shared_errors,
        "attention_errors": att_errors, "attention_shared_errors": att_shared_errors, "link": link, "link_by_kind": by_kind,
        "vector": vec, "kernel_overhead": kernel_overhead, "dispatch_s": ov["dispatch_s"],
        "node_memory_bandwidth": node_bw, "dropout": dropout, "add_fp32": add_fp32,
    }
    return Calibration(device, cluster, device_map, cluster_map, header, raw, fits, elapsed_s, link_notes)


def _gpu_link_kind(bandwidth: float, ranks: int) -> str:
    """NVLink when GPUs talk faster than any PCIe 5.0 x16 link could carry (64 GB/s), else PCIe."""
    return "nvlink" if ranks > 1 and bandwidth > 64e9 else "pcie"


def write_calibration(cal: Calibration, out: Path, device_out: Path | None = None, force: bool = False,
                      raw_out: Path | None = None) -> None:
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
def summary_rows(cal: Calibration, baseline: DeviceSpec | None, baseline_cluster: ClusterSpec | None) -> list[tuple[str, str, str, str]]:
    """(figure, measured, baseline, measured / baseline) rows for the printed table."""
    d, c = cal.device, cal.cluster
    node = c.node_groups[0].node
    bnode = baseline_cluster.node_groups[0].node if baseline_cluster is not None else None
    rows: list[tuple[str, str, str, str]] = []

    def add(label: str, mine: float | None, base: float | None, fmt: Callable[[float], str]) -> None:
        ratio = f"{mine / base:.2f}x" if mine is not None and base else ""
        rows.append((label, fmt(mine) if mine is not None else "-", fmt(base) if base is not None else "-", ratio))

    pct = lambda v: f"{v:.3f}"  # noqa: E731
    dtypes = [dt for dt in ("fp32", "tf32", "bf16", "fp16") if dt in d.compute.matrix]
    for dtype in dtypes:
        add(f"matrix peak {dtype}", d.compute.matrix[dtype],
            baseline.compute.peak(dtype, "matrix") if baseline else None, fmt_flop_rate)
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
            add(f"{dtype} vector rate (x eff)", d.compute.peak(dtype, "vector") * d.compute.efficiencies(dtype)[3],
                baseline.compute.peak(dtype, "vector") * baseline.compute.efficiencies(dtype)[3] if baseline else None,
                fmt_flop_rate)
    add("kernel overhead", d.compute.kernel_overhead, baseline.compute.kernel_overhead if baseline else None, fmt_seconds)
    add("comm overlap slowdown", d.compute.comm_overlap_slowdown, baseline.compute.comm_overlap_slowdown if baseline else None, pct)
    add("memory bandwidth (peak)", d.memory.bandwidth, baseline.memory.bandwidth if baseline else None, fmt_bandwidth)
    for size in (1 * MiB, 64 * MiB):
        add(f"memory rate @ {fmt_bytes(size)} moved", d.memory.bandwidth * d.memory.efficiency(size),
            baseline.memory.bandwidth * baseline.memory.efficiency(size) if baseline else None, fmt_bandwidth)
    add("memory capacity per device", d.memory.capacity, baseline.memory.capacity if baseline else None, fmt_bytes)
    add("memory reserved", d.memory.reserved, baseline.memory.reserved if baseline else None, fmt_bytes)
    add("intra-node bw (joint fit)", node.intra_node.effective_bandwidth,
        bnode.intra_node.effective_bandwidth if bnode else None, fmt_bandwidth)
    add("intra-node latency (joint)", node.intra_node.latency, bnode.intra_node.latency if bnode else None, fmt_seconds)
    for kind in node.intra_node.collectives:
        # Bandwidth + latency of the kind's own fit; the ratio is of the bandwidths.
        (bw, lat), base = node.intra_node.achieved(kind), bnode.intra_node.achieved(kind) if bnode else None
        rows.append((f"{kind} bw + latency", f"{fmt_bandwidth(bw)} + {fmt_seconds(lat)}",
                     f"{fmt_bandwidth(base[0])} + {fmt_seconds(base[1])}" if base else "-", f"{bw / base[0]:.2f}x" if base else ""))
    add("host link bandwidth", node.host_link.effective_bandwidth, bnode.host_link.effective_bandwidth if bnode else None, fmt_bandwidth)
    add("host memory", node.host.memory, bnode.host.memory if bnode else None, fmt_bytes)
    add("host memory bandwidth", node.host.memory_bandwidth, bnode.host.memory_bandwidth if bnode else None, fmt_bandwidth)
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
        rows.append((f"attention fwd+bwd time, {dtype}", f"{med:.0%}", f"{mx:.0%}", f"{before[0]:.0%}" if before else ""))
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
