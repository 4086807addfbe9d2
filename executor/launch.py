"""Starting the ranks: in this process, as spawned local processes, or inside a torchrun rendezvous.

- One rank, no torchrun: the rank runs in this process (no process group is needed).
- Several ranks, no torchrun: one process per rank (`torch.multiprocessing`, spawn). This process
  holds the rendezvous `TCPStore` on a port the OS picks (no race for a "free" port) and watches the
  ranks: when one dies (an exception, a signal, an exit status) the others are stopped within a few
  seconds and `RankFailure` names the rank and the cause. A rank killed outright is preferred over
  the communication errors it caused in its peers when naming the cause.
- Under torchrun (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set): this process is one rank and joins
  that rendezvous (`env://`); torchrun's agent watches the ranks, and the process group's timeout
  bounds how long a rank waits for a dead peer.

Backends: gloo on CPU, NCCL on CUDA. CPU ranks share the machine's cores evenly
(`torch.set_num_threads(cores // local ranks)`; OMP_NUM_THREADS, when set, wins).
"""

from __future__ import annotations

import datetime
import json
import os
import queue as queue_mod
import signal
import sys
import time
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from executor.job import Job, RunResult
from executor.runtime import StepCallback, run_rank

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# How long a rank waits in a collective for a peer before giving up (seconds; HETPLAN_PG_TIMEOUT_S).
DEFAULT_PG_TIMEOUT_S = 120.0
# After a rank fails, how long the others get to report their own errors before they are stopped.
FAILURE_GRACE_S = 1.0
STOP_GRACE_S = 5.0
# Words that mark an error as a consequence of a peer's failure rather than its cause.
_COMM_ERROR_MARKS = (
    "connection closed",
    "connection reset",
    "broken pipe",
    "timed out",
    "timeout",
    "peer",
    "gloo",
    "nccl",
    "socket",
)


class RankFailure(Exception):
    """A rank died; `rank` and `cause` say which and why (the CLI exits with status 1)."""

    def __init__(self, rank: int, cause: str, world_size: int):
        self.rank = rank
        self.cause = cause
        super().__init__(f"rank {rank} of {world_size} {cause}; the run was stopped")


def under_torchrun() -> bool:
    return all(v in os.environ for v in TORCHRUN_VARS)


def pg_timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get("HETPLAN_PG_TIMEOUT_S", DEFAULT_PG_TIMEOUT_S)))


def _configure_threads(local_world_size: int) -> None:
    """Share the cores evenly: more threads than cores make OpenMP's barriers spin against each other."""
    requested = os.environ.get("OMP_NUM_THREADS", "")
    threads = (
        int(requested) if requested.isdigit() and int(requested) > 0 else (os.cpu_count() or 1) // local_world_size
    )
    torch.set_num_threads(max(1, threads))


def _device(job: Job, local_rank: int) -> torch.device:
    if job.device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def _init_group(job: Job, rank: int, world_size: int, device: torch.device, store=None) -> None:
    backend = "nccl" if job.device_type == "cuda" else "gloo"
    kwargs = dict(backend=backend, rank=rank, world_size=world_size, timeout=pg_timeout())
    if job.device_type == "cuda":
        kwargs["device_id"] = device
    if store is not None:
        kwargs["store"] = store
    else:
        kwargs["init_method"] = "env://"
    dist.init_process_group(**kwargs)


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
    _configure_threads(1)
    try:
        return run_rank(job, 0, 1, _device(job, 0), on_step, in_process=True)
    except Exception as exc:
        if os.environ.get("HETPLAN_DEBUG"):
            traceback.print_exc()
        raise RankFailure(0, f"failed: {type(exc).__name__}: {exc}", 1) from exc


def _run_torchrun(job: Job, on_step: StepCallback | None) -> RunResult | None:
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    _configure_threads(int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
    device = _device(job, local_rank)
    _init_group(job, rank, world_size, device)
    try:
        return run_rank(job, rank, world_size, device, on_step if rank == 0 else None)
    except Exception as exc:
        if os.environ.get("HETPLAN_DEBUG"):
            traceback.print_exc()
        raise RankFailure(rank, f"failed: {type(exc).__name__}: {exc}", world_size) from exc
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ---- local processes --------------------------------------------------------------------------------
def _is_comm_error(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return isinstance(exc, dist.DistError) or any(mark in text for mark in _COMM_ERROR_MARKS)


def _child(rank: int, world_size: int, port: int, jobs: list[Job], events) -> None:
    """Entry point of a spawned rank: join the store, run the jobs, report each result or the error."""
    code = 0
    try:
        _configure_threads(world_size)
        device = _device(jobs[0], rank)
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=pg_timeout())
        _init_group(jobs[0], rank, world_size, device, store=dist.PrefixStore("hetplan", store))
        on_step = (lambda done, total, seconds: events.put(("step", done, total, seconds))) if rank == 0 else None
        for index, job in enumerate(jobs):
            result = run_rank(job, rank, world_size, device, on_step)
            if result is not None:
                events.put(("result", index, result.to_json()))
        dist.destroy_process_group()
    except BaseException as exc:
        code = 1
        events.put(("error", rank, f"{type(exc).__name__}: {exc}", _is_comm_error(exc), traceback.format_exc()))
    # Flush the queue's feeder thread, then leave without running atexit handlers that may wait on peers.
    events.close()
    events.join_thread()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@dataclass
class _Failure:
    rank: int
    cause: str
    consequence: bool  # a communication error, probably caused by another rank's failure
    at: float


def _exit_cause(exitcode: int) -> str:
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"was killed by {name}"
    return f"exited with status {exitcode}"


def _stop(procs: list) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def _spawn(jobs: list[Job], on_step: StepCallback | None) -> list[RunResult]:
    world_size = jobs[0].world_size
    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    # Port 0: the OS picks a free port and this process holds it for the whole run.
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=pg_timeout())
    procs = [
        ctx.Process(target=_child, args=(r, world_size, store.port, jobs, events), name=f"hetplan-rank{r}", daemon=True)
        for r in range(world_size)
    ]
    try:
        for p in procs:
            p.start()
        return _watch(procs, events, on_step, world_size, len(jobs))
    finally:
        _stop(procs)
        events.close()


def _watch(procs: list, events, on_step: StepCallback | None, world_size: int, num_jobs: int) -> list[RunResult]:
    """Relay progress, collect the results, and stop everything at the first failure."""
    failures: dict[int, _Failure] = {}
    tracebacks: dict[int, str] = {}
    results: dict[int, RunResult] = {}
    failed_at: float | None = None

    def handle(message) -> None:
        kind = message[0]
        if kind == "step" and on_step is not None:
            on_step(*message[1:])
        elif kind == "result":
            results[message[1]] = RunResult.from_dict(json.loads(message[2]))
        elif kind == "error":
            _, rank, cause, consequence, tb = message
            tracebacks[rank] = tb
            failures[rank] = _Failure(rank, f"failed: {cause}", consequence, time.monotonic())

    while True:
        try:
            handle(events.get(timeout=0.2))
            while True:
                handle(events.get_nowait())
        except queue_mod.Empty:
            pass
        for rank, p in enumerate(procs):
            if p.exitcode not in (None, 0) and rank not in failures:
                # Killed (no message) or its message is still in flight: count it; a message replaces it.
                failures[rank] = _Failure(rank, _exit_cause(p.exitcode), False, time.monotonic())
        if failures and failed_at is None:
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at >= FAILURE_GRACE_S:
            _stop(procs)
            worst = min(failures.values(), key=lambda f: (f.consequence, f.at))
            if worst.rank in tracebacks and os.environ.get("HETPLAN_DEBUG"):
                print(tracebacks[worst.rank], file=sys.stderr)
            raise RankFailure(worst.rank, worst.cause, world_size)
        if failed_at is None and all(p.exitcode == 0 for p in procs):
            # Everyone finished; the result may still be in the pipe.
            try:
                while True:
                    handle(events.get(timeout=0.5))
            except queue_mod.Empty:
                pass
            if len(results) != num_jobs:
                raise RankFailure(0, "finished without sending its results", world_size)
            return [results[i] for i in range(num_jobs)]


__all__ = ["RankFailure", "run", "run_jobs", "under_torchrun"]
