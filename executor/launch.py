"""Starting the ranks: in this process, as spawned local processes, or inside a torchrun rendezvous.

- One rank, no torchrun: the rank runs in this process (no process group is needed).
- Several ranks, no torchrun: one process per rank, started and watched by `executor.ranks.start_ranks`
  (the one primitive that starts local ranks; `executor.calibrate` uses it too): when one dies the
  others are stopped within a few seconds and `RankFailure` names the rank, the cause, when it failed
  and when the run was stopped.
- Under torchrun (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set): this process is one rank and joins
  that rendezvous (`env://`); torchrun's agent watches the ranks, and the process group's timeout
  bounds how long a rank waits for a dead peer.

Backends: gloo on CPU, NCCL on CUDA. CPU ranks share the machine's cores evenly (see `executor.ranks`).
"""

from __future__ import annotations

import json
import os
import traceback
from typing import Any

import torch.distributed as dist

from executor.job import Job, RunResult
from executor.ranks import (
    LaunchTimeout,
    RankContext,
    RankFailure,
    configure_threads,
    init_group,
    pg_timeout,
    rank_device,
    start_ranks,
    under_torchrun,
)
from executor.runtime import StepCallback, run_rank


def run(job: Job, on_step: StepCallback | None = None) -> RunResult | None:
    """Run `job` on its ranks; the result on the process holding rank 0 (None on other torchrun ranks).

    Raises:
        RankFailure: a rank died (named, with its cause).
    """
    return run_jobs([job], on_step)[0]


def run_jobs(jobs: list[Job], on_step: StepCallback | None = None) -> list[RunResult | None]:
    """Run several jobs of the same world size one after the other on the same ranks.

    The processes and the process group are started once (what tests that compare many plans
    need); each job builds its own device mesh, model and optimizer.
    """
    assert jobs and len({(j.world_size, j.device_type) for j in jobs}) == 1, "jobs must share world size and device"
    if under_torchrun():
        return [_run_torchrun(job, on_step) for job in jobs]
    if jobs[0].world_size == 1:
        return [_run_here(job, on_step) for job in jobs]
    return _spawn(jobs, on_step)


def _run_here(job: Job, on_step: StepCallback | None) -> RunResult | None:
    """The single rank of a one-device plan, in this process (no process group needed)."""
    configure_threads(1)
    try:
        return run_rank(job, 0, 1, rank_device(job.device_type, 0), on_step, in_process=True)
    except Exception as exc:
        if os.environ.get("HETPLAN_DEBUG"):
            traceback.print_exc()
        raise RankFailure(0, f"failed: {type(exc).__name__}: {exc}", 1) from exc


def _run_torchrun(job: Job, on_step: StepCallback | None) -> RunResult | None:
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    configure_threads(int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
    device = rank_device(job.device_type, local_rank)
    init_group(job.device_type, rank, world_size, device, pg_timeout())
    try:
        result = run_rank(job, rank, world_size, device, on_step if rank == 0 else None)
    except Exception as exc:
        # No collective teardown here: peers may be blocked in a collective, and destroying the group would
        # hang or abort this rank before its message is printed. torchrun stops the others once this one exits.
        if os.environ.get("HETPLAN_DEBUG"):
            traceback.print_exc()
        raise RankFailure(rank, f"failed: {type(exc).__name__}: {exc}", world_size) from exc
    # Every rank reaches the barrier before any tears its connections down: a rank that destroyed the group
    # while a peer still sent on it aborted that peer ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()
    return result


# ---- training jobs on local processes -----------------------------------------------------------------
def _train(ctx: RankContext, jobs: list[Job]) -> list[str | None]:
    """A rank's part of every job, one after the other: each job's result as JSON where this rank has it."""
    on_step: StepCallback | None = None
    if ctx.rank == 0:
        on_step = lambda done, total, seconds: ctx.emit("step", done, total, seconds)
    out: list[str | None] = []
    for job in jobs:
        result = run_rank(job, ctx.rank, ctx.world_size, ctx.device, on_step)
        out.append(result.to_json() if result is not None else None)
    return out


def _spawn(jobs: list[Job], on_step: StepCallback | None) -> list[RunResult | None]:
    def relay(kind: str, payload: tuple[Any, ...]) -> None:
        if kind == "step" and on_step is not None:
            on_step(*payload)

    per_rank = start_ranks(_train, (jobs,), jobs[0].world_size, jobs[0].device_type, on_event=relay)
    results: list[RunResult | None] = []
    for index in range(len(jobs)):
        text = next((r[index] for r in per_rank if r[index] is not None), None)
        if text is None:
            raise RankFailure(0, "finished without sending its results", jobs[0].world_size)
        results.append(RunResult.from_dict(json.loads(text)))
    return results


# The launcher's whole surface in one place: training runs, and the primitive features start ranks with.
__all__ = ["LaunchTimeout", "RankContext", "RankFailure", "run", "run_jobs", "start_ranks", "under_torchrun"]
