"""Turning an engine's results into a Report: throughput, MFU/HFU, memory and stage tables.

Both engines (analytic and discrete-event) hand over their iteration time, time breakdown, per-stage
timings and per-device memory; everything derived from them is computed here, once, with the shared
definitions of `simulator.metrics`.
"""

from __future__ import annotations

from dataclasses import dataclass

from hwmodel.components import DeviceSpec
from simulator import metrics
from simulator.binding import BoundPlan, BoundStage
from simulator.report import EngineName, MemoryBreakdown, Report, StageReport, TimeBreakdown
from workloads.ops import OP_SELECTIVE, VECTOR, ShardShape
from workloads.transformer import layer_profile, model_flops_per_sample


@dataclass(frozen=True)
class StageTiming:
    stage: BoundStage
    device: str  # the device type that sets the stage's pace
    forward_s: float  # per micro-batch
    backward_s: float


@dataclass(frozen=True)
class DeviceMemory:
    stage_index: int
    rank: int  # a representative rank
    device: DeviceSpec
    memory: MemoryBreakdown


def peak_flops_total(bound: BoundPlan) -> float:
    """Sum of the dense matrix peaks of the plan's devices (the MFU denominator)."""
    dtype = bound.plan.dtype
    devices = bound.cluster.topology.devices
    if sum(stage.num_devices for stage in bound.stages) == len(devices):
        return bound.cluster.topology.peak_flops(dtype)
    counts: dict[int, int] = {}
    for stage in bound.stages:
        for r in stage.ranks:
            counts[id(devices[r])] = counts.get(id(devices[r]), 0) + 1
    by_id = {id(d): d for d in devices}
    return sum(n * by_id[i].compute.peak(dtype, "matrix") for i, n in counts.items())


def recompute_model_flops_per_sample(bound: BoundPlan) -> float:
    """Forward model FLOPs that the plan's recomputation repeats, per sample."""
    cfg = bound.workload
    shape = ShardShape(micro_batch=1, seq_len=cfg.seq_len)
    counts: dict[tuple[str, str, float], int] = {}
    for stage in bound.stages:
        for run in stage.runs:
            if run.recompute != "none":
                key = (run.kind, run.recompute, run.offload)
                counts[key] = counts.get(key, 0) + run.count
    total = 0.0
    for (kind, mode, offload), n in counts.items():
        prof = layer_profile(cfg, kind, shape)
        if mode == "full":
            total += n * prof.model_fwd_flops
        elif mode == OP_SELECTIVE:
            # The re-run share of the matmuls (vector work has no model FLOPs; the attention output is saved).
            mat = prof.unit != VECTOR
            share = float((prof.fwd_flops * prof.op_selective)[mat].sum() / max(prof.fwd_flops[mat].sum(), 1.0))
            total += n * share * prof.model_fwd_flops
        elif mode == "tokenwise":
            # MEMO re-runs everything but the attention core for the tokens it did not swap to host.
            total += n * (1.0 - offload) * (prof.model_fwd_flops - prof.model_fwd_flops_selective)
        else:
            total += n * prof.model_fwd_flops_selective
    return total


def assemble_report(
    bound: BoundPlan,
    engine: EngineName,
    iteration: float,
    breakdown: TimeBreakdown,
    stages: list[StageTiming],
    memories: list[DeviceMemory],
    **extra,
) -> Report:
    """The Report of an engine's run of `bound` (extra: engine-specific Report fields)."""
    plan, cfg = bound.plan, bound.workload
    peak = max(memories, key=lambda d: d.memory.total)
    fits = all(d.memory.total <= d.device.memory.capacity for d in memories)
    global_batch = plan.global_batch or 0
    model_flops = global_batch * model_flops_per_sample(cfg)
    hardware_flops = model_flops + global_batch * recompute_model_flops_per_sample(bound)
    peak_total = peak_flops_total(bound)
    stage_reports = []
    for timing in stages:
        stage = timing.stage
        first, last = stage.block_range
        stage_peak = max((d.memory for d in memories if d.stage_index == stage.index), key=lambda mem: mem.total)
        stage_reports.append(
            StageReport(
                index=stage.index,
                first_layer=first,
                last_layer=last,
                num_devices=stage.num_devices,
                device=timing.device,
                tp=stage.tp,
                cp=stage.cp,
                dp=stage.dp_for(stage.tp),
                forward_s=timing.forward_s,
                backward_s=timing.backward_s,
                peak_memory_bytes=stage_peak.total,
                memory_bytes=stage_peak,
            )
        )
    warnings = list(bound.warnings)
    if not fits:
        worst = [
            f"stage {d.stage_index} on {d.device.name}: {d.memory.total / 2**30:.1f} GiB > "
            f"{d.device.memory.capacity / 2**30:.1f} GiB"
            for d in memories
            if d.memory.total > d.device.memory.capacity
        ]
        warnings.append("out of memory: " + "; ".join(worst))
    return Report(
        engine=engine,
        workload=cfg.name,
        cluster=bound.cluster.name,
        stack=bound.stack,
        plan=plan,
        num_devices=len(bound.ranks),
        global_batch=global_batch,
        num_micro_batches=bound.num_micro_batches,
        seq_len=cfg.seq_len,
        iteration_time_s=iteration,
        tokens_per_s=metrics.tokens_per_second(global_batch, cfg.tokens_per_sample, iteration),
        samples_per_s=global_batch / iteration,
        mfu=metrics.mfu(model_flops, iteration, peak_total),
        hfu=metrics.hfu(hardware_flops, iteration, peak_total),
        mfu_causal_in_full=metrics.mfu(
            global_batch * model_flops_per_sample(cfg, causal_in_full=True), iteration, peak_total
        ),
        model_flops_per_iteration=model_flops,
        hardware_flops_per_iteration=hardware_flops,
        peak_memory_bytes=peak.memory.total,
        peak_memory_device=peak.rank,
        memory_capacity_bytes=peak.device.memory.capacity,
        fits_memory=fits,
        memory_bytes=peak.memory,
        time_breakdown_s=breakdown,
        stages=stage_reports,
        warnings=warnings,
        **extra,
    )
