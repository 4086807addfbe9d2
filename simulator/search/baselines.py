"""The plans a user would otherwise pick by hand, each at its best under the same memory budget.

pure DP (DDP), ZeRO-3 DP (FSDP), pure TP (every device in one tensor-parallel group), pure PP (one
device per stage, best micro-batch count), Megatron-style uniform 3D (best tp x pp x dp, sequence
parallel with tp, without and with recompute) and DeepSpeed-style ZeRO-3 with full recompute. Each
family is tried over its free knobs (micro-batch size, degrees, global batch when that is searched)
with the analytic model; the fastest configuration that fits the budget represents it. A family with
no fitting configuration is reported as out of memory with the least memory any of its configurations
needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hwmodel.cluster import ClusterSpec
from hwmodel.units import format_bytes
from simulator.analytic import evaluate_bound
from simulator.binding import bind
from simulator.errors import InfeasiblePlan, UnsupportedPlan
from simulator.plan import LayerStrategy, Plan
from simulator.report import Report
from simulator.search.galvatron.space import powers_of_two, sp_allowed, tp_allowed
from workloads.config import WorkloadConfig


@dataclass
class BaselineOutcome:
    name: str
    plan: Plan | None
    report: Report | None
    reason: str | None
    evaluated: list[tuple[Plan, Report]] = field(default_factory=list)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _family(workload: WorkloadConfig, cluster: ClusterSpec, batches: list[int], dtype: str) -> dict[str, list[dict]]:
    """Plan fields to try for each baseline family."""
    n = cluster.num_devices
    L = workload.num_layers
    node = min(g.node.num_devices for g in cluster.node_groups)
    fam: dict[str, list[dict]] = {
        name: []
        for name in (
            "pure DP",
            "ZeRO-3 DP",
            "pure TP",
            "pure PP",
            "Megatron 3D",
            "Megatron 3D + recompute",
            "DeepSpeed ZeRO-3 + recompute",
        )
    }
    for g in batches:
        common = dict(global_batch=g, dtype=dtype)
        if g % n == 0:
            for mb in _divisors(g // n):
                fam["pure DP"].append(dict(common, micro_batch=mb))
                fam["ZeRO-3 DP"].append(dict(common, micro_batch=mb, dp_type="zero3"))
                fam["DeepSpeed ZeRO-3 + recompute"].append(
                    dict(common, micro_batch=mb, dp_type="zero3", recompute="full")
                )
        if tp_allowed(workload, n):
            for mb in _divisors(g):
                fam["pure TP"].append(
                    dict(common, tp=n, dp=1, micro_batch=mb, sequence_parallel=sp_allowed(workload, n))
                )
        if n <= L:
            for mb in _divisors(g):
                fam["pure PP"].append(dict(common, pp=n, dp=1, micro_batch=mb))
        for tp in powers_of_two(node):
            if not tp_allowed(workload, tp):
                continue
            for pp in powers_of_two(min(L, n // tp)):
                if n % (tp * pp):
                    continue
                dp = n // (tp * pp)
                if g % dp:
                    continue
                for mb in _divisors(g // dp):
                    fields = dict(
                        common, tp=tp, pp=pp, dp=dp, micro_batch=mb, sequence_parallel=sp_allowed(workload, tp)
                    )
                    fam["Megatron 3D"].append(fields)
                    for mode in ("selective", "full"):
                        fam["Megatron 3D + recompute"].append(dict(fields, recompute=mode))
    return fam


def _why_not(name: str, workload: WorkloadConfig, cluster: ClusterSpec, batches: list[int]) -> str:
    n = cluster.num_devices
    if name == "pure TP":
        bad = [
            f"{field}={value}"
            for field, value in (
                ("num_heads", workload.num_heads),
                ("num_kv_heads", workload.kv_heads),
                ("ffn_hidden_size", workload.ffn),
            )
            if value % n
        ]
        return f"tp={n} does not divide {', '.join(bad)}"
    if name == "pure PP":
        return f"pp={n} is more stages than the model's {workload.num_layers} layers"
    return f"the global batch ({', '.join(map(str, batches))}) does not split over {n} data-parallel replicas"


def evaluate_baselines(
    workload: WorkloadConfig,
    cluster: ClusterSpec,
    budget: float,
    batches: list[int],
    dtype: str,
    mixed_kinds: bool = False,
) -> list[BaselineOutcome]:
    """Each baseline family at its fastest configuration within `budget` (analytic model).

    `mixed_kinds`: the model's blocks differ in kind (t5); the plans then list all blocks in one `layers`
    entry with no overrides, so that binding costs each kind as itself (without it a stage's blocks are
    costed as one run of the first block's kind).
    """
    outcomes = []
    for name, options in _family(workload, cluster, batches, dtype).items():
        best: tuple[Plan, Report] | None = None
        least: float | None = None
        evaluated = []
        for fields in options:
            if mixed_kinds:
                fields = dict(fields, layers=(LayerStrategy(layers=(0, workload.num_layers - 1)),))
            try:
                plan = Plan(**fields)
                report = evaluate_bound(bind(plan, workload, cluster))
            except (InfeasiblePlan, UnsupportedPlan):
                continue
            evaluated.append((plan, report))
            least = report.peak_memory_bytes if least is None else min(least, report.peak_memory_bytes)
            fits = report.fits_memory and report.peak_memory_bytes <= budget
            if fits and (best is None or report.samples_per_s > best[1].samples_per_s):
                best = (plan, report)
        if best is not None:
            outcomes.append(BaselineOutcome(name, best[0], best[1], None, evaluated))
        elif least is not None:
            # Show the configuration that came closest, so the user sees what it would need.
            closest = min(evaluated, key=lambda pr: pr[1].peak_memory_bytes)[0]
            reason = f"out of memory: needs {format_bytes(least)} > budget {format_bytes(budget)}"
            outcomes.append(BaselineOutcome(name, closest, None, reason, evaluated))
        else:
            outcomes.append(BaselineOutcome(name, None, None, _why_not(name, workload, cluster, batches), evaluated))
    return outcomes
