"""Shared bandwidth and shared compute as fluid jobs on a SimPy clock.

Every transfer is a flow of bytes through one or more ports (one direction of a link on one device);
every compute task is an amount of work on one device's compute stream. While jobs run, their rates
follow the jobs around them:

- a flow gets min(its own cap, min over its ports of capacity / number of flows on the port): flows on a
  port share it equally, so a gradient all-reduce and a pipeline send on the same NIC slow each other;
- a compute task runs at 1 / (1 + sigma) of its speed while a flow that competes for the device's SMs
  and memory (a data-parallel collective beside compute) is active on the device, else at full speed.

Whenever a job starts or ends, every rate is recomputed and the next completion is scheduled: the
classic fluid approximation of packet networks (and of NCCL kernels sharing SMs), exact for piecewise
constant rates. Deterministic: jobs are kept in start order and ties resolve in that order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import simpy

# A job whose remaining time is below this is complete (floating-point slack, seconds).
EPS_SECONDS = 1e-12


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
    remaining: float  # bytes (flow) or seconds of work at full speed (compute)
    done: simpy.Event
    ports: tuple[Port, ...] = ()
    cap: float = float("inf")  # a flow's own maximum rate (the algorithm's bandwidth at this tier)
    device: object = None  # compute: whose stream; flow: whose compute it slows (if slows_compute)
    slows_compute: bool = False
    sigma: float = 0.0  # compute: slowdown factor while a competing flow is active
    rate: float = 0.0


class FluidNetwork:
    """Runs flows and compute jobs with rates recomputed at every start and completion."""

    def __init__(self, env: simpy.Environment):
        self.env = env
        self.jobs: list[Job] = []
        self._last = 0.0
        self._version = 0

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
        done = self.env.event()
        if seconds <= 0:
            done.succeed()
            return done
        self._start(Job("compute", seconds, done, device=device, sigma=sigma))
        return done

    # ---- internals ---------------------------------------------------------------------------------
    def _start(self, job: Job) -> None:
        self._advance()
        self.jobs.append(job)
        for port in job.ports:
            port.flows.append(job)
        self._reschedule()

    def _advance(self) -> None:
        dt = self.env.now - self._last
        if dt > 0:
            for job in self.jobs:
                progress = job.rate * dt
                job.remaining -= progress
                if job.kind == "flow":
                    for port in job.ports:
                        port.bytes_moved += progress
        self._last = self.env.now

    def _rates(self) -> None:
        slowed = {id(j.device) for j in self.jobs if j.slows_compute and j.device is not None}
        for job in self.jobs:
            if job.kind == "flow":
                rate = job.cap
                for port in job.ports:
                    rate = min(rate, port.capacity / len(port.flows))
                job.rate = rate
            else:
                job.rate = 1.0 / (1.0 + job.sigma) if id(job.device) in slowed else 1.0

    def _reschedule(self) -> None:
        self._rates()
        if not self.jobs:
            return
        wait = min(job.remaining / job.rate for job in self.jobs)
        self._version += 1
        version = self._version
        timer = self.env.timeout(max(wait, 0.0))
        timer.callbacks.append(lambda _event: self._wake(version))

    def _wake(self, version: int) -> None:
        if version != self._version:
            return  # a newer start or completion rescheduled
        self._advance()
        finished = [job for job in self.jobs if job.remaining / job.rate <= EPS_SECONDS]
        for job in finished:
            self.jobs.remove(job)
            for port in job.ports:
                port.flows.remove(job)
        self._reschedule()
        for job in finished:
            job.done.succeed()
