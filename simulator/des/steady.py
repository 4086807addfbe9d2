"""Long pipelines costed once per steady state: a plan with many micro-batches from two shorter runs.

A 1F1B or interleaved pipeline runs a warm-up, a steady state in which every stage repeats the same
forward/backward pattern once per group of micro-batches, and a cool-down. Micro-batches are identical,
so once the steady state is reached, d more micro-batches add the same time, busy time, bytes on every
port and tasks, whatever came before. Two runs of the same costs with m1 and m2 = m1 + d micro-batches
(m1 past the warm-up, m1 = m modulo d) give that increment; the plan's m = m2 + j * d micro-batches are
then r2 + j * (r2 - r1) in every additive figure, and the memory peak (reached in the steady state, or
before it) carries over the same way.

The increment is taken only when the two runs show the steady state: every representative's
cool-down and the later half of its steady operations (up to a period) in the longer run must be the
shorter run's, shifted by the same time, to 1e-9 of the iteration. Otherwise (contention that drifts,
a schedule without a steady state) every micro-batch is simulated. A 1T-parameter plan with 64 stages
and 512 micro-batches runs 68 + 72 micro-batches instead of 512.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any, Protocol

from simulator.binding import BoundPlan
from simulator.des.records import DesResult, Rep
from simulator.plan import Plan
from simulator.schedules import stage_order


class Simulation(Protocol):
    """What the shortcut reads of the engine's Simulation (the engine imports this module, not the reverse)."""

    bound: BoundPlan
    plan: Plan
    p: int
    m: int
    v: int
    record_trace: bool
    background: Any
    progress: Callable[[int], None] | None

    def __init__(self, bound: BoundPlan, *, micro_batches: int | None = ...) -> None: ...

    def total_operations(self) -> int: ...

    def run_all(self) -> DesResult: ...


# Tolerance of the steady-state check, relative to the iteration time of the longer run.
SHIFT_TOLERANCE = 1e-9
# The shortcut pays on long runs only: below this many forward and backward operations the whole
# iteration simulates in milliseconds, and its result keeps every task (`DesResult.compute_tasks`).
MIN_OPERATIONS = 2000
# 1F1B: micro-batches between the two runs (a steady pattern that repeats every 1, 2 or 4 of them passes).
ONE_F_ONE_B_STEP = 4


def run_sizes(schedule: str, p: int, m: int) -> tuple[int, int] | None:
    """(m1, m2) for a plan of `p` stages and `m` micro-batches, or None where two runs would not save
    work (or the schedule has no steady state to repeat: gpipe keeps every micro-batch in flight)."""
    if schedule == "1f1b":
        d = ONE_F_ONE_B_STEP
        first = p + 2  # every stage past its warm-up and through one backward
        m1 = first + (m - first) % d
    elif schedule == "interleaved":
        d = p  # the schedule interleaves groups of p micro-batches
        m1 = 2 * p
    else:
        return None
    m2 = m1 + d
    if m1 + m2 >= m:
        return None
    return m1, m2


def _tail(sim: Simulation, rep: Rep, m: int) -> int:
    """Operations at the end of a rep's order (of `m` micro-batches) that the check compares: its
    cool-down (the backwards after its last forward) and the later half of its steady operations, at
    least one forward and backward per model chunk, at most one period of the schedule."""
    order = stage_order(sim.plan.schedule, rep.stage.index, sim.p, m, sim.v)
    first_backward = next(i for i, op in enumerate(order) if op.kind == "B")
    last_forward = max(i for i, op in enumerate(order) if op.kind == "F")
    cooldown = len(order) - last_forward - 1
    steady = last_forward + 1 - (first_backward - 1)  # alternating forwards and backwards
    period = 2 * sim.v * (sim.p if sim.plan.schedule == "interleaved" else ONE_F_ONE_B_STEP)
    return min(len(order), cooldown + min(period, max(2 * sim.v, steady // 2)))


def _steady(sim: Simulation, short: DesResult, long: DesResult, m1: int) -> bool:
    """The longer run's ends are the shorter run's shifted by one time, wherever the check looks."""
    shift = long.iteration_time - short.iteration_time
    tolerance = SHIFT_TOLERANCE * max(long.iteration_time, 1e-300)
    for a, b in zip(short.reps, long.reps):
        if abs(b.finish - a.finish - shift) > tolerance:
            return False
        n = _tail(sim, a, m1)
        if any(abs(y - x - shift) > tolerance for x, y in zip(a.op_ends[-n:], b.op_ends[-n:])):
            return False
    return True


def extrapolated(sim: Simulation) -> DesResult | None:
    """The iteration of `sim`'s plan from two shorter runs, or None where that does not apply (then the
    caller simulates every micro-batch)."""
    if sim.record_trace or sim.background or sim.total_operations() < MIN_OPERATIONS:
        return None
    sizes = run_sizes(sim.plan.schedule, sim.p, sim.m)
    if sizes is None:
        return None
    m1, m2 = sizes
    runs = []
    for size in sizes:
        # No progress reports from the short runs: they are quick, and if the check fails the full run
        # reports the plan's operations itself.
        runs.append(type(sim)(sim.bound, micro_batches=size).run_all())  # the same engine, fewer micro-batches
    short, long = runs
    if not _steady(sim, short, long, m1):
        return None
    j = (sim.m - m2) // (m2 - m1)

    def more(a: float, b: float) -> float:
        return b + j * (b - a)

    for a, b in zip(short.reps, long.reps):
        b.busy = {key: more(a.busy.get(key, 0.0), b.busy.get(key, 0.0)) for key in a.busy.keys() | b.busy.keys()}
        b.finish = more(a.finish, b.finish)
        b.memory_peak = max(more(a.memory_peak, b.memory_peak), b.memory_peak)
        if b.memory_peak_time > a.memory_peak_time:
            b.memory_peak_time = more(a.memory_peak_time, b.memory_peak_time)
    for name, port in long.ports.items():
        port.bytes_moved = more(short.ports[name].bytes_moved, port.bytes_moved)
    if sim.progress is not None:
        sim.progress(sim.total_operations())
    return replace(
        long,
        iteration_time=more(short.iteration_time, long.iteration_time),
        num_tasks=round(more(short.num_tasks, long.num_tasks)),
        simulated_micro_batches=(m1, m2),
        events=short.events + long.events,
    )
