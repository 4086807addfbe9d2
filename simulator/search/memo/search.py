"""MEMO's planner: the swap fraction alpha with tp/cp/sequence parallel and micro-batch, and the baselines.

For each layout (tp, cp, sequence parallel, micro-batch, how data parallelism holds the model states),
alpha comes from three figures (`choose_alpha`):

- PCIe: a layer's swapped bytes, `core + alpha * tokenwise + (1 - alpha) * anchors`
  (`workloads.activations`), must cross the host link within the layer's forward compute, or the copy
  stalls the next layer (`alpha_pcie`);
- host memory: the node's devices share its DRAM, and the schedule keeps every layer's swapped bytes of
  every micro-batch in flight there (`alpha_host`);
- device memory: under MEMO nothing of a layer stays on the device between its forward and backward, so
  device memory does not force alpha up; the plain swapping family (`recompute=none` with offload) is
  searched beside it, where device memory does: its alpha is the least that fits (a larger one saves
  nothing there and only adds copies).

alpha = min(1, alpha_pcie, alpha_host): past alpha_pcie a larger alpha saves recompute but stalls for at
least as long (copying a token costs more than recomputing it whenever PCIe is the limit), so the planner
stops there. Every candidate is evaluated by the analytic model (`simulator.analytic.evaluate`) and the
best MFU that fits device and host memory wins.

Baselines on the same hardware: Megatron-LM style (tensor + sequence + context parallel, distributed
optimizer) with full and with selective recompute, each the best layout of its kind; and DeepSpeed
style (Ulysses sequence parallel + ZeRO-3 + full recompute), approximated as described in `_deepspeed`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from hwmodel.cluster import ClusterSpec
from hwmodel.errors import UserError
from simulator.analytic import evaluate
from simulator.binding import bind
from simulator.cost.compute import DTYPE_BYTES, layer_times, roofline
from simulator.cost.memory import micro_batches_in_flight
from simulator.cost.stage import host_memory_per_device, stage_cost
from simulator.errors import InfeasiblePlan, UnsupportedPlan
from simulator.plan import MemoryPlanSpec, Plan
from simulator.report import Report
from simulator.search.result import Baseline, Candidate, SearchResult
from simulator.stacks import carrying_stack
from workloads.activations import block_activations
from workloads.config import WorkloadConfig
from workloads.ops import ShardShape, kernel_family
from workloads.transformer import layer_profile

if TYPE_CHECKING:  # the memory plan pulls in PuLP: imported where it is used
    from simulator.search.memo.memory_plan import LayerMemoryPlan


@dataclass(frozen=True)
class AlphaChoice:
    alpha: float
    alpha_pcie: float  # the largest alpha whose copies hide behind the layer's forward
    alpha_host: float  # the largest alpha the node's host memory holds (may be < 0: not even alpha = 0)
    reason: str


def _degrees(n: int, limit: int | None = None) -> list[int]:
    return [d for d in (1, 2, 4, 8, 16, 32, 64) if d <= n and n % d == 0 and (limit is None or d <= limit)]


def choose_alpha(plan: Plan, workload: WorkloadConfig, cluster: ClusterSpec) -> AlphaChoice:
    """alpha for a `recompute=tokenwise` layout (its `offload` is ignored), from PCIe, forward time and host
    memory, taking the most constrained stage and device type."""
    bound = bind(plan.model_copy(update={"offload": 0.0, "recompute": "tokenwise"}), workload, cluster)
    cluster = bound.cluster  # the devices as the plan's stack runs them (what the engines read)
    cfg, bp = bound.workload, bound.plan
    alpha_pcie = alpha_host = math.inf
    for stage in bound.stages:
        for rank in {stage.ranks[0], stage.ranks[-1]}:
            node = cluster.node_of(rank)
            device = cluster.topology.devices[rank]
            line = roofline(device, bp.dtype, bp.attention)
            bw = node.host_link.effective_bandwidth
            k = micro_batches_in_flight(
                bp.schedule, stage.index, len(bound.stages), bound.num_micro_batches, bp.virtual_stages
            )
            fixed = per_alpha = 0.0  # host bytes per device at alpha = 0, and per unit of alpha
            for run in stage.runs:
                if run.kind not in ("decoder", "encoder"):
                    continue
                shape = ShardShape(
                    micro_batch=stage.micro_batch_of(rank, run.tp),
                    seq_len=cfg.seq_len,
                    tp=run.tp,
                    sequence_parallel=run.sequence_parallel,
                    cp=stage.cp,
                    ep=bp.ep,
                    dtype_bytes=DTYPE_BYTES[bp.dtype],
                    attention=kernel_family(bp.attention),
                )
                acts = block_activations(cfg, run.kind, shape)
                fwd = layer_times(layer_profile(cfg, run.kind, shape), line).forward
                slope = acts.tokenwise - acts.anchors
                base = acts.core + acts.anchors
                alpha_pcie = min(alpha_pcie, (bw * fwd - base) / slope if slope > 0 else math.inf)
                fixed += k * run.count * base
                per_alpha += k * run.count * slope
            if per_alpha > 0:
                share = node.host.memory / node.num_devices
                alpha_host = min(alpha_host, (share - fixed) / per_alpha)
    alpha = max(0.0, min(1.0, alpha_pcie, alpha_host))
    if alpha_host < 0:
        reason = "host memory cannot hold even the attention statistics and recompute anchors (alpha = 0)"
    elif alpha >= 1.0:
        reason = "PCIe hides every copy and host memory holds every layer: all swapped, nothing recomputed"
    elif alpha_pcie <= alpha_host:
        reason = f"PCIe-bound: larger alpha would stall (alpha_pcie = {alpha_pcie:.3f})"
    else:
        reason = (
            f"host-memory-bound: the node's DRAM holds alpha <= {alpha_host:.3f} "
            f"(PCIe would hide {min(alpha_pcie, 1):.3f})"
        )
    # Round down so the plan stays within both limits when printed.
    return AlphaChoice(math.floor(alpha * 1000) / 1000, alpha_pcie, alpha_host, reason)


def host_memory_used(plan: Plan, workload: WorkloadConfig, cluster: ClusterSpec) -> float:
    """Host bytes per node the plan fills with swapped activations (the most loaded node)."""
    bound = bind(plan, workload, cluster)
    memo: dict = {}
    per_node: dict[int, float] = {}
    for stage in bound.stages:
        for rank in stage.ranks:
            cost = stage_cost(bound, stage, rank, memo)
            node = cluster.location(rank).node
            per_node[node] = per_node.get(node, 0.0) + host_memory_per_device(bound, stage, cost.host_activations)
    return max(per_node.values(), default=0.0)


def _report(plan: Plan, workload: WorkloadConfig, cluster: ClusterSpec) -> tuple[Report | None, str | None]:
    try:
        report = evaluate(plan, workload, cluster)
    except (InfeasiblePlan, UnsupportedPlan) as exc:
        return None, str(exc)
    if not report.fits_memory:
        return None, next((w for w in report.warnings if w.startswith("out of memory")), "out of device memory")
    if plan.offload > 0:
        report = report.model_copy(update={"host_memory_bytes": host_memory_used(plan, workload, cluster)})
    return report, None


def layouts(workload: WorkloadConfig, cluster: ClusterSpec, micro_batches: Iterable[int]) -> list[Plan]:
    """tp (within a node) x cp x micro-batch x data-parallel state sharding, sequence parallel with tp > 1."""
    n = cluster.num_devices
    per_node = min(g.node.num_devices for g in cluster.node_groups)
    plans = []
    for tp in _degrees(n, per_node):
        if workload.num_heads % tp or workload.kv_heads % tp or workload.ffn % tp:
            continue
        for cp in _degrees(n // tp):
            if workload.seq_len % (cp * tp):
                continue
            dp = n // (tp * cp)
            for mb in micro_batches:
                # ZeRO shards over the ranks holding the same weights: dp x cp (simulator.cost.stage).
                for dp_type in ("ddp", "zero1", "zero3") if dp * cp > 1 else ("ddp",):
                    plans.append(Plan(tp=tp, cp=cp, dp=dp, sequence_parallel=tp > 1, micro_batch=mb, dp_type=dp_type))
    return plans


def _least_fitting_offload(plan: Plan, workload: WorkloadConfig, cluster: ClusterSpec, floor: float) -> Plan | None:
    """Plain swapping (recompute=none): the least alpha (>= floor, in 1/20 steps) whose device memory fits."""
    for step in range(math.floor(floor * 20), 21):
        alpha = max(floor, step / 20)
        candidate = plan.model_copy(update={"recompute": "none", "offload": round(alpha, 3)})
        report, _ = _report(candidate, workload, cluster)
        if report is not None:
            return candidate
    return None


def _best(
    plans: Iterable[Plan], workload: WorkloadConfig, cluster: ClusterSpec
) -> tuple[Plan | None, Report | None, str]:
    best: tuple[Plan | None, Report | None] = (None, None)
    last_reason = "no layout divides the cluster"
    for plan in plans:
        report, reason = _report(plan, workload, cluster)
        if report is None:
            last_reason = reason or last_reason
            continue
        if best[1] is None or report.mfu > best[1].mfu:
            best = (plan, report)
    return best[0], best[1], last_reason


def _deepspeed(workload: WorkloadConfig, cluster: ClusterSpec) -> Baseline:
    """DeepSpeed-Ulysses + ZeRO-3 + full recompute.

    Ulysses splits the sequence over all N devices and turns it into a head split for attention with
    all-to-alls; its ZeRO-3 shards the model states over those same N devices. Approximated as context
    parallel over the N devices (ring k/v passes instead of the all-to-alls; at these lengths both hide
    behind attention) with ZeRO-3, which shards over the dp x cp = N ranks holding the same weights.
    """
    n = cluster.num_devices
    name = "deepspeed-ulysses-zero3-full"
    if workload.num_heads % n:
        return Baseline(name=name, reason=f"Ulysses needs num_heads={workload.num_heads} divisible by {n} devices")
    plan = Plan(tp=1, cp=n, dp=1, recompute="full", dp_type="zero3")
    reason = "approximation: Ulysses as context parallel over all devices (ring k/v passes instead of all-to-alls)"
    try:
        report = evaluate(plan, workload, cluster)
    except (InfeasiblePlan, UnsupportedPlan) as exc:
        return Baseline(name=name, plan=plan, reason=str(exc))
    if not report.fits_memory:
        return Baseline(
            name=name,
            plan=plan,
            reason=f"out of memory: {report.peak_memory_bytes / 2**30:.1f} GiB > "
            f"{report.memory_capacity_bytes / 2**30:.1f} GiB ({reason})",
        )
    return Baseline(name=name, plan=plan, report=report, reason=reason)


def megatron_baselines(
    workload: WorkloadConfig, cluster: ClusterSpec, micro_batches: Iterable[int] = (1,)
) -> list[Baseline]:
    """Megatron-LM style: tp + sequence parallel + context parallel, distributed optimizer (ZeRO-1)."""
    out = []
    base = [
        p.model_copy(update={"dp_type": "zero1" if (p.dp or 1) * p.cp > 1 else "ddp"})
        for p in layouts(workload, cluster, micro_batches)
        if p.dp_type == "ddp"
    ]
    for recompute in ("full", "selective"):
        plans = [p.model_copy(update={"recompute": recompute}) for p in base]
        plan, report, reason = _best(plans, workload, cluster)
        name = f"megatron-tp-sp-cp-{recompute}"
        if report is None:
            out.append(Baseline(name=name, reason=f"no layout fits: {reason}"))
        else:
            out.append(Baseline(name=name, plan=plan, report=report, reason="best tp/cp/micro-batch of its kind"))
    return out


def layer_memory_plan(plan: Plan, workload: WorkloadConfig, time_limit_s: float = 10.0) -> LayerMemoryPlan | None:
    """Level one of MEMO's MIP for the chosen layout: offsets of one block's forward and backward tensors on
    one device. Under MEMO a block's saved tensors leave the device after its forward, so every block reuses
    this one frame (level two degenerates to the same address range for all layers). None when the layout
    is outside what the tensor builder covers."""
    from simulator.search.memo.memory_plan import MemoryPlanError, plan_layer, transformer_layer_tensors

    tokens_per_rank = workload.seq_len // plan.cp
    try:
        intra, cross = transformer_layer_tensors(workload, plan.micro_batch, tokens_per_rank, plan.tp, "none")
    except MemoryPlanError:
        return None
    return plan_layer(list(intra) + list(cross), time_limit_s=time_limit_s)


class _Scored(NamedTuple):
    """One evaluated plan with why it was built."""

    mfu: float
    plan: Plan
    report: Report
    why: str


def _score_layouts(workload: WorkloadConfig, cluster: ClusterSpec, micro_batches: tuple[int, ...]) -> list[_Scored]:
    """Every layout's MEMO plan and plain-swapping plan that fit, best MFU first.

    Raises:
        InfeasiblePlan: no plan fits, with the last reason one did not.
    """
    scored: list[_Scored] = []
    reasons: list[str] = []
    for layout in layouts(workload, cluster, micro_batches):
        try:
            choice = choose_alpha(layout, workload, cluster)
        except (InfeasiblePlan, UnsupportedPlan) as exc:
            reasons.append(str(exc))
            continue
        plans = []
        if choice.alpha_host < 0:
            reasons.append(f"{layout.shorthand()}: {choice.reason}")
        else:
            plans.append((layout.model_copy(update={"recompute": "tokenwise", "offload": choice.alpha}), choice.reason))
        # Plain swapping saves no recompute, so any alpha beyond what device memory needs only adds copies.
        swap = _least_fitting_offload(layout, workload, cluster, 0.0)
        if swap is not None:
            plans.append((swap, "plain swapping (recompute=none): the least alpha that fits device memory"))
        for plan, why in plans:
            report, reason = _report(plan, workload, cluster)
            if report is None:
                reasons.append(reason or "")
                continue
            scored.append(_Scored(report.mfu, plan, report, why))
    if not scored:
        raise InfeasiblePlan(
            f"no MEMO plan fits {workload.name} at seq_len={workload.seq_len} on {cluster.name}: "
            + (reasons[-1] if reasons else "no layout divides the cluster")
        )
    scored.sort(key=lambda s: -s.mfu)
    return scored


def _details(
    best: _Scored, layer_plan: LayerMemoryPlan | None, workload: WorkloadConfig, cluster: ClusterSpec
) -> dict[str, Any]:
    """The result's details: alpha and why, and the memory plan's figures when one was solved."""
    details: dict[str, Any] = {
        "alpha": best.plan.offload,
        "why": best.why,
        "recompute": best.plan.recompute,
        "host_memory_bytes": best.report.host_memory_bytes,
    }
    if best.plan.recompute == "tokenwise":
        choice = choose_alpha(best.plan, workload, cluster)
        details.update(alpha_pcie=choice.alpha_pcie, alpha_host=choice.alpha_host)
    if layer_plan is not None:
        details.update(
            memory_plan_peak_bytes=layer_plan.peak_bytes,
            memory_plan_greedy_peak_bytes=layer_plan.greedy_peak_bytes,
            memory_plan_status=layer_plan.solver_status,
            memory_plan_solve_time_s=layer_plan.solve_time_s,
            memory_plan_lower_bound_bytes=layer_plan.lower_bound_bytes,
            fragmentation_avoided_bytes=layer_plan.fragmentation_avoided_bytes,
            memory_plan_offsets=layer_plan.offsets,
        )
    return details


def search_memo(
    workload: WorkloadConfig,
    cluster: ClusterSpec,
    micro_batches: Iterable[int] = (1, 2),
    top: int = 5,
    baselines: bool = True,
    memory_plan_time_s: float | None = None,
) -> SearchResult:
    """The best MEMO plan for `workload` (at its seq_len) on `cluster`, the runners-up and the baselines.

    `memory_plan_time_s`: solve MEMO's memory plan for the chosen plan
    with this CBC time limit and attach it (`Plan.memory_plan`, `details`); None skips it."""
    cluster = carrying_stack(cluster)  # the planner's own costs read the devices the engines see
    start = time.perf_counter()
    micro_batches = tuple(micro_batches)
    if not micro_batches or min(micro_batches) < 1:
        raise UserError(f"--micro-batch values must be positive integers, got {list(micro_batches)}")
    scored = _score_layouts(workload, cluster, micro_batches)
    candidates = [Candidate(plan=s.plan, report=s.report) for s in scored[:top]]
    out_baselines = (
        (megatron_baselines(workload, cluster, micro_batches) + [_deepspeed(workload, cluster)]) if baselines else []
    )
    best = scored[0]
    layer_plan = None
    if memory_plan_time_s is not None and best.plan.recompute == "tokenwise":
        layer_plan = layer_memory_plan(best.plan, workload, memory_plan_time_s)
        if layer_plan is not None:
            spec = MemoryPlanSpec(peak_bytes=layer_plan.peak_bytes, greedy_peak_bytes=layer_plan.greedy_peak_bytes)
            planned = best.plan.model_copy(update={"memory_plan": spec})
            best = best._replace(plan=planned, report=best.report.model_copy(update={"plan": planned}))
            candidates[0] = Candidate(plan=planned, report=best.report)
    return SearchResult(
        planner="memo",
        best=candidates[0],
        candidates=candidates,
        baselines=out_baselines,
        search_time_s=time.perf_counter() - start,
        details=_details(best, layer_plan, workload, cluster),
    )


def best_megatron_mfu(result: SearchResult) -> float | None:
    """MFU of the best Megatron-style baseline of a result (None when none fits)."""
    mfus = [b.report.mfu for b in result.baselines if b.name.startswith("megatron") and isinstance(b.report, Report)]
    return max(mfus) if mfus else None
