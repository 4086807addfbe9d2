"""Local rank processes: the one primitive that starts ranks on this machine, and the pieces a rank joins with.

`start_ranks` starts N processes (`torch.multiprocessing`, spawn) of a picklable target, each rank in a
process group (gloo on CPU, NCCL on CUDA), relays what the ranks emit to the caller, watches them, and
stops them all on the first failure, which `RankFailure` names (rank, cause, when it failed, when the run
was stopped). `executor.launch` runs training jobs through it; features (`executor.calibrate`'s benchmark
ranks) call it directly. It knows nothing of training, so a feature that starts ranks does not import the
training runtime (and, through it, the other features).

This process holds the rendezvous `TCPStore` on a port the OS picks (no race for a "free" port). When a
rank dies (an exception, a signal, an exit status) the others get FAILURE_GRACE_S to report their own
errors and are then stopped within STOP_GRACE_S; a rank killed outright, or one that raised something
other than a communication error, is preferred over the communication errors it caused in its peers
when naming the cause.

CPU ranks share the machine's cores evenly (`torch.set_num_threads(cores // local ranks)`;
OMP_NUM_THREADS, when set, wins).
"""

from __future__ import annotations

import datetime
import os
import queue as queue_mod
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from executor.job import wall_clock

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
    """A rank died; `rank` and `cause` say which and why (the CLI exits with status 1).

    `failed_at` is when it failed (`time.time()`): the rank's own clock when it reported an error, else
    when the launcher saw it gone (`seen`); `stopped_at` is when the launcher had stopped the other ranks.
    Both are in the message, so a user can line the failure up with the ranks' own logs.
    """

    def __init__(
        self,
        rank: int,
        cause: str,
        world_size: int,
        *,
        failed_at: float | None = None,
        stopped_at: float | None = None,
        seen: bool = False,
    ):
        self.rank = rank
        self.cause = cause
        self.failed_at = failed_at
        self.stopped_at = stopped_at
        when = ""
        if failed_at is not None:
            when += f" ({'seen' if seen else 'failed'} at {wall_clock(failed_at)})"
        stopped = f" at {wall_clock(stopped_at)}" if stopped_at is not None else ""
        super().__init__(f"rank {rank} of {world_size} {cause}{when}; the run was stopped{stopped}")


_joined_a_group = False


def joined_a_group() -> bool:
    """Whether this process has been a rank of a process group (its gloo threads may outlive the run)."""
    return _joined_a_group


def under_torchrun() -> bool:
    return all(v in os.environ for v in TORCHRUN_VARS)


def pg_timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get("HETPLAN_PG_TIMEOUT_S", DEFAULT_PG_TIMEOUT_S)))


def configure_threads(local_world_size: int) -> None:
    """Share the cores evenly: more threads than cores make OpenMP's barriers spin against each other."""
    requested = os.environ.get("OMP_NUM_THREADS", "")
    threads = (
        int(requested) if requested.isdigit() and int(requested) > 0 else (os.cpu_count() or 1) // local_world_size
    )
    torch.set_num_threads(max(1, threads))


def rank_device(device_type: str, local_rank: int) -> torch.device:
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def init_group(
    device_type: str,
    rank: int,
    world_size: int,
    device: torch.device,
    timeout: datetime.timedelta,
    store: dist.Store | None = None,
) -> None:
    """Join the process group: through `store` (spawned ranks), else torchrun's `env://` rendezvous."""
    global _joined_a_group
    _joined_a_group = True
    cuda = device_type == "cuda"
    dist.init_process_group(
        backend="nccl" if cuda else "gloo",
        init_method=None if store is not None else "env://",
        store=store,
        rank=rank,
        world_size=world_size,
        timeout=timeout,
        device_id=device if cuda else None,
    )


class RankContext:
    """What a spawned rank's target receives: its place in the run and the launcher's event queue.

    The process group is already initialized (gloo on CPU, NCCL on CUDA) when the target starts, and is
    destroyed by the launcher after it returns.
    """

    def __init__(self, rank: int, world_size: int, device: torch.device, events: Any):
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self._events = events

    def emit(self, kind: str, *payload: Any) -> None:
        """Send `(kind, *payload)` (picklable) to the launching process's `on_event`, in order."""
        assert kind not in _RESERVED_EVENTS, f"event kind {kind!r} is the launcher's own"
        self._events.put((kind, *payload))


# A rank's work: a module-level function (spawn pickles it by name) called as target(ctx, *args); what it
# returns (picklable) is that rank's entry in `start_ranks`' result.
RankTarget = Callable[..., Any]
# Receives every event the ranks emit, in the launching process: on_event(kind, payload).
EventHandler = Callable[[str, tuple[Any, ...]], None]
_RESERVED_EVENTS = ("result", "error")


class LaunchTimeout(Exception):
    """The ranks had not finished within the deadline given to `start_ranks`; they were stopped."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        super().__init__(f"the ranks did not finish within {seconds:.0f} s; they were stopped")


def start_ranks(
    target: RankTarget,
    args: tuple[Any, ...],
    world_size: int,
    device_type: str = "cpu",
    *,
    on_event: EventHandler | None = None,
    timeout: datetime.timedelta | None = None,
    deadline_s: float | None = None,
) -> list[Any]:
    """Start `world_size` local processes (spawn), each rank running `target(ctx, *args)` in a process group.

    This process holds the rendezvous `TCPStore` (on a port the OS picks), relays the ranks' events to
    `on_event`, and watches them: the first failure (an exception, a signal, an exit status) stops the
    others and raises `RankFailure` naming the rank, the cause and when it failed. Every rank is stopped
    when this returns or raises.

    Args:
        target: picklable (a module-level function); its return value is sent back.
        args: picklable arguments after the `RankContext`.
        world_size: ranks to start (1 or more; one rank still runs in its own process).
        device_type: "cpu" (gloo) or "cuda" (NCCL, rank r on cuda:r).
        on_event: receives what the ranks `emit`, in this process.
        timeout: how long a collective waits for a peer (default `pg_timeout()`).
        deadline_s: stop the ranks and raise `LaunchTimeout` when they run longer.

    Returns:
        Each rank's return value, in rank order.

    Raises:
        RankFailure: a rank died (named, with its cause and the time).
        LaunchTimeout: `deadline_s` passed.
    """
    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    setup = _Setup(world_size, device_type, timeout or pg_timeout())
    # Port 0: the OS picks a free port and this process holds it for the whole run.
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=setup.timeout)
    procs = [
        ctx.Process(
            target=_child, args=(r, setup, store.port, target, args, events), name=f"hetplan-rank{r}", daemon=True
        )
        for r in range(world_size)
    ]
    try:
        for p in procs:
            p.start()
        return _Watcher(procs, events, on_event, deadline_s).watch()
    finally:
        _stop(procs)
        events.close()


@dataclass(frozen=True)
class _Setup:
    world_size: int
    device_type: str
    timeout: datetime.timedelta


def _is_comm_error(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return isinstance(exc, dist.DistError) or any(mark in text for mark in _COMM_ERROR_MARKS)


def _child(rank: int, setup: _Setup, port: int, target: RankTarget, args: tuple[Any, ...], events: Any) -> None:
    """Entry point of a spawned rank: join the store and the group, run the target, send its result or error."""
    code = 0
    try:
        configure_threads(setup.world_size)
        device = rank_device(setup.device_type, rank)
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=setup.timeout)
        prefixed = dist.PrefixStore("hetplan", store)
        init_group(setup.device_type, rank, setup.world_size, device, setup.timeout, store=prefixed)
        result = target(RankContext(rank, setup.world_size, device, events), *args)
        events.put(("result", rank, result))
        # All ranks done before any closes its connections (a peer still sending would abort).
        dist.barrier()
        dist.destroy_process_group()
    except BaseException as exc:
        code = 1
        cause = f"{type(exc).__name__}: {exc}"
        events.put(("error", rank, cause, _is_comm_error(exc), traceback.format_exc(), time.time()))
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
    at: float  # monotonic, to order failures
    wall: float  # time.time() of the failure: the rank's own report, or when its exit was seen
    reported: bool  # `wall` is the rank's own time (it sent an error) rather than when its death was seen


def _exit_cause(exitcode: int) -> str:
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"was killed by {name}"
    return f"exited with status {exitcode}"


def _stop(procs: list[Any]) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


class _Watcher:
    """Relays events, collects the results, and stops everything at the first failure or the deadline."""

    def __init__(self, procs: list[Any], events: Any, on_event: EventHandler | None, deadline_s: float | None):
        self.procs = procs
        self.events = events
        self.on_event = on_event
        self.deadline = time.monotonic() + deadline_s if deadline_s is not None else None
        self.deadline_s = deadline_s
        self.failures: dict[int, _Failure] = {}
        self.tracebacks: dict[int, str] = {}
        self.results: dict[int, Any] = {}
        self.failed_at: float | None = None

    def handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "result":
            self.results[message[1]] = message[2]
        elif kind == "error":
            _, rank, cause, consequence, tb, wall = message
            self.tracebacks[rank] = tb
            self.failures[rank] = _Failure(rank, f"failed: {cause}", consequence, time.monotonic(), wall, True)
        elif self.on_event is not None:
            self.on_event(kind, tuple(message[1:]))

    def drain(self, wait_s: float) -> None:
        """Handle what is queued, waiting up to `wait_s` for the first message."""
        try:
            self.handle(self.events.get(timeout=wait_s))
            while True:
                self.handle(self.events.get_nowait())
        except queue_mod.Empty:
            pass

    def watch(self) -> list[Any]:
        world_size = len(self.procs)
        while True:
            self.drain(0.2)
            self.note_exits()
            if self.failed_at is not None and time.monotonic() - self.failed_at >= FAILURE_GRACE_S:
                raise self.failure()
            if self.failed_at is None and all(p.exitcode == 0 for p in self.procs):
                # Everyone finished; the results may still be in the pipe.
                deadline = time.monotonic() + 30.0
                while len(self.results) < world_size and time.monotonic() < deadline:
                    self.drain(0.5)
                missing = [r for r in range(world_size) if r not in self.results]
                if missing:
                    raise RankFailure(missing[0], "finished without sending its result", world_size)
                return [self.results[r] for r in range(world_size)]
            if self.deadline is not None and self.deadline_s is not None and time.monotonic() > self.deadline:
                _stop(self.procs)
                raise LaunchTimeout(self.deadline_s)

    def note_exits(self) -> None:
        for rank, p in enumerate(self.procs):
            if p.exitcode not in (None, 0) and rank not in self.failures:
                # Killed (no message) or its message is still in flight: count it; a message replaces it.
                self.failures[rank] = _Failure(
                    rank, _exit_cause(p.exitcode), False, time.monotonic(), time.time(), False
                )
        if self.failures and self.failed_at is None:
            self.failed_at = time.monotonic()

    def failure(self) -> RankFailure:
        """Stop every rank and name the failure that caused the others (a rank's own error or death first)."""
        _stop(self.procs)
        worst = min(self.failures.values(), key=lambda f: (f.consequence, f.at))
        if worst.rank in self.tracebacks and os.environ.get("HETPLAN_DEBUG"):
            print(self.tracebacks[worst.rank], file=sys.stderr)
        return RankFailure(
            worst.rank,
            worst.cause,
            len(self.procs),
            failed_at=worst.wall,
            stopped_at=time.time(),
            seen=not worst.reported,
        )


__all__ = [
    "EventHandler",
    "LaunchTimeout",
    "RankContext",
    "RankFailure",
    "RankTarget",
    "configure_threads",
    "init_group",
    "joined_a_group",
    "pg_timeout",
    "rank_device",
    "start_ranks",
    "under_torchrun",
]
