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

from hwmodel.cluster import ClusterSpec
from simulator.assemble import DeviceMemory, StageTiming, assemble_report
from simulator.binding import BoundPlan, BoundStage, bind
from simulator.cost.collectives import p2p_time
from simulator.cost.pipeline import finish_slack, pipeline_time
from simulator.cost.stage import StageCost, buffer_memory, peak_activations, stage_cost
from simulator.plan import Plan
from simulator.report import MemoryBreakdown, Report, TimeBreakdown
from workloads.config import WorkloadConfig
from workloads.transformer import layer_kinds


def representatives(cluster: ClusterSpec, stage: BoundStage) -> dict[int, int]:
    """One rank per distinct device type in the stage (mixed stages wait for their slowest type), and how
    many of the stage's ranks each stands for. With an uneven batch split (plan.batch_split) a device's
    work also depends on its replica's share, so one rank per distinct (device type, share): the slowest
    replica can be any of them."""
    devices = cluster.topology.devices
    shares = stage.replica_batches
    per_replica = stage.tp * stage.cp  # with a split every run of the stage has the same dp (binding)
    seen: dict[object, int] = {}
    counts: dict[int, int] = {}
    for position, r in enumerate(stage.ranks):
        key = id(devices[r]) if shares is None else (id(devices[r]), shares[position // per_replica])
        rep = seen.setdefault(key, r)
        counts[rep] = counts.get(rep, 0) + 1
    return counts


def representative_ranks(cluster: ClusterSpec, stage: BoundStage) -> list[int]:
    """The ranks that stand for the stage's devices (see `representatives`)."""
    return list(representatives(cluster, stage))


def stage_memory(cost: StageCost, bound: BoundPlan, stage: BoundStage) -> MemoryBreakdown:
    """The stage's peak memory: model states, buffers and the activations its schedule keeps."""
    return MemoryBreakdown(
        weights=cost.weights,
        gradients=cost.gradients,
        optimizer=cost.optimizer_states,
        activations=peak_activations(cost, bound, stage),
        buffers=buffer_memory(cost, len(bound.stages)),
    )


def stage_p2p(bound: BoundPlan, i: int, output_bytes: float) -> float:
    """Sending a micro-batch's activations from stage i to stage i+1 (and gradients back)."""
    a, b = bound.stages[i], bound.stages[i + 1]
    worst = 0.0
    for ra, rb in ((a.ranks[0], b.ranks[0]), (a.ranks[-1], b.ranks[-1])):
        path = bound.cluster.path(ra, rb)
        worst = max(worst, p2p_time(output_bytes, path.bandwidth, path.latency))
    return worst


def evaluate_bound(bound: BoundPlan) -> Report:
    """The analytic Report of an already bound plan."""
    plan, cluster = bound.plan, bound.cluster
    m, p, v = bound.num_micro_batches, len(bound.stages), plan.virtual_stages

    stage_costs: list[StageCost] = []
    # (stage index, representative rank, cost, memory) for every distinct device type of every stage
    all_costs: list[tuple[int, int, StageCost, MemoryBreakdown]] = []
    # the largest activation a stage hands on (replicas of an uneven batch split send different sizes)
    output_bytes: list[float] = []
    memo: dict = {}
    for stage in bound.stages:
        costs = []
        for rank in representative_ranks(cluster, stage):
            cost = stage_cost(bound, stage, rank, memo)
            all_costs.append((stage.index, rank, cost, stage_memory(cost, bound, stage)))
            costs.append(cost)
        stage_costs.append(max(costs, key=lambda c: c.per_micro_batch))
        output_bytes.append(max(c.output_bytes for c in costs))

    stage_times = [c.per_micro_batch for c in stage_costs]
    pipe = pipeline_time(stage_times, m, plan.schedule, v)
    p2p = [stage_p2p(bound, i, output_bytes[i]) for i in range(p - 1)]
    # Fill and drain wait for each boundary's activation and gradient once; the steady state overlaps them.
    p2p_exposed = 2.0 * sum(p2p)

    backward_per_stage = [c.backward for c in stage_costs]
    tails = []  # (time beyond the pipeline's end, its optimizer part)
    for i, c in enumerate(stage_costs):
        # After its last backward a stage finishes reducing gradients, steps the optimizer and (ZeRO-1/2)
        # gathers the new weights; stages that finish early hide this in their slack.
        after_finish = c.reduce_tail(v) + c.optimizer + c.regather
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

    stages = [
        StageTiming(stage, c.device.name, c.forward, c.per_micro_batch - c.forward)
        for stage, c in zip(bound.stages, stage_costs)
    ]
    memories = [DeviceMemory(si, rank, c.device, mem) for si, rank, c, mem in all_costs]
    return assemble_report(bound, "analytic", iteration, breakdown, stages, memories)


def evaluate(plan: Plan, workload: WorkloadConfig, cluster: ClusterSpec) -> Report:
    """Predict what `plan` does for `workload` on `cluster`.

    Raises:
        InfeasiblePlan: the plan does not fit the workload or cluster (see `simulator.binding`).
    """
    return evaluate_bound(bind(plan, workload, cluster))


__all__ = ["evaluate", "evaluate_bound", "layer_kinds"]
