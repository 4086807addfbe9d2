"""The measured Report: what a run measured, in the simulator's Report schema (engine "measured").

The Report is assembled by `simulator.assemble.assemble_report`, the same code that assembles the
analytic and event engines' Reports, so tokens/s, samples/s, MFU and HFU use the shared definitions of
`simulator.metrics` with the same model FLOPs, recompute FLOPs and sum of device peaks.

- iteration_time_s: median wall time of the iterations after warm-up, each the slowest rank's.
- memory: per rank as measured (see `executor.memory` for what is counted on CPU and on CUDA); the
  Report shows the rank with the largest peak, `fits_memory` compares every rank with its device.
- time_breakdown_s: the measured iteration time is all in `compute`, the other parts are 0: the
  executor measures the iteration, not where its time goes (the profiler trace of --trace shows that).
- stages: empty (no per-stage forward/backward times are measured).
"""

from __future__ import annotations

import statistics

from executor.job import RunResult
from simulator.assemble import DeviceMemory, assemble_report
from simulator.binding import BoundPlan
from simulator.report import MemoryBreakdown, Report, TimeBreakdown


def measured_report(bound: BoundPlan, result: RunResult, warnings: list[str]) -> Report:
    """The Report of a run of `bound` that measured `result`."""
    iteration = statistics.median(result.step_times_s[i] for i in result.timed)
    ranks = list(bound.ranks)
    stage_of = {r: stage.index for stage in bound.stages for r in stage.ranks}
    memories = []
    for local, mem in enumerate(result.memory):
        rank = ranks[local]
        breakdown = MemoryBreakdown(
            weights=mem["weights"],
            gradients=mem["gradients"],
            optimizer=mem["optimizer"],
            activations=mem["activations"],
            buffers=mem["buffers"],
        )
        memories.append(DeviceMemory(stage_of[rank], rank, bound.cluster.device(rank), breakdown))
    report = assemble_report(bound, "measured", iteration, TimeBreakdown(compute=iteration), [], memories)
    extra = [w for w in list(warnings) + list(result.warnings) if w not in report.warnings]
    return report.model_copy(update={"warnings": report.warnings + extra})


def extras(result: RunResult) -> dict:
    """Measured data the Report has no field for (printed beside it in --json)."""
    return {
        "first_step": result.first_step,
        "step_times_s": result.step_times_s,
        "cpu_times_s": result.cpu_times_s,
        "timed_steps": [result.first_step + i for i in result.timed],
        "device": result.device_name,
        "memory_per_rank": result.memory,
        "skipped_nonfinite_steps": result.skipped_steps,
    }
