"""Calibration's measurements: what to time, the benchmark processes that time it, and the disk.

`executor.calibrate.run` decides the options, runs these, and `executor.calibrate.spec` builds the spec from
what they return (with the fits in `executor.calibrate.fit`). The ranks start through
`executor.ranks.start_ranks`, the launcher's primitive, which also starts training ranks. One process per
rank runs the same benchmarks at the same moment, so shared caches, memory bandwidth and cores are
contended as in a real run (see `executor.calibrate.run`'s docstring for the timing rules); storage is
timed by the parent once the ranks are gone.
"""

from __future__ import annotations

import datetime
import functools
import math
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from executor.calibrate.fit import COLLECTIVE_KINDS, VECTOR_OPS, CalibrationError, overlap_slowdown

if TYPE_CHECKING:
    from executor.ranks import RankContext

KiB, MiB, GiB = 2**10, 2**20, 2**30


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
                "quick",
                3,
                0.005,
                0.05,
                (256, 1024, 4096),
                ((64, 4096, 4096), (1024, 4096, 4096)),
                tuple((4, 16, s, 128) for s in (512, 2048)),
                (64 * KiB, 4 * MiB, 64 * MiB, 256 * MiB),
                (2**16, 2**22),
                4096,
                (64 * KiB, 4 * MiB, 64 * MiB),
                3,
                64 * MiB,
                0.1,
                64 * MiB,
                16,
            )
        return Sweep(
            "default",
            7,
            0.01,
            0.5,
            (256, 512, 1024, 2048, 4096, 8192),
            tuple((t, 4096, 16384) for t in (16, 64, 256, 1024, 4096)) + tuple((t, 1024, 4096) for t in (16, 64, 256)),
            tuple((4, 16, s, 128) for s in (512, 1024, 2048, 4096, 8192)),
            tuple(4 * KiB * 4**i for i in range(10)),  # 4 KiB .. 1 GiB (pinned host buffers of that size per rank)
            tuple(2**i for i in range(16, 27, 2)),
            8192,
            tuple(4 * KiB * 4**i for i in range(10)),
            5,
            256 * MiB,
            0.3,
            256 * MiB,
            64,
        )
    if quick:
        return Sweep(
            "quick",
            3,
            0.003,
            0.05,
            (32, 128, 512),
            ((8, 512, 2048), (64, 512, 2048)),
            tuple((1, 8, s, 64) for s in (128, 256, 512)),
            (4 * KiB, 64 * KiB, 1 * MiB, 16 * MiB),
            (2**14, 2**18),
            1024,
            (4 * KiB, 64 * KiB, 1 * MiB, 4 * MiB),
            5,
            2 * MiB,
            0.1,
            16 * MiB,
            16,
        )
    return Sweep(
        "default",
        7,
        0.01,
        0.5,
        (32, 64, 128, 256, 512, 1024, 2048),
        # Training micro-batches of one or a few short sequences live at 64-256 tokens: measure them there.
        tuple((t, 1024, 4096) for t in (8, 32, 64, 128, 256, 512)) + tuple((t, 256, 1024) for t in (8, 32, 64, 128)),
        tuple((1, 8, s, 64) for s in (128, 256, 512, 1024, 2048)) + tuple((1, 4, s, 128) for s in (512, 1024)),
        tuple(4 * KiB * 4**i for i in range(9)),  # 4 KiB .. 256 MiB: L1, L2, L3 and DRAM
        tuple(2**i for i in range(14, 23, 2)),
        1024,
        tuple(4 * KiB * 4**i for i in range(8)),
        7,
        8 * MiB,
        0.3,
        128 * MiB,
        64,
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


def phase_totals(
    sweep: Sweep,
    dtypes: Sequence[str],
    curve_dtype: str,
    device_type: str,
    device_phase: bool,
    group_sizes: Sequence[int],
    overlap: bool,
) -> dict[str, int]:
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

    def start(self, phase: str, total: int) -> None:
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


@dataclass
class _Item:
    """One item of `_Worker.measure`: its operation, calls per sample, and the samples taken."""

    fn: Callable[[], Any] | None
    inner: int
    samples: list[float] = field(default_factory=list)


class _Worker:
    """One rank: measures the device while every other rank measures the same thing, then collectives."""

    def __init__(self, ctx: RankContext, job: WorkerJob):
        import torch

        self.torch = torch
        self.ctx = ctx
        self.rank = ctx.rank
        self.job = job
        self.sweep = job.sweep
        self.cuda = job.device_type == "cuda"
        self.device = ctx.device
        self.result: dict[str, Any] = {"rank": ctx.rank, "threads": job.threads, "unsupported": {}}
        # A single-threaded CPU kernel runs on this thread: its CPU time is the kernel's time (memory
        # stalls included) without the time other processes on a shared machine took the core.
        # Everything else (several threads, CUDA, collectives, overlap, storage) is wall time.
        self.cpu_clock = not self.cuda and job.threads == 1
        self.clock = time.thread_time if self.cpu_clock else time.perf_counter
        self.result["clock"] = "thread CPU time" if self.cpu_clock else "wall time"

    # ---- plumbing ------------------------------------------------------------------------------
    def tick(self, phase: str) -> None:
        if self.rank == 0:
            self.ctx.emit("tick", phase, 1)

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
        """Every phase of the job, in `phase_totals`' order; the launcher started the process group."""
        import torch
        import torch.distributed as dist

        torch.set_num_threads(self.job.threads)
        torch.manual_seed(1234 + self.rank)
        warnings.filterwarnings("ignore", category=FutureWarning)  # deprecated collective names
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
        cfg = WorkloadConfig(
            name="calibration-probe",
            family="gpt",
            num_layers=1,
            hidden_size=h,
            num_heads=heads,
            vocab_size=64,
            seq_len=seq,
        )
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
    def measure(
        self,
        phase: str,
        builders: Sequence[Callable[[], Callable[[], Any] | None]],
        interleave: bool = True,
        first_call: Callable[[int, float], None] | None = None,
    ) -> list[float | None]:
        """Median seconds per call (on `self.clock`) of each item's operation.

        Pass 0 builds every item (a builder may return None: skipped), warms it up, times one call and
        sizes its samples to about `sweep.sample_s`. Then each of `sweep.repeats` passes takes one
        sample of every item in turn, so a burst of load from another process on a shared machine
        spoils one sample of many items -- which the median rejects -- rather than every sample of one
        item. `interleave=False` samples each item right away and drops it (for large pinned buffers).
        `first_call(i, seconds)` sees each single timed call of pass 0 (to size the next items).
        """
        clock = self.clock
        entries: list[_Item | None] = []
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
            entry = _Item(fn, inner)
            if not interleave:
                entry.samples = [self._sample(fn, inner) for _ in range(self.sweep.repeats)]
                entry.fn = None  # free the buffers now
            entries.append(entry)
            self.tick(phase)
        if interleave:
            for _ in range(self.sweep.repeats):
                for item in entries:
                    if item is not None and item.fn is not None:
                        self.barrier()
                        item.samples.append(self._sample(item.fn, item.inner))
        return [statistics.median(e.samples) if e is not None else None for e in entries]

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
                zero[dtype] = self.time_call(functools.partial(torch.mm, a, a))
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
                        f"{len(flops)} GEMM(s) of {min(flops):.3g} to {max(flops):.3g} FLOP skipped: one call would "
                        f"take more than {self.sweep.max_call_s} s at this dtype's measured rate"
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
            {
                "dtype": it.dtype,
                "variant": it.variant,
                "tokens": it.tokens,
                "k": it.k,
                "n": it.n,
                "flops": it.flops,
                "min_dim": it.min_dim,
                "seconds": t,
            }
            for it, t in zip(items, times)
            if t is not None
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
        dtypes = [
            d
            for d in attention_dtypes(self.job.curve_dtype, self.job.dtypes)
            if d in self.result.get("gemm_dtypes", ())
        ]
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
                        f"{len(skipped[dtype])} shape(s) of {min(skipped[dtype]):.3g} to {max(skipped[dtype]):.3g} "
                        f"forward FLOP skipped: one forward + backward would take more than {self.sweep.max_call_s} s "
                        "at this dtype's rate"
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
        for _ in range(
            2 * len(self.sweep.attention) * (len(attention_dtypes(self.job.curve_dtype, self.job.dtypes)) - len(dtypes))
        ):
            self.tick("attention")  # dtypes this device lacks
        self._set_tf32("fp32")
        self.result["attention"] = [
            {
                "dtype": dtype,
                "batch": b,
                "heads": h,
                "seq": s,
                "head_dim": d,
                "fwd_flops": attention_flops(b, h, s, d),
                "fwd_s": times[2 * i],
                "fwd_bwd_s": times[2 * i + 1],
            }
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

            def builder(nbytes: int, direction: str = direction) -> Callable[[], Callable[[], Any]]:
                def build() -> Callable[[], Any]:
                    host = torch.empty(nbytes // 4, pin_memory=True)
                    dev = torch.empty(nbytes // 4, device=self.device)
                    src, dst = (host, dev) if direction == "h2d" else (dev, host)
                    return lambda: dst.copy_(src, non_blocking=True)

                return build

            times = self.measure("memory", [builder(b) for b in self.sweep.copy_bytes], interleave=False)
            self.result[f"host_{direction}"] = [
                {"bytes": b, "seconds": t} for b, t in zip(self.sweep.copy_bytes, times)
            ]

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
        return (
            torch.randn(rows, hidden, dtype=dt, device=self.device),
            torch.randn(rows, hidden, dtype=dt, device=self.device),
            torch.ones(hidden, dtype=dt, device=self.device),
            torch.zeros(hidden, dtype=dt, device=self.device),
        )

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
            inputs = {
                (d, e): self._vector_inputs(max(1, e // hidden), hidden, d)
                for d in {d for d, _ in plan}
                for e in self.sweep.vector_elems
            }
            items = [(d, op, e) for d, op in plan for e in self.sweep.vector_elems]

            def builder(dtype: str, op: str, elems: int) -> Callable[[], Callable[[], Any] | None]:
                return lambda: self._vector_fn(op, *inputs[(dtype, elems)])

            times = self.measure("vector", [builder(d, op, e) for d, op, e in items])
            inputs.clear()  # free the tensors now that they are timed
        # Keep the tick count fixed whatever dtypes were dropped.
        for _ in range((len(VECTOR_OPS) * len(self.job.dtypes) + 1 - len(plan)) * len(self.sweep.vector_elems)):
            self.tick("vector")
        self.result["vector"] = [
            {"dtype": d, "op": op, "elems": e, "seconds": t} for (d, op, e), t in zip(items, times)
        ]
        self.result["vector_zero_s"] = zero

    # ---- collectives ---------------------------------------------------------------------------
    def _collectives(self, k: int) -> None:
        """Collectives over ranks 0..k-1 (every rank creates the group; the others wait)."""
        import torch.distributed as dist

        world = self.job.world_size
        group = dist.group.WORLD if k == world else dist.new_group(list(range(k)))
        ctrl = self.ctrl if k == world else (dist.new_group(list(range(k)), backend="gloo") if self.cuda else group)
        rows = self.result.setdefault("collectives", [])
        if self.rank < k:
            for kind in COLLECTIVE_KINDS:
                if kind == "send_recv" and k != 2:
                    continue
                unsupported = False
                for nbytes in self.sweep.collective_bytes:
                    if not unsupported:
                        op, moved = self._collective_op(kind, nbytes, k, group)
                        seconds = self._time_collective(op, moved, kind, group, ctrl)
                        unsupported = seconds is None
                        if seconds is not None:
                            rows.append({"kind": kind, "group_size": k, "bytes": moved, "seconds": seconds})
                    self.tick("collectives")
        self.barrier()

    def _collective_op(self, kind: str, nbytes: int, k: int, group: Any) -> tuple[Callable[[], Any], int]:
        """One call of collective `kind` of about `nbytes` over `group` (k ranks), and the bytes it moves as
        `simulator.cost.collectives` counts them."""
        import torch.distributed as dist

        torch, device = self.torch, self.device
        shard = max(1, nbytes // 4 // k)
        if kind == "all_reduce":
            buf = torch.zeros(nbytes // 4, device=device)
            return (lambda: dist.all_reduce(buf, group=group)), buf.numel() * 4
        if kind == "all_gather":
            all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
            inp, out = torch.zeros(shard, device=device), torch.empty(shard * k, device=device)
            return (lambda: all_gather(out, inp, group=group)), out.numel() * 4
        if kind == "reduce_scatter":
            reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
            inp, out = torch.zeros(shard * k, device=device), torch.empty(shard, device=device)
            return (lambda: reduce_scatter(out, inp, group=group)), inp.numel() * 4
        if kind == "all_to_all":
            # Each rank sends a shard to every peer; bytes are what one rank sends in all.
            inp, out = torch.zeros(shard * k, device=device), torch.empty(shard * k, device=device)
            return (lambda: dist.all_to_all_single(out, inp, group=group)), inp.numel() * 4
        buf = torch.zeros(nbytes // 4, device=device)
        peer = 1 - self.rank

        def round_trip() -> None:
            # A round trip: one-way time is half of it.
            if self.rank == 0:
                dist.send(buf, peer, group=group)
                dist.recv(buf, peer, group=group)
            else:
                dist.recv(buf, peer, group=group)
                dist.send(buf, peer, group=group)

        return round_trip, buf.numel() * 4

    def _time_collective(self, op: Callable[[], Any], moved: int, kind: str, group: Any, ctrl: Any) -> float | None:
        """Median seconds of `op` on the slowest rank (one way for send/recv); None, with the reason kept in
        `unsupported`, where the backend refuses it."""
        import torch.distributed as dist

        try:
            op()
            self.sync()
        except (RuntimeError, NotImplementedError, ValueError) as exc:
            self.result["unsupported"][kind] = f"{dist.get_backend(group)}: {str(exc).splitlines()[0]}"
            return None
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
        slowest = self.torch.tensor(samples, dtype=self.torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=ctrl)
        seconds = statistics.median(slowest.tolist())
        return seconds / 2.0 if kind == "send_recv" else seconds

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
        ar = [
            r
            for r in self.result.get("collectives", [])
            if r["kind"] == "all_reduce" and r["group_size"] == self.job.world_size
        ]
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


def _worker_main(ctx: RankContext, job: WorkerJob) -> dict[str, Any]:
    """A benchmark rank, as `executor.launch.start_ranks` runs it: measure and return the result."""
    return _Worker(ctx, job).run()


# The ranks wait this long in a collective for a peer (a slow item on a loaded machine must not abort).
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=180)


def run_workers(job: WorkerJob, sink: ProgressSink, timeout_s: float) -> list[dict[str, Any]]:
    """Start `job.world_size` benchmark ranks through the launcher, forward their progress to `sink`,
    and return each rank's result, in rank order. Every rank is stopped on a failure or the timeout.

    Raises:
        CalibrationError: a rank failed (named, with its cause), or the ranks ran past `timeout_s`.
    """
    from executor.ranks import LaunchTimeout, RankFailure, start_ranks

    def relay(kind: str, payload: tuple[Any, ...]) -> None:
        if kind == "tick":
            sink.advance(payload[0], payload[1])

    try:
        return start_ranks(
            _worker_main,
            (job,),
            job.world_size,
            job.device_type,
            on_event=relay,
            timeout=COLLECTIVE_TIMEOUT,
            deadline_s=timeout_s,
        )
    except RankFailure as exc:
        raise CalibrationError(f"benchmark {exc}") from None
    except LaunchTimeout:
        raise CalibrationError(
            f"the benchmark ranks did not finish within {timeout_s:.0f} s; the machine may be "
            "overloaded, or a collective hung (raise --timeout or use fewer --ranks)"
        ) from None


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
        result.update(
            write_s=statistics.median(writes),
            read_s=statistics.median(reads),
            latency_s=statistics.median(lat),
            page_cache_dropped=can_drop,
        )
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
