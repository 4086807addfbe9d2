"""The analytic model: a plan's iteration time, throughput and memory in closed form.

For each pipeline stage and each device type in it, every layer's forward and backward time comes
from the roofline of its operators (`cost.compute`), plus the communication the plan puts on the
critical path (`cost.collectives`): tensor-parallel collectives in full, context-parallel ring passes
beyond the attention they overlap, ZeRO-3 gathers and reduce-scatters beyond the layer compute they
are prefetched behind, activation offload copies beyond the compute they hide behind. Stages combine
through the schedule's formula (`cost.pipeline`); data-parallel gradient reduction overlaps the last
micro-batch's backward and the stage's pipeline slack; the optimizer step closes the iteration.

The analytic model has no contention between flows: the discrete-event engine adds that, using these
same cost functions, and agrees with this model where nothing contends.
"""

from __future__ import annotations

from dataclasses import dataclass

from hwmodel.cluster import ClusterSpec, GroupSpan
from hwmodel.components import DeviceSpec
from workloads.config import WorkloadConfig
from workloads.ops import LayerProfile, ShardShape
from workloads.transformer import layer_kinds, layer_profile, model_flops_per_sample

from . import metrics
from .binding import BoundPlan, BoundStage, LayerRun, bind
from .cost.collectives import collective_time, p2p_time
from .cost.compute import DTYPE_BYTES, layer_times, optimizer_time, roofline
from .cost.memory import OPTIMIZER_TRAFFIC, micro_batches_in_flight, model_state_memory, state_bytes
from .cost.pipeline import finish_slack, pipeline_time
from .plan import Plan
from .report import MemoryBreakdown, Report, StageReport, TimeBreakdown

# Gradients are reduced in buckets; the last bucket cannot overlap backward (PyTorch DDP default 25 MB).
GRAD_BUCKET_BYTES = 25e6


@dataclass
class StageCost:
    """Per micro-batch times (seconds) and peak memory of one stage on one device type."""

    device: DeviceSpec
    compute: float = 0.0
    recompute: float = 0.0
    comm: float = 0.0
    stall: float = 0.0
    forward: float = 0.0
    backward_compute: float = 0.0
    dp_overlappable: float = 0.0  # gradient reduction that can hide behind the last backward
    dp_exposed: float = 0.0  # parameter gathers after the optimizer step
    dp_last_bucket: float = 0.0  # the last gradient bucket's reduction, which nothing hides
    optimizer: float = 0.0
    output_bytes: float = 0.0
    weights: float = 0.0
    gradients: float = 0.0
    optimizer_states: float = 0.0
    saved_activations: float = 0.0  # bytes one micro-batch keeps for backward on this stage
    transient: float = 0.0  # what one layer's recompute re-materializes during backward
    comm_buffer: float = 0.0  # sharded data parallelism: unsharded gradients (and gathered weights) in flight

    @property
    def per_micro_batch(self) -> float:
        return self.compute + self.recompute + self.comm + self.stall


def _spans(cluster: ClusterSpec, stage: BoundStage, tp: int, ep: int) -> dict[str, list[GroupSpan]]:
    dp_groups = stage.dp_groups(tp)
    return {
        "tp": [cluster.span(stage.tp_group(tp))],
        "cp": [cluster.span(stage.cp_group(tp))],
        "dp": [cluster.span(g) for g in dp_groups],
        "ep": [cluster.span(g[:ep]) for g in dp_groups],
    }


def _comm(collectives, spans: dict[str, list[GroupSpan]], cp: bool) -> float:
    """Time of the collectives of one group family: context parallel (`cp`) or all the others."""
    total = 0.0
    for c in collectives:
        if (c.group == "cp") == cp:
            total += max(collective_time(c.kind, c.nbytes, s) for s in spans[c.group])
    return total


def _stage_cost(bound: BoundPlan, stage: BoundStage, rank: int, memo: dict) -> StageCost:
    """Per micro-batch times and model-state memory of `stage` on the device at `rank`.

    Stages with the same layers, device, links and group shapes cost the same, so they are computed
    once (`memo`): a 1,000-GPU plan costs what its distinct stages cost.
    """
    plan, cfg, cluster = bound.plan, bound.workload, bound.cluster
    device = cluster.topology.devices[rank]
    node = cluster.node_of(rank)
    p = len(bound.stages)
    groups: list[tuple[LayerRun, int]] = [(run, run.count) for run in stage.runs]
    span_sets = {tp: _spans(cluster, stage, tp, plan.ep) for tp in {a.tp for a, _ in groups}}
    key = (
        tuple((a.strategy_key(), n) for a, n in groups),
        id(device),
        id(node),
        stage.micro_step_batch,
        stage.cp,
        # Spans are cached per cluster, so their identity names their shape.
        tuple((tp, tuple(id(x) for v in spans.values() for x in v)) for tp, spans in sorted(span_sets.items())),
        p > 1,
    )
    cached = memo.get(key)
    if cached is not None:
        return cached
    line = roofline(device, plan.dtype)
    e = DTYPE_BYTES[plan.dtype]
    per_param = state_bytes(plan.dtype, plan.optimizer)
    reduce_bytes = DTYPE_BYTES[plan.grad_reduce_dtype or ("fp16" if plan.dtype == "fp16" else "fp32")]
    sigma = line.overlap_slowdown
    host_bw = node.host_link.effective_bandwidth
    mixed = plan.dtype != "fp32"
    cost = StageCost(device=device)

    saved_total = 0.0
    transient = 0.0
    comm_buffer = 0.0
    weights = grads = optim = 0.0
    opt_params = 0.0
    grad_sync: list[tuple[float, str, list[GroupSpan]]] = []
    for a, n in groups:
        dp_l = stage.dp_for(a.tp)
        shape = ShardShape(
            micro_batch=stage.micro_step_batch // dp_l,
            seq_len=cfg.seq_len,
            tp=a.tp,
            sequence_parallel=a.sequence_parallel,
            cp=stage.cp,
            ep=plan.ep,
            dtype_bytes=e,
            attention=plan.attention,
        )
        prof: LayerProfile = layer_profile(cfg, a.kind, shape)
        times = layer_times(prof, line)
        spans = span_sets[a.tp]
        blocking_fwd = _comm(prof.fwd_comm, spans, cp=False)
        blocking_bwd = _comm(prof.bwd_comm, spans, cp=False)
        # Ring attention hides its k/v passes behind the attention core.
        cp_fwd = max(0.0, _comm(prof.fwd_comm, spans, cp=True) - times.recompute_selective)
        cp_bwd = max(0.0, _comm(prof.bwd_comm, spans, cp=True) - 2.5 * times.recompute_selective)
        if a.recompute == "full":
            recompute = times.recompute_full + blocking_fwd + cp_fwd
        elif a.recompute == "selective":
            recompute = times.recompute_selective
        else:
            recompute = 0.0
        comm_f, comm_b = blocking_fwd + cp_fwd, blocking_bwd + cp_bwd
        if a.dp_type == "zero3" and dp_l > 1:
            gather = max(collective_time("all_gather", prof.params_local * per_param.weights, s) for s in spans["dp"])
            scatter = max(collective_time("reduce_scatter", prof.params_local * reduce_bytes, s) for s in spans["dp"])
            # Prefetched one layer ahead: only what exceeds the layer's compute shows, and compute slows
            # while the transfer runs beside it.
            comm_f += max(0.0, gather - times.forward) + sigma * min(gather, times.forward)
            bwd_busy = times.backward + recompute
            comm_b += max(0.0, gather + scatter - bwd_busy) + sigma * min(gather + scatter, bwd_busy)
        if a.dp_type in ("zero2", "zero3") and dp_l > 1:
            # A layer's gradients exist unsharded until reduce-scattered; ZeRO-3 also holds the gathered
            # weights of the layer it computes and of the one it prefetches.
            gathered = 2 * per_param.weights if a.dp_type == "zero3" else 0.0
            comm_buffer = max(comm_buffer, prof.params_local * (gathered + reduce_bytes))
        if a.dp_type != "zero3" and dp_l > 1:
            grad_sync.append((n * prof.params_local, a.dp_type, spans["dp"]))
        stall = 0.0
        saved = prof.saved_bytes[a.recompute]
        if a.offload > 0:
            copy = a.offload * saved / host_bw
            stall = max(0.0, copy - times.forward) + max(0.0, copy - times.backward)
            saved *= 1.0 - a.offload
        cost.compute += n * (times.forward + times.backward)
        cost.forward += n * (times.forward + comm_f)
        cost.backward_compute += n * times.backward
        cost.recompute += n * recompute
        cost.comm += n * (comm_f + comm_b)
        cost.stall += n * stall
        saved_total += n * saved
        # Backward re-materializes, for one layer at a time, what its recompute mode dropped.
        transient = max(transient, prof.saved_bytes["none"] - prof.saved_bytes[a.recompute])
        states = model_state_memory(n * prof.params_local, plan.dtype, plan.optimizer, a.dp_type, dp_l)
        weights += states.weights
        grads += states.gradients
        optim += states.optimizer
        opt_params += n * prof.params_local / (dp_l if a.dp_type != "ddp" else 1)
        cost.output_bytes = prof.output_bytes
        if prof.tied_params_local and p > 1:
            # The output layer keeps its own copy of the tied embedding on another stage.
            tied = model_state_memory(prof.tied_params_local, plan.dtype, plan.optimizer, a.dp_type, dp_l)
            weights += tied.weights
            grads += tied.gradients
            optim += tied.optimizer
            opt_params += prof.tied_params_local / (dp_l if a.dp_type != "ddp" else 1)
            grad_sync.append((prof.tied_params_local, "ddp", spans["dp"]))

    total_grad_bytes = sum(params for params, _, _ in grad_sync) * reduce_bytes
    for params, dp_type, dp_spans in grad_sync:
        if dp_type == "ddp":
            cost.dp_overlappable += max(collective_time("all_reduce", params * reduce_bytes, s) for s in dp_spans)
        else:
            # ZeRO-1/2: reduce-scatter gradients behind backward, gather updated weights after the step.
            cost.dp_overlappable += max(collective_time("reduce_scatter", params * reduce_bytes, s) for s in dp_spans)
            cost.dp_exposed += max(collective_time("all_gather", params * per_param.weights, s) for s in dp_spans)
    if total_grad_bytes > 0:
        cost.dp_last_bucket = cost.dp_overlappable * min(1.0, GRAD_BUCKET_BYTES / total_grad_bytes)
    cost.optimizer = optimizer_time(opt_params, OPTIMIZER_TRAFFIC[(plan.optimizer, mixed)], line)

    cost.weights, cost.gradients, cost.optimizer_states = weights, grads, optim
    cost.saved_activations, cost.transient, cost.comm_buffer = saved_total, transient, comm_buffer
    memo[key] = cost
    return cost


def _stage_memory(cost: StageCost, bound: BoundPlan, stage: BoundStage) -> MemoryBreakdown:
    """The stage's peak memory: model states plus the activations its schedule keeps in flight."""
    plan, p = bound.plan, len(bound.stages)
    in_flight = micro_batches_in_flight(plan.schedule, stage.index, p, bound.num_micro_batches, plan.virtual_stages)
    return MemoryBreakdown(
        weights=cost.weights,
        gradients=cost.gradients,
        optimizer=cost.optimizer_states,
        activations=cost.saved_activations * in_flight + cost.transient,
        buffers=cost.device.memory.reserved + cost.comm_buffer + (2 * cost.output_bytes if p > 1 else 0.0),
    )


def _representative_ranks(cluster: ClusterSpec, stage: BoundStage) -> list[int]:
    """One rank per distinct device type in the stage (mixed stages wait for their slowest type)."""
    devices = cluster.topology.devices
    seen: dict[int, int] = {}
    for r in stage.ranks:
        seen.setdefault(id(devices[r]), r)
    return list(seen.values())


def _stage_p2p(bound: BoundPlan, i: int, output_bytes: float) -> float:
    """Sending a micro-batch's activations from stage i to stage i+1 (and gradients back)."""
    a, b = bound.stages[i], bound.stages[i + 1]
    worst = 0.0
    for ra, rb in ((a.ranks[0], b.ranks[0]), (a.ranks[-1], b.ranks[-1])):
        path = bound.cluster.path(ra, rb)
        worst = max(worst, p2p_time(output_bytes, path.bandwidth, path.latency))
    return worst


def evaluate_bound(bound: BoundPlan) -> Report:
    """The analytic Report of an already bound plan."""
    plan, cfg, cluster = bound.plan, bound.workload, bound.cluster
    m, p, v = bound.num_micro_batches, len(bound.stages), plan.virtual_stages

    stage_costs: list[StageCost] = []
    # (stage index, representative rank, cost, memory) for every distinct device type of every stage
    all_costs: list[tuple[int, int, StageCost, MemoryBreakdown]] = []
    memo: dict = {}
    for stage in bound.stages:
        costs = []
        for rank in _representative_ranks(cluster, stage):
            cost = _stage_cost(bound, stage, rank, memo)
            all_costs.append((stage.index, rank, cost, _stage_memory(cost, bound, stage)))
            costs.append(cost)
        stage_costs.append(max(costs, key=lambda c: c.per_micro_batch))

    stage_times = [c.per_micro_batch for c in stage_costs]
    pipe = pipeline_time(stage_times, m, plan.schedule, v)
    p2p = [_stage_p2p(bound, i, stage_costs[i].output_bytes) for i in range(p - 1)]
    # Fill and drain wait for each boundary's activation and gradient once; the steady state overlaps them.
    p2p_exposed = 2.0 * sum(p2p)

    backward_per_stage = [c.backward_compute + c.recompute for c in stage_costs]
    tails = []  # (time beyond the pipeline's end, its optimizer part)
    for i, c in enumerate(stage_costs):
        # Gradients become ready during the last micro-batch's backward (of the last model chunk when
        # interleaved); only the last bucket and what exceeds that backward wait. Stages that finish
        # early hide their tail in their slack.
        window = backward_per_stage[i] / v if plan.schedule == "interleaved" else backward_per_stage[i]
        reduce_wait = max(c.dp_last_bucket, c.dp_overlappable - window)
        after_finish = reduce_wait + c.optimizer + c.dp_exposed
        slack = finish_slack(i, backward_per_stage, plan.schedule, v)
        tails.append((max(0.0, after_finish - slack), c.optimizer))
    tail, tail_opt = max(tails)
    iteration = pipe + p2p_exposed + tail

    b = max(range(p), key=lambda i: stage_times[i])
    bottleneck = stage_costs[b]
    breakdown = TimeBreakdown(
        compute=m * bottleneck.compute,
        recompute=m * bottleneck.recompute,
        exposed_communication=m * bottleneck.comm + p2p_exposed + tail - min(tail, tail_opt),
        pipeline_bubble=max(0.0, pipe - m * stage_times[b]),
        offload_stall=m * bottleneck.stall,
        optimizer=min(tail, tail_opt),
    )

    # ---- memory --------------------------------------------------------------------------------
    _, peak_rank, peak_cost, peak_memory = max(all_costs, key=lambda item: item[3].total)
    fits = all(mem.total <= c.device.memory.capacity for _, _, c, mem in all_costs)

    # ---- throughput and utilization -------------------------------------------------------------
    global_batch = plan.global_batch or 0
    model_flops = global_batch * model_flops_per_sample(cfg)
    hardware_flops = model_flops + global_batch * _recompute_model_flops_per_sample(bound)
    peak_total = _peak_flops_total(bound)
    stages_report = []
    for i, (stage, c) in enumerate(zip(bound.stages, stage_costs)):
        first, last = stage.block_range
        stage_peak = max((mem for si, _, _, mem in all_costs if si == i), key=lambda mem: mem.total)
        stages_report.append(
            StageReport(
                index=i,
                first_layer=first,
                last_layer=last,
                num_devices=stage.num_devices,
                device=c.device.name,
                tp=stage.tp,
                cp=stage.cp,
                dp=stage.dp_for(stage.tp),
                forward_s=c.forward,
                backward_s=c.per_micro_batch - c.forward,
                peak_memory_bytes=stage_peak.total,
                memory_bytes=stage_peak,
            )
        )
    warnings = list(bound.warnings)
    if not fits:
        worst = [
            f"stage {si} on {c.device.name}: {mem.total / 2**30:.1f} GiB > {c.device.memory.capacity / 2**30:.1f} GiB"
            for si, _, c, mem in all_costs
            if mem.total > c.device.memory.capacity
        ]
        warnings.append("out of memory: " + "; ".join(worst))
    return Report(
        engine="analytic",
        workload=cfg.name,
        cluster=cluster.name,
        plan=plan,
        num_devices=len(bound.ranks),
        global_batch=global_batch,
        num_micro_batches=m,
        seq_len=cfg.seq_len,
        iteration_time_s=iteration,
        tokens_per_s=metrics.tokens_per_second(global_batch, cfg.tokens_per_sample, iteration),
        samples_per_s=global_batch / iteration,
        mfu=metrics.mfu(model_flops, iteration, peak_total),
        hfu=metrics.hfu(hardware_flops, iteration, peak_total),
        model_flops_per_iteration=model_flops,
        hardware_flops_per_iteration=hardware_flops,
        peak_memory_bytes=peak_memory.total,
        peak_memory_device=peak_rank,
        memory_capacity_bytes=peak_cost.device.memory.capacity,
        fits_memory=fits,
        memory_bytes=peak_memory,
        time_breakdown_s=breakdown,
        stages=stages_report,
        warnings=warnings,
    )


def _peak_flops_total(bound: BoundPlan) -> float:
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


def _recompute_model_flops_per_sample(bound: BoundPlan) -> float:
    cfg = bound.workload
    shape = ShardShape(micro_batch=1, seq_len=cfg.seq_len)
    counts: dict[tuple[str, str], int] = {}
    for stage in bound.stages:
        for run in stage.runs:
            if run.recompute != "none":
                counts[(run.kind, run.recompute)] = counts.get((run.kind, run.recompute), 0) + run.count
    total = 0.0
    for (kind, mode), n in counts.items():
        prof = layer_profile(cfg, kind, shape)
        total += n * (prof.model_fwd_flops if mode == "full" else prof.model_fwd_flops_selective)
    return total


def evaluate(plan: Plan, workload: WorkloadConfig, cluster: ClusterSpec) -> Report:
    """Predict what `plan` does for `workload` on `cluster`.

    Raises:
        InfeasiblePlan: the plan does not fit the workload or cluster (see `simulator.binding`).
    """
    return evaluate_bound(bind(plan, workload, cluster))


__all__ = ["evaluate", "evaluate_bound", "layer_kinds"]
