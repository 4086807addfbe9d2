"""Search: the largest model of a family that trains on a node (max-model), or the fastest placement for a
model (throughput); Angel-PTM beside ZeRO-3, ZeRO-Offload, ZeRO-Infinity and PatrickStar-style chunks, all
costed by the same model so the differences are the placements alone."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from itertools import product

from pydantic import BaseModel

from hwmodel.cluster import ClusterSpec, NodeSpec
from hwmodel.errors import UserError
from simulator.errors import InfeasiblePlan
from simulator.plan import ModelStatePlacement, Plan, TierShares
from simulator.search.angel_ptm.costs import (
    HOST_USABLE,
    STATE_CLASSES,
    check_fits,
    class_bytes_per_param,
    step_cost,
    tier_bytes,
    working_set,
)
from simulator.search.angel_ptm.des import simulate_step
from simulator.search.angel_ptm.space import fill_placement, ladder_model
from simulator.search.result import Baseline, Candidate, SearchResult
from workloads.config import WorkloadConfig
from workloads.transformer import parameter_count

MICRO_BATCHES = (1, 2, 4, 8)
GRAD_ACCUM = (1, 4, 16)
PREFETCH = (1, 2, 4)
SYSTEMS = ("angel-ptm", "zero3", "zero-offload", "zero-infinity", "patrickstar")


class AngelReport(BaseModel):
    """Predicted figures of one paged plan on one node."""

    model: str
    params: float
    samples_per_s: float
    step_s: float
    des_step_s: float
    compute_s: float
    pcie_s: float
    ssd_s: float
    cpu_step_s: float
    bound_s: float
    gpu_state_bytes: float
    host_state_bytes: float
    ssd_state_bytes: float
    capacity_bound_params: float


def single_node(cluster: ClusterSpec) -> NodeSpec:
    if len(cluster.node_groups) != 1 or cluster.node_groups[0].count != 1:
        raise UserError(f"angel-ptm plans one node; cluster {cluster.name} has several (use --nodes 1)")
    return cluster.node_groups[0].node


def _capacities(wl: WorkloadConfig, node: NodeSpec, depth: int, micro_batch: int) -> dict[str, float]:
    probe = ModelStatePlacement(prefetch_depth=depth)
    work = working_set(wl, probe, micro_batch, node.num_devices)
    gpu_free = node.device.memory.capacity - node.device.memory.reserved - work.activations - work.window
    return {
        "gpu": max(gpu_free, 0.0) * node.num_devices,
        "cpu": node.host.memory * HOST_USABLE,
        "ssd": node.storage.capacity if node.storage is not None else 0.0,
    }


def _one(gpu: float = 0.0, cpu: float = 0.0, ssd: float = 0.0) -> TierShares:
    return TierShares(gpu=gpu, cpu=cpu, ssd=ssd)


def placement_for(
    system: str, wl: WorkloadConfig, node: NodeSpec, depth: int, micro_batch: int
) -> ModelStatePlacement | None:
    """The placement `system` would choose for `wl` (None: its tiers cannot hold the states)."""
    n = float(parameter_count(wl))
    need = {c: n * b for c, b in class_bytes_per_param().items()}
    caps = _capacities(wl, node, depth, micro_batch)
    if system == "zero3":
        return fill_placement(need, caps, ("gpu",), prefetch_depth=depth)
    if system == "zero-offload":  # fp16 parameters stay on GPU; gradients, fp32 states and the step on the CPU
        return ModelStatePlacement(
            parameters=_one(gpu=1),
            gradients=_one(cpu=1),
            master_weights=_one(cpu=1),
            moments=_one(cpu=1),
            optimizer="cpu-host",
            prefetch_depth=depth,
        )
    if system == "zero-infinity":  # parameters and optimizer states on NVMe, gradients in host memory
        return ModelStatePlacement(
            parameters=_one(ssd=1),
            gradients=_one(cpu=1),
            master_weights=_one(ssd=1),
            moments=_one(ssd=1),
            optimizer="cpu-ssd",
            prefetch_depth=depth,
        )
    tiers = ("gpu", "cpu") if system == "patrickstar" else ("gpu", "cpu", "ssd")
    probe = fill_placement(need, caps, tiers, prefetch_depth=depth)
    if probe is None:
        return None
    off = any(probe.shares(c).gpu < 1.0 for c in ("master_weights", "moments"))
    on_ssd = any(probe.shares(c).ssd > 0 for c in STATE_CLASSES)
    optimizer = ("cpu-ssd" if on_ssd else "cpu-host") if off else "gpu"
    staleness = 1 if system == "angel-ptm" and optimizer != "gpu" else 0
    return probe.model_copy(update={"optimizer": optimizer, "staleness": staleness})


def evaluate(
    system: str, wl: WorkloadConfig, node: NodeSpec, micro_batch: int, grad_accum: int, depth: int
) -> tuple[Plan, AngelReport]:
    """(plan, report) of `system` for `wl`, or raise InfeasiblePlan naming the tier."""
    placement = placement_for(system, wl, node, depth, micro_batch)
    if placement is None:
        raise InfeasiblePlan(f"{system}: its tiers cannot hold {parameter_count(wl) * 16 / 1e9:.0f} GB of model states")
    cost = step_cost(wl, node, placement, micro_batch, grad_accum)
    gpus = node.num_devices
    n = float(parameter_count(wl))
    tiers = tier_bytes(n, placement)
    plan = Plan(
        dp=gpus,
        dp_type="zero3",
        recompute="full",
        micro_batch=micro_batch,
        global_batch=micro_batch * grad_accum * gpus,
        model_states=placement,
    )
    report = AngelReport(
        model=wl.name,
        params=n,
        samples_per_s=micro_batch * grad_accum * gpus / cost.step,
        step_s=cost.step,
        des_step_s=simulate_step(wl, node, placement, micro_batch, grad_accum),
        compute_s=cost.compute,
        pcie_s=cost.pcie,
        ssd_s=cost.ssd,
        cpu_step_s=cost.cpu_step,
        bound_s=cost.bound,
        gpu_state_bytes=tiers.gpu,
        host_state_bytes=tiers.cpu,
        ssd_state_bytes=tiers.ssd,
        capacity_bound_params=capacity_bound(system, wl, node, depth, micro_batch),
    )
    return plan, report


def capacity_bound(system: str, wl: WorkloadConfig, node: NodeSpec, depth: int, micro_batch: int) -> float:
    """Parameters the tiers `system` uses could hold at 16 B each, less `wl`'s working set."""
    caps = _capacities(wl, node, depth, micro_batch)
    use = {
        "zero3": ("gpu",),
        "patrickstar": ("gpu", "cpu"),
        "zero-offload": ("gpu", "cpu"),
        "zero-infinity": ("gpu", "cpu", "ssd"),
    }.get(system, ("gpu", "cpu", "ssd"))
    return sum(caps[t] for t in use) / sum(class_bytes_per_param().values())


def best_throughput(
    system: str, wl: WorkloadConfig, node: NodeSpec, depths: Sequence[int] = PREFETCH
) -> list[tuple[Plan, AngelReport]]:
    """Every feasible configuration of `system` for `wl` (prefetch depths from `depths`), fastest first."""
    found = []
    for mb, ga, depth in product(MICRO_BATCHES, GRAD_ACCUM, depths):
        try:
            found.append(evaluate(system, wl, node, mb, ga, depth))
        except InfeasiblePlan:
            continue
    return sorted(found, key=lambda pr: -pr[1].samples_per_s)


def largest_layers(fits: Callable[[int], bool], lo: int = 2, hi: int = 1024) -> int | None:
    """The largest ladder depth in [lo, hi] that fits (fit is monotone in depth), or None."""
    if not fits(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def max_model(system: str, base: WorkloadConfig, node: NodeSpec) -> WorkloadConfig | None:
    """The largest ladder model `system` can train (micro-batch 1, prefetch 1)."""

    def fits(layers: int) -> bool:
        wl = ladder_model(base, layers)
        placement = placement_for(system, wl, node, 1, 1)
        if placement is None:
            return False
        try:
            check_fits(wl, node, placement, 1)
        except InfeasiblePlan:
            return False
        return True

    layers = largest_layers(fits)
    return None if layers is None else ladder_model(base, layers)


def search_angel(
    wl: WorkloadConfig, cluster: ClusterSpec, objective: str, top: int = 5, depths: Sequence[int] = PREFETCH
) -> SearchResult:
    """Run the search; baselines in the shared result shape. `depths`: the prefetch depths every system may
    choose from (a sweep over the deepest prefetch allowed narrows them)."""
    if objective not in ("max-model", "throughput"):
        raise UserError(f"--objective must be max-model or throughput, got {objective!r}")
    node = single_node(cluster)
    started = time.perf_counter()
    results: dict[str, list[tuple[Plan, AngelReport]] | str] = {}
    for system in SYSTEMS:
        target = max_model(system, wl, node) if objective == "max-model" else wl
        if target is None:
            results[system] = "no model of the ladder fits its tiers"
            continue
        rows = best_throughput(system, target, node, depths)
        results[system] = rows or f"{target.name} does not fit: " + _reason(system, target, node)
    angel = results["angel-ptm"]
    if isinstance(angel, str):
        raise InfeasiblePlan(f"angel-ptm: {angel}")
    baselines = [
        Baseline(name=s, reason=r) if isinstance(r, str) else Baseline(name=s, plan=r[0][0], report=r[0][1])
        for s, r in results.items()
        if s != "angel-ptm"
    ]
    cands = [Candidate(plan=p, report=r) for p, r in angel[:top]]
    return SearchResult(
        planner="angel-ptm",
        best=cands[0],
        candidates=cands,
        baselines=baselines,
        search_time_s=time.perf_counter() - started,
        details={"objective": objective, "node": node.device.name, "gpus": node.num_devices},
    )


def _reason(system: str, wl: WorkloadConfig, node: NodeSpec) -> str:
    try:
        evaluate(system, wl, node, 1, 1, 1)
    except InfeasiblePlan as exc:
        return str(exc)
    return "no configuration fits"
