"""A discrete-event run as a Report: the same fields as the analytic model, plus link utilization
and the moment of the memory peak."""

from __future__ import annotations

from simulator.assemble import DeviceMemory, StageTiming, assemble_report
from simulator.des.records import DesResult, Rep
from simulator.report import MemoryBreakdown, Report, TimeBreakdown


def _breakdown(rep: Rep, iteration: float) -> TimeBreakdown:
    """The representative's timeline, split so the parts sum to the iteration time: what it was busy
    with, and the rest as pipeline bubble (waiting for other stages)."""
    busy = rep.busy
    compute = busy.get("compute", 0.0)
    recompute = busy.get("recompute", 0.0)
    comm = busy.get("comm", 0.0) + busy.get("tail", 0.0)
    stall = busy.get("stall", 0.0)
    optimizer = busy.get("optimizer", 0.0)
    # The rep's own last moment may come before the iteration's end (another stage finishes later).
    bubble = max(0.0, iteration - (compute + recompute + comm + stall + optimizer))
    return TimeBreakdown(
        compute=compute,
        recompute=recompute,
        exposed_communication=comm,
        pipeline_bubble=bubble,
        offload_stall=stall,
        optimizer=optimizer,
    )


def des_report(result: DesResult) -> Report:
    bound = result.bound
    iteration = result.iteration_time
    # The busiest representative sets the pace; its timeline explains the iteration.
    critical = max(result.reps, key=lambda r: sum(v for k, v in r.busy.items() if k != "idle"))
    breakdown = _breakdown(critical, iteration)
    stages = []
    for stage, reps in zip(bound.stages, result.stage_reps):
        slowest = max(reps, key=lambda r: r.cost.per_micro_batch)
        stages.append(StageTiming(stage, slowest.cost.device.name, slowest.cost.forward, slowest.cost.backward))
    memories = []
    for rep in result.reps:
        c = rep.cost
        base = c.weights + c.gradients + c.optimizer_states
        memory = MemoryBreakdown(
            weights=c.weights,
            gradients=c.gradients,
            optimizer=c.optimizer_states,
            activations=rep.memory_peak - rep.memory_base,
            buffers=rep.memory_base - base,
        )
        memories.append(DeviceMemory(rep.stage.index, rep.rank, c.device, memory))
    peak_rep = max(result.reps, key=lambda r: r.memory_peak)
    utilization = {
        name: port.bytes_moved / (port.capacity * iteration)
        for name, port in sorted(result.ports.items())
        if port.bytes_moved > 0 and port.capacity != float("inf")
    }
    return assemble_report(
        bound,
        "des",
        iteration,
        breakdown,
        stages,
        memories,
        link_utilization=utilization,
        peak_memory_time_s=peak_rep.memory_peak_time,
    )
