"""Shared bandwidth and shared compute as fluid jobs on a SimPy clock.

Every transfer is a flow of bytes through one or more ports (one direction of a link on one device);
every compute task is an amount of work on one device's compute stream. While jobs run, their rates
follow the jobs around them:

- a flow gets min(its own cap, min over its ports of capacity / number of flows on the port): flows on a
  port share it equally, so a gradient all-reduce and a pipeline send on the same NIC slow each other;
- a compute task runs at 1 / (1 + sigma) of its speed while a flow that competes for the device's SMs
  and memory (a data-parallel collective beside compute) is active on the device, else at full speed.

The classic fluid approximation of packet networks (and of NCCL kernels sharing SMs), exact for piecewise
constant rates. A job's rate depends only on the jobs sharing its ports (and, for compute, on the
competing flows of its device), so a start or a completion re-rates only those neighbours, not every
job of the simulation: each job carries its own projected finish time in a heap, and one SimPy timer
waits for the earliest. That keeps the cost of an event independent of how many devices run at once
(a 64-stage pipeline re-rated all 64 streams on every event before).

Termination. Time advances on every timer: a job whose remaining time falls below the resolution of the
current simulated time (`resolution`) is complete, so no timer is ever set to a step the clock cannot
represent (at 1e9 s one float step is about 1e-7 s, far above a fixed epsilon). Deterministic: jobs
finishing together complete in start order.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import simpy

# A job whose remaining time is below this is complete (floating-point slack, seconds).
EPS_SECONDS = 1e-12
# ... or below this many float steps of the current time (the clock cannot resolve less).
RESOLUTION_ULPS = 4


def resolution(now: float) -> float:
    """The smallest remaining time the clock at `now` tells from zero: a job closer than this to its end
    is complete (a timer for less would not move time)."""
    return max(EPS_SECONDS, RESOLUTION_ULPS * math.ulp(now))


@dataclass(eq=False)
class Port:
    """One direction of a link on one (representative) device."""

    name: str
    capacity: float  # bytes/s
    flows: list[Job] = field(default_factory=list)
    bytes_moved: float = 0.0


@dataclass(eq=False)
class Job:
    kind: str  # "flow" or "compute"
    remaining: float  # bytes (flow) or seconds of work at full speed (compute), as of `since`
    done: simpy.Event
    ports: tuple[Port, ...] = ()
    cap: float = float("inf")  # a flow's own maximum rate (the algorithm's bandwidth at this tier)
    device: object = None  # compute: whose stream; flow: whose compute it slows (if slows_compute)
    slows_compute: bool = False
    sigma: float = 0.0  # compute: slowdown factor while a competing flow is active
    rate: float = 0.0
    since: float = 0.0  # when `remaining` was last brought up to date
    finish: float = 0.0  # projected end at the current rate
    seq: int = 0  # start order (ties complete in it)
    version: int = 0  # bumped at each re-rating: older heap entries are stale


@dataclass
class _Device:
    """The jobs of one device that couple through compute slowdown."""

    compute: list[Job] = field(default_factory=list)
    slowing: int = 0  # active flows that slow this device's compute


class FluidNetwork:
    """Runs flows and compute jobs; a start or completion re-rates only the jobs it affects."""

    def __init__(self, env: simpy.Environment, compute_slowed: bool = True):
        """`compute_slowed=False` promises that no flow will slow compute (`transfer(slows_compute=True)`),
        so compute jobs keep full speed and run as plain timers."""
        self.env = env
        self.compute_slowed = compute_slowed
        self.active = 0  # jobs running
        self.events = 0  # starts and completions handled (what the engine's event bound counts)
        self._heap: list[tuple[float, int, int, Job]] = []
        self._devices: dict[int, _Device] = {}
        self._seq = 0
        self._timer_at = math.inf  # when the pending SimPy timer fires (inf: none pending)
        self._timer_version = 0

    # ---- public ----------------------------------------------------------------------------------
    def transfer(
        self,
        nbytes: float,
        ports: tuple[Port, ...],
        cap: float = float("inf"),
        device: object = None,
        slows_compute: bool = False,
    ) -> simpy.Event:
        """Move `nbytes` through `ports`; the event fires when the last byte arrives."""
        done = self.env.event()
        if nbytes <= 0:
            done.succeed()
            return done
        self._start(Job("flow", nbytes, done, ports=ports, cap=cap, device=device, slows_compute=slows_compute))
        return done

    def compute(self, device: object, seconds: float, sigma: float = 0.0) -> simpy.Event:
        """Run `seconds` of work on `device`'s stream (slower while competing flows are active)."""
        if seconds > 0 and (sigma == 0 or not self.compute_slowed):
            # Its rate is 1 throughout: a plain timer, without the job bookkeeping.
            self.events += 1
            return self.env.timeout(seconds)
        done = self.env.event()
        if seconds <= 0:
            done.succeed()
            return done
        self._start(Job("compute", seconds, done, device=device, sigma=sigma))
        return done

    # ---- internals ---------------------------------------------------------------------------------
    def _device(self, device: object) -> _Device:
        key = id(device)
        if key not in self._devices:
            self._devices[key] = _Device()
        return self._devices[key]

    def _neighbours(self, job: Job, slowing_changed: bool) -> list[Job]:
        """The jobs whose rate a start or end of `job` changes (itself included once)."""
        affected: dict[int, Job] = {id(job): job}
        for port in job.ports:
            for other in port.flows:
                affected[id(other)] = other
        if slowing_changed:
            for other in self._device(job.device).compute:
                affected[id(other)] = other
        return list(affected.values())

    def _settle(self, job: Job, now: float) -> None:
        """Bring `job`'s remaining work up to `now` at its current rate."""
        dt = now - job.since
        if dt > 0:
            progress = job.rate * dt
            job.remaining -= progress
            for port in job.ports:
                port.bytes_moved += progress
        job.since = now

    def _rate(self, job: Job) -> float:
        if job.kind == "flow":
            rate = job.cap
            for port in job.ports:
                rate = min(rate, port.capacity / len(port.flows))
            return rate
        return 1.0 / (1.0 + job.sigma) if self._device(job.device).slowing else 1.0

    def _rerate(self, jobs: list[Job], now: float) -> None:
        for job in jobs:
            self._settle(job, now)
        for job in jobs:
            job.rate = self._rate(job)
            job.version += 1
            job.finish = now + max(job.remaining, 0.0) / job.rate if job.rate > 0 else math.inf
            heapq.heappush(self._heap, (job.finish, job.seq, job.version, job))

    def _start(self, job: Job) -> None:
        now = self.env.now
        self.events += 1
        self.active += 1
        self._seq += 1
        job.seq = self._seq
        job.since = now
        slowing_changed = False
        if job.kind == "compute":
            self._device(job.device).compute.append(job)
        else:
            for port in job.ports:
                port.flows.append(job)
            if job.slows_compute and job.device is not None:
                assert self.compute_slowed, "a flow slows compute on a network built with compute_slowed=False"
                device = self._device(job.device)
                device.slowing += 1
                slowing_changed = device.slowing == 1
        self._rerate(self._neighbours(job, slowing_changed), now)
        self._arm()

    def _finish(self, job: Job, now: float) -> list[Job]:
        """Take a completed job out; the jobs it leaves to re-rate."""
        self.events += 1
        self.active -= 1
        self._settle(job, now)
        slowing_changed = False
        if job.kind == "compute":
            self._device(job.device).compute.remove(job)
        else:
            for port in job.ports:
                port.flows.remove(job)
            if job.slows_compute and job.device is not None:
                device = self._device(job.device)
                device.slowing -= 1
                slowing_changed = device.slowing == 0
        neighbours = self._neighbours(job, slowing_changed)
        return [other for other in neighbours if other is not job]

    def _arm(self) -> None:
        """Set the SimPy timer for the earliest projected finish (if earlier than the one pending)."""
        heap = self._heap
        while heap and heap[0][2] != heap[0][3].version:
            heapq.heappop(heap)  # stale: the job was re-rated or finished since
        if not heap:
            return
        at = heap[0][0]
        if at >= self._timer_at:
            return
        self._timer_at = at
        self._timer_version += 1
        version = self._timer_version
        timer = self.env.timeout(max(at - self.env.now, 0.0))
        timer.callbacks.append(lambda _event: self._wake(version))

    def _wake(self, version: int) -> None:
        if version != self._timer_version:
            return  # an earlier finish set a newer timer
        self._timer_at = math.inf
        now = self.env.now
        horizon = now + resolution(now)
        heap = self._heap
        finished: list[Job] = []
        while heap and (heap[0][2] != heap[0][3].version or heap[0][0] <= horizon):
            _, _, entry_version, job = heapq.heappop(heap)
            if entry_version == job.version:
                job.version += 1  # no entry of a finished job is valid any more
                finished.append(job)
        finished.sort(key=lambda j: j.seq)
        affected: dict[int, Job] = {}
        for job in finished:
            for other in self._finish(job, now):
                affected[id(other)] = other
        for job in finished:
            affected.pop(id(job), None)
        self._rerate(sorted(affected.values(), key=lambda j: j.seq), now)
        self._arm()
        for job in finished:
            job.done.succeed()
