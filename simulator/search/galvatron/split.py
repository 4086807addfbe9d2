"""Uneven micro-batch splits for Galvatron on mixed clusters: data-parallel replicas of different speeds.

When a stage's data-parallel replicas run on different GPU types, an even split makes the fast replicas wait
for the slow ones at every micro-step. `speed_split` gives each replica a share of the micro-step that evens
out their times: water-filling from one sequence each, every further sequence goes to the replica whose time
per micro-step (the slowest of its stages, from `simulator.cost.stage.stage_cost` at that share, the figure
both engines use) stays the lowest with it, as long as its memory stays within the budget. That is the split
proportional to speed, rounded to whole sequences, with the costs' non-linearity in the batch (small
micro-batches run matmuls less efficiently) and memory accounted for. The search then evaluates the plan with
the split as a whole and keeps it only when the analytic model predicts it faster.
"""

from __future__ import annotations

import dataclasses
import heapq

from hwmodel.cluster import ClusterSpec
from simulator.analytic import evaluate_bound, stage_memory
from simulator.binding import BoundPlan, bind
from simulator.cost.stage import stage_cost
from simulator.errors import InfeasiblePlan, UnsupportedPlan
from simulator.plan import Plan
from simulator.report import Report
from workloads.config import WorkloadConfig

SPLIT_PLANS = 6  # best plans with replicas of mixed GPU types that get a split tried


def _replica_ranks(bound: BoundPlan, stage_index: int, replica: int) -> list[int]:
    stage = bound.stages[stage_index]
    per = stage.tp * stage.cp
    return list(stage.ranks[replica * per : (replica + 1) * per])


def _signature(bound: BoundPlan, replica: int) -> tuple:
    """Replicas with the same devices and nodes in every stage cost the same at the same share."""
    cluster = bound.cluster
    return tuple(
        (id(cluster.topology.devices[r]), id(cluster.node_of(r)))
        for j in range(len(bound.stages))
        for r in _replica_ranks(bound, j, replica)
    )


def mixed_replicas(bound: BoundPlan) -> bool:
    """Whether some stage's data-parallel replicas run on different device types."""
    devices = bound.cluster.topology.devices
    dp = bound.plan.dp or 1
    for j in range(len(bound.stages)):
        kinds = {tuple(sorted({id(devices[r]) for r in _replica_ranks(bound, j, d)})) for d in range(dp)}
        if len(kinds) > 1:
            return True
    return False


def speed_split(bound: BoundPlan, memory_budget_bytes: float) -> tuple[int, ...] | None:
    """Sequences per replica per micro-step that even out the replicas' times within the memory budget;
    None when the even split is already the answer or no split fits.

    `bound` must bind with a split (every stage and layer with the same dp; `bind` checks).
    """
    plan = bound.plan
    dp = plan.dp or 1
    total = plan.micro_batch * dp
    if dp < 2 or total <= dp:
        return None
    memo: dict = {}
    cache: dict[tuple, tuple[float, bool]] = {}

    def cost_at(replica: int, share: int) -> tuple[float, bool]:
        """(seconds per micro-step, fits the memory) of `replica` running `share` sequences."""
        key = (_signature(bound, replica), share)
        hit = cache.get(key)
        if hit is not None:
            return hit
        seconds, fits = 0.0, True
        for j, stage in enumerate(bound.stages):
            # Every replica at `share`: a rank's cost depends on its own replica's share only.
            probe = dataclasses.replace(stage, replica_batches=(share,) * dp)
            for r in dict.fromkeys(_replica_ranks(bound, j, replica)):
                try:
                    cost = stage_cost(bound, probe, r, memo)
                except (InfeasiblePlan, UnsupportedPlan):
                    cache[key] = (float("inf"), False)
                    return cache[key]
                seconds = max(seconds, cost.per_micro_batch)
                limit = min(memory_budget_bytes, cost.device.memory.capacity)
                fits = fits and stage_memory(cost, bound, probe).total <= limit
        cache[key] = (seconds, fits)
        return cache[key]

    shares = [1] * dp
    if not all(cost_at(d, 1)[1] for d in range(dp)):
        return None
    # Water-filling: each further sequence to the replica that would still be the quickest with it.
    heap = [(cost_at(d, 2)[0], d) for d in range(dp)]
    heapq.heapify(heap)
    left = total - dp
    while left:
        if not heap:
            return None  # no replica can take another sequence within the budget
        _, d = heapq.heappop(heap)
        if not cost_at(d, shares[d] + 1)[1]:
            continue  # this replica is full
        shares[d] += 1
        left -= 1
        heapq.heappush(heap, (cost_at(d, shares[d] + 1)[0], d))
    split = tuple(shares)
    return None if len(set(split)) == 1 else split


def split_candidates(
    ranked: list[tuple[Plan, Report]],
    workload: WorkloadConfig,
    cluster: ClusterSpec,
    memory_budget_bytes: float,
    limit: int = SPLIT_PLANS,
) -> list[tuple[Plan, Report]]:
    """The best `limit` plans whose replicas differ in GPU type, each with its speed split, evaluated.

    Plans that cannot take a split (dp that changes across stages or layers) are passed over; the caller's
    pool keeps a split plan only where it fits and ranks it by its predicted throughput.
    """
    if len(cluster.device_types()) < 2:
        return []
    out = []
    tried = 0
    for plan, _ in ranked:
        if tried >= limit:
            break
        dp = plan.dp or 1
        if plan.batch_split is not None or dp < 2:
            continue
        try:
            bound = bind(plan.model_copy(update={"batch_split": (plan.micro_batch,) * dp}), workload, cluster)
        except (InfeasiblePlan, UnsupportedPlan):
            continue
        if not mixed_replicas(bound):
            continue
        tried += 1
        split = speed_split(bound, memory_budget_bytes)
        if split is None:
            continue
        candidate = plan.model_copy(update={"batch_split": split})
        try:
            report = evaluate_bound(bind(candidate, workload, cluster))
        except (InfeasiblePlan, UnsupportedPlan):
            continue
        out.append((candidate, report))
    return out


__all__ = ["mixed_replicas", "speed_split", "split_candidates"]
