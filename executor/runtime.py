"""One rank's run: build its part of the model, train, measure, checkpoint, gather the results.

Every iteration trains on step i's global batch of `SyntheticTokens` (a function of the seed and i, so
a resumed run sees the same data); the ranks at data-parallel index d take sequence k of the batch when
(k // micro_batch) % dp == d, and splits its share into the plan's micro-batches in order; under
context parallelism each of its cp ranks takes its own columns (token positions) of those sequences. Dropout's
generator is reseeded from (seed, i) at each iteration for the same reason (every rank draws from the
same seed, so replicated tensor-parallel regions drop the same elements; with dropout, different
layouts therefore train alike statistically, not bit for bit as they do without it).

Timing: ranks meet at a barrier before each iteration, each times its own iteration to the end of the
optimizer step (CUDA synchronized), and the iteration's time is the slowest rank's. The reported
iteration time is the median over the iterations after warm-up. Memory: see `executor.memory`; saved
activations are tracked during the first iteration this run executes.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from executor import checkpoint
from executor.job import FAIL_AT_STEP_ENV, FAIL_MODE_ENV, FAIL_RANK_ENV, Job, RunResult, wall_clock
from executor.memory import SavedTensorTracker, gradient_bytes, optimizer_bytes, parameter_bytes
from executor.parallel.parallelize import Layout, RankModel, build_rank_model, replica_loss_scale, replica_sequences
from workloads.torch_models import SyntheticTokens, loss_fn

# How many measured iterations --trace records (a trace of hundreds of iterations is unreadable).
TRACE_ITERATIONS = 3

StepCallback = Callable[[int, int, float], None]  # (iterations done, total, seconds of the last one)

# Exit status of `execute` when a non-finite loss or gradient norm stopped the run (1: a rank failed,
# 2: bad input, 3: the plan does not fit in memory).
NONFINITE_EXIT = 4


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient norm at some iteration on some rank (the run stops, exit NONFINITE_EXIT)."""


def _dp_indices(
    global_batch: int, micro_batch: int, dp: int, dp_rank: int, split: tuple[int, ...] | None = None
) -> torch.Tensor:
    """The sequences of the global batch this data-parallel rank trains on, micro-batch by micro-batch.

    Each micro-step takes the next micro_batch * dp sequences: replica d the d-th micro_batch of them, or,
    with an uneven `split`, the split[d] sequences after those of replicas 0..d-1."""
    idx = torch.arange(global_batch)
    if not split:
        return idx[(idx // micro_batch) % dp == dp_rank]
    step = sum(split)
    start = sum(split[:dp_rank])
    offset = idx % step
    return idx[(offset >= start) & (offset < start + split[dp_rank])]


def _maybe_fail(step: int, rank: int, in_process: bool, rank_model: RankModel | None = None) -> None:
    """Fault injection (HETPLAN_FAIL_AT_STEP / HETPLAN_FAIL_RANK / HETPLAN_FAIL_MODE)."""
    at = os.environ.get(FAIL_AT_STEP_ENV)
    if at is None or int(at) != step or int(os.environ.get(FAIL_RANK_ENV, "0")) != rank:
        return
    mode = os.environ.get(FAIL_MODE_ENV, "kill")
    if mode == "nan" and rank_model is not None:
        # A diverged or corrupted weight: every loss and gradient downstream of it becomes NaN.
        print(f"hetplan: rank {rank}: injected NaN weight at step {step}", file=sys.stderr, flush=True)
        with torch.no_grad():
            first = next(iter(rank_model.parameters()))
            (first.to_local() if hasattr(first, "to_local") else first).fill_(float("nan"))
        return
    kill = mode == "kill" and not in_process
    # The moment of the fault, in the log: what the launcher's report of it is measured against.
    how = "killing itself with SIGKILL" if kill else "raising an exception"
    print(
        f"hetplan: rank {rank}: injected failure at step {step} ({FAIL_AT_STEP_ENV}={at}), {how} at "
        f"{wall_clock(time.time())}",
        file=sys.stderr,
        flush=True,
    )
    if kill:
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"injected failure at step {step} ({FAIL_AT_STEP_ENV}={at})")


def _local_loss(loss: torch.Tensor) -> torch.Tensor:
    """A plain tensor of a loss that may be a replicated DTensor (vocabulary-parallel loss)."""
    return loss.to_local() if hasattr(loss, "to_local") else loss


class Trainer:
    """Runs iterations of one rank's RankModel."""

    def __init__(self, job: Job, rank_model: RankModel):
        self.job = job
        self.rm = rank_model
        bound = job.bound
        self.plan = bound.plan
        layout = rank_model.layout
        self.micro_batch = replica_sequences(self.plan, layout.dp_rank)
        global_batch = self.plan.global_batch
        assert global_batch is not None  # the bound plan has it filled in
        self.data = SyntheticTokens(job.workload, global_batch, job.seed)
        self.indices = _dp_indices(
            global_batch, self.plan.micro_batch, layout.dp, layout.dp_rank, self.plan.batch_split
        )
        # An uneven batch_split weighs each replica's loss by its share (see replica_loss_scale).
        self.loss_scale = replica_loss_scale(self.plan, layout.dp_rank)
        # The loss is computed by the last stage's ranks; tp ranks hold the same value; dp ranks average,
        # each weighted by its share of the sequences (loss_scale / dp: 1 / dp for an even split).
        # Under context parallelism each of the cp ranks holds the mean over its equal share of the tokens.
        self.loss_weight = (
            self.loss_scale / (layout.dp * layout.cp) if (rank_model.is_last_stage and layout.tp_rank == 0) else 0.0
        )

    def _batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.data.batch(step)
        x, y = x[self.indices], y[self.indices]
        if self.rm.token_positions is not None:  # context parallelism: this rank's share of the tokens
            x, y = x[:, self.rm.token_positions], y[:, self.rm.token_positions]
        device = self.rm.layout.device
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def step(self, step: int) -> tuple[torch.Tensor, bool]:
        """One training iteration; returns this rank's mean loss (zero where no loss is computed) and whether
        the optimizer stepped (False: skipped as non-finite under --skip-nonfinite)."""
        torch.manual_seed(self.job.seed * 1_000_003 + step)  # dropout: the same masks after a resume
        x, y = self._batch(step)
        rm = self.rm
        loss = self._pipeline_step(x, y) if rm.schedule is not None else self._accumulate_step(x, y)
        rm.sync_tied_gradients()
        if not self._finite(step, loss):
            return loss, False
        for opt in rm.optimizers:
            opt.step()
        return loss, True

    def _finite(self, step: int, loss: torch.Tensor) -> bool:
        """Whether this iteration's loss and this rank's gradient norm are finite. Not finite: raise
        NonFiniteError naming the step and rank, or, under --skip-nonfinite, return False on every rank
        (one all-reduce, so the ranks skip the same iterations and stay in step)."""
        present = [p.grad for p in self.rm.parameters() if p.grad is not None]
        grads = [(g.to_local() if hasattr(g, "to_local") else g).detach() for g in present]
        norm = (
            torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            if grads
            else torch.zeros((), device=loss.device)
        )
        ok = bool(torch.isfinite(loss).all()) and bool(torch.isfinite(norm))
        layout = self.rm.layout
        if self.job.skip_nonfinite:
            if layout.world_size > 1:
                flag = torch.tensor([1.0 if ok else 0.0], device=layout.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MIN)
                ok = bool(flag.item() == 1.0)
            return ok
        if not ok:
            what = "loss" if not bool(torch.isfinite(loss).all()) else "gradient norm"
            raise NonFiniteError(
                f"non-finite {what} at step {step} on rank {layout.rank} (loss {float(loss):.4g}, gradient norm "
                f"{float(norm):.4g}); pass --skip-nonfinite to skip such steps instead"
            )
        return True

    def _accumulate_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        rm = self.rm
        module = rm.chunks[0].module
        m = rm.num_micro_batches
        total = torch.zeros((), device=x.device)
        for j in range(m):
            last = j == m - 1
            xs, ys = (
                x[j * self.micro_batch : (j + 1) * self.micro_batch],
                y[j * self.micro_batch : (j + 1) * self.micro_batch],
            )
            if rm.uses_fsdp:
                # Reduce gradients once, after the last micro-batch (gradient accumulation). Each FSDP2
                # module by itself: with per-layer layouts the chunk's root may not be one.
                for fsdp in (sub for sub in module.modules() if isinstance(sub, FSDPModule)):
                    fsdp.set_requires_gradient_sync(last, recurse=False)
                sync = nullcontext()
            else:
                no_sync = getattr(module, "no_sync", None)  # DistributedDataParallel (zero1) has one
                sync = no_sync() if (no_sync is not None and not last) else nullcontext()
            with sync, rm.forward_context():
                loss = loss_fn(module(xs), ys)
                (loss * (self.loss_scale / m)).backward()
            total += _local_loss(loss).detach()
        return total / m

    def _pipeline_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        rm = self.rm
        losses: list[torch.Tensor] = []
        target = y if rm.is_last_stage else None
        assert rm.schedule is not None
        with rm.forward_context():
            if rm.is_first_stage:
                rm.schedule.step(x, target=target, losses=losses)
            else:
                rm.schedule.step(target=target, losses=losses)
        if not losses:
            return torch.zeros((), device=x.device)
        # The schedule's loss function carries the replica's scale; the reported loss is the plain mean.
        return torch.stack([_local_loss(v).detach() for v in losses]).mean() / self.loss_scale

    def zero_grad(self) -> None:
        for opt in self.rm.optimizers:
            opt.zero_grad(set_to_none=True)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


MEMORY_KEYS = ("weights", "gradients", "optimizer", "activations", "buffers", "peak")


@dataclass
class _Measurements:
    """What one rank measured, per executed iteration and overall."""

    losses: list[torch.Tensor] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    memory: dict[str, float] = field(default_factory=lambda: dict.fromkeys(MEMORY_KEYS, 0.0))


def run_rank(
    job: Job, rank: int, world_size: int, device: torch.device, on_step: StepCallback | None, in_process: bool = False
) -> RunResult | None:
    """Run `job` as rank `rank` of `world_size` (its process group, if any, is initialized).

    Returns the gathered RunResult on rank 0, None elsewhere.
    """
    bound = job.bound
    layout = Layout.of(bound, rank, world_size, device)
    rank_model = build_rank_model(bound, layout, job.seed)
    trainer = Trainer(job, rank_model)
    start = checkpoint.load_latest(job, rank_model) if job.resume else 0
    total = job.total_steps
    executed = list(range(start, total))
    timed_from = max(0, job.warmup - start)
    warnings: list[str] = []
    if executed and timed_from >= len(executed):
        timed_from = 0
        warnings.append("every iteration of this run was a warm-up iteration; the median includes them")
    every = job.checkpoint_every or total  # default: one checkpoint, after the last iteration

    measured = _Measurements()
    tracker = SavedTensorTracker()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    profiler = _profiler(job, rank, device)
    traced = 0
    skipped: list[int] = []
    for n, step in enumerate(executed):
        _maybe_fail(step, rank, in_process, rank_model)
        if world_size > 1:
            dist.barrier()  # every rank starts the iteration together: its time is the slowest rank's
        track = n == 0
        if profiler is not None and n == timed_from:
            profiler.__enter__()
        started, cpu_started = time.perf_counter(), time.process_time()
        with tracker if track else nullcontext():
            loss, stepped = trainer.step(step)
        if not stepped:
            skipped.append(step)
        if track:
            measured.memory["gradients"] = float(gradient_bytes(rank_model.parameters()))
        trainer.zero_grad()
        _synchronize(device)
        measured.times.append(time.perf_counter() - started)
        measured.cpu_times.append(time.process_time() - cpu_started)
        measured.losses.append(loss)
        if profiler is not None and n >= timed_from:
            traced += 1
            if traced == TRACE_ITERATIONS or n == len(executed) - 1:
                profiler.__exit__(None, None, None)
                profiler.export_chrome_trace(job.trace)
                profiler = None
        if on_step is not None and rank == 0:
            on_step(step + 1, total, measured.times[-1])
        if job.checkpoint_dir and ((step + 1) % every == 0 or step + 1 == total):
            checkpoint.save(job, rank_model, step + 1)

    _final_memory(measured.memory, rank_model, tracker, device)
    gathered = _gather(layout, trainer.loss_weight, measured)
    if gathered is None:
        return None
    losses, times, per_rank = gathered
    return RunResult(
        first_step=start,
        losses=losses,
        step_times_s=times,
        cpu_times_s=list(measured.cpu_times),
        timed=list(range(timed_from, len(times))),
        memory=per_rank,
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        warnings=warnings + _skipped_warning(skipped),
        skipped_steps=skipped,
    )


def _skipped_warning(skipped: list[int]) -> list[str]:
    if not skipped:
        return []
    return [f"skipped {len(skipped)} iteration(s) with a non-finite loss or gradient norm: steps {skipped}"]


def _final_memory(memory: dict[str, float], rank_model: RankModel, tracker: SavedTensorTracker, device) -> None:
    """Fill in the memory a rank measured at the end of its run (see `executor.memory`)."""
    memory["weights"] = float(parameter_bytes(rank_model.parameters()))
    memory["optimizer"] = float(optimizer_bytes(rank_model.optimizers))
    memory["activations"] = float(tracker.peak_bytes)
    accounted = memory["weights"] + memory["gradients"] + memory["optimizer"] + memory["activations"]
    if device.type == "cuda":
        memory["peak"] = float(torch.cuda.max_memory_allocated(device))
        memory["buffers"] = max(0.0, memory["peak"] - accounted)
    else:
        memory["peak"] = accounted


def _profiler(job: Job, rank: int, device: torch.device):
    if not job.trace or rank != 0:
        return None
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    return profile(activities=activities, record_shapes=False)


def _gather(layout: Layout, loss_weight: float, measured: _Measurements):
    """(global losses, the slowest rank's times, every rank's memory) on rank 0; None elsewhere.

    Three collectives at the end of the run, none during it.
    """
    device = layout.device
    losses = measured.losses
    loss_t = torch.stack(losses).double() * loss_weight if losses else torch.zeros(0, dtype=torch.float64)
    time_t = torch.tensor(measured.times, dtype=torch.float64)
    mem_t = torch.tensor([measured.memory[k] for k in MEMORY_KEYS], dtype=torch.float64)
    if layout.world_size > 1:
        loss_t, time_t = loss_t.to(device), time_t.to(device)
        dist.all_reduce(loss_t, op=dist.ReduceOp.SUM)  # last-stage ranks hold the loss, weighted 1/dp
        dist.all_reduce(time_t, op=dist.ReduceOp.MAX)
        gathered = [torch.zeros_like(mem_t, device=device) for _ in range(layout.world_size)]
        dist.all_gather(gathered, mem_t.to(device))
        per_rank = [g.cpu() for g in gathered]
    else:
        per_rank = [mem_t]
    if layout.rank != 0:
        return None
    return (
        [float(v) for v in loss_t.cpu()],
        [float(v) for v in time_t.cpu()],
        [dict(zip(MEMORY_KEYS, t.tolist())) for t in per_rank],
    )
