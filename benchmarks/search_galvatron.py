"""Galvatron-BMW search: chosen plan vs the baselines, heterogeneous stages, and search speed.

(a) bert-huge-32, t5-large-32 and vit-huge-32 on titan-rtx-8 at 8/12/16/20 GiB, and llama2-7b on 8/16/32
    GPUs of dgx-a100-40g: predicted samples/s of the chosen plan and of every baseline (same budget, same
    engine), and the speedup over the best baseline.
(b) llama2-7b on mixed-a100-v100: the plan found knowing the cluster is mixed, against the best plan found
    when the search is told the cluster is uniform (all A100 nodes, or all V100 nodes), both predicted on
    the real mixed cluster.
(c) search speed on one core: a 32-layer model on 64 GPUs at 16 GiB, an 80-layer model on 1,024 GPUs.

    .venv/bin/python benchmarks/search_galvatron.py              # all three (minutes on a quiet machine)
    .venv/bin/python benchmarks/search_galvatron.py --part speed --repeats 3
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core, as the speed target says
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import statistics
import time

import typer
from rich.console import Console
from rich.table import Table

from hwmodel.catalog import load_cluster
from simulator.analytic import evaluate
from simulator.des import evaluate_des
from simulator.search.galvatron.search import search_galvatron, uniform_view
from workloads.catalog import load_workload

GiB = 2**30
console = Console(width=200)
app = typer.Typer(add_completion=False)

BASELINES = (
    "pure DP",
    "ZeRO-3 DP",
    "pure TP",
    "pure PP",
    "Megatron 3D",
    "Megatron 3D + recompute",
    "DeepSpeed ZeRO-3 + recompute",
)
SHORT = {
    "pure DP": "DP",
    "ZeRO-3 DP": "ZeRO-3",
    "pure TP": "TP",
    "pure PP": "PP",
    "Megatron 3D": "Megatron",
    "Megatron 3D + recompute": "Megatron+rc",
    "DeepSpeed ZeRO-3 + recompute": "DS Z3+rc",
}


def table_cases() -> list[tuple[str, str, int | None, float, int]]:
    """(workload, cluster, nodes, budget GiB, global batch)."""
    cases = []
    for workload in ("bert-huge-32", "t5-large-32", "vit-huge-32"):
        for budget in (8, 12, 16, 20):
            cases.append((workload, "titan-rtx-8", None, budget, 64))
    for nodes in (1, 2, 4):
        cases.append(("llama2-7b", "dgx-a100-40g", nodes, 40, 32 * nodes))
    return cases


def part_table(engine_rerank: bool) -> None:
    table = Table(
        title="(a) chosen plan vs baselines: predicted samples/s at the same budget "
        f"({'event engine re-rank' if engine_rerank else 'analytic'})",
        title_justify="left",
    )
    for col in (
        "workload",
        "GPUs",
        "budget",
        "batch",
        "chosen",
        *(SHORT[b] for b in BASELINES),
        "vs best",
        "search alone",
        "search",
        "chosen plan",
    ):
        table.add_column(col, justify="left" if col in ("workload", "chosen plan") else "right", overflow="fold")
    worst = None
    for workload, cluster_name, nodes, budget, batch in table_cases():
        wl, cl = load_workload(workload), load_cluster(cluster_name, nodes)
        started = time.perf_counter()
        result = search_galvatron(wl, cl, budget * GiB, global_batch=batch, rerank_with_des=engine_rerank)
        elapsed = time.perf_counter() - started
        best = result.best.report.samples_per_s
        by_name = {b.name: b for b in result.baselines}
        cells, feasible = [], []
        for name in BASELINES:
            b = by_name[name]
            if b.report is None:
                cells.append("OOM" if b.reason and b.reason.startswith("out of memory") else "n/a")
            else:
                cells.append(f"{b.report.samples_per_s:.2f}")
                feasible.append(b.report.samples_per_s)
        speedup = best / max(feasible) if feasible else float("inf")
        worst = speedup if worst is None else min(worst, speedup)
        plan = result.best.plan
        shape = plan.shorthand()
        if plan.stages:
            shape += " stages " + "/".join(str(s.num_layers) for s in plan.stages)
        if plan.layers:
            shape += (" layers " if any(s.tp is not None for s in plan.layers) else "") + "; ".join(
                f"{s.layers[0]}-{s.layers[1]} tp{s.tp}{'+sp' if s.sequence_parallel else ''} {s.dp_type} {s.recompute}"
                for s in plan.layers
                if s.tp is not None
            ) or " layers (all blocks listed: costed per kind)"
        # The search's own best plan against the best baseline, both analytic (before the baselines' plans
        # join the pool): does the search find it without them?
        d = result.details
        alone = (
            d["search_best_samples_per_s"] / d["baseline_best_samples_per_s"]
            if d["baseline_best_samples_per_s"]
            else float("inf")
        )
        table.add_row(
            workload,
            str(cl.num_devices),
            f"{budget} GiB",
            str(batch),
            f"{best:.2f}",
            *cells,
            f"{speedup:.2f}x",
            f"{alone:.2f}x",
            f"{elapsed:.1f} s",
            shape,
        )
    console.print(table)
    console.print(
        f"smallest speedup over the best feasible baseline: {worst:.3f}x (>= 1 required); 'search alone': "
        "the search's own best plan over the best baseline, analytic, before baseline plans join the pool"
    )


def part_hetero(budget_gib: float = 32, batch: int = 128) -> None:
    wl, cl = load_workload("llama2-7b"), load_cluster("mixed-a100-v100")
    aware = search_galvatron(wl, cl, budget_gib * GiB, global_batch=batch, rerank_with_des=False)
    dtype = aware.details["dtype"]
    table = Table(
        title=f"(b) llama2-7b on mixed-a100-v100 (16 A100 40GB + 16 V100 32GB), budget {budget_gib:g} GiB, "
        f"global batch {batch}, {dtype}: predicted on the real mixed cluster",
        title_justify="left",
    )
    for col in ("search told", "samples/s (analytic)", "samples/s (event engine)", "mixed-aware is", "stages", "plan"):
        table.add_column(col, justify="left" if col in ("search told", "stages", "plan") else "right", overflow="fold")

    def types(first: int, last: int) -> str:
        return "+".join(dict.fromkeys(cl.device(r).name for r in range(first, last + 1)))

    def stages_of(plan) -> str:
        if not plan.stages:
            per = cl.num_devices // plan.pp
            return ", ".join(
                f"{wl.num_layers // plan.pp} layers on {i * per}-{(i + 1) * per - 1} "
                f"({types(i * per, (i + 1) * per - 1)})"
                for i in range(plan.pp)
            )
        out = []
        for s in plan.stages:
            first, last = (int(x) for x in str(s.devices).split("-"))
            out.append(f"{s.num_layers} layers on {s.devices} ({types(first, last)})")
        return ", ".join(out)

    aware_a = evaluate(aware.best.plan, wl, cl).samples_per_s
    aware_d = evaluate_des(aware.best.plan, wl, cl).samples_per_s
    table.add_row(
        "mixed (the real cluster)",
        f"{aware_a:.2f}",
        f"{aware_d:.2f}",
        "1.00x",
        stages_of(aware.best.plan),
        aware.best.plan.shorthand(),
    )
    for group in (0, 1):
        view = uniform_view(cl, group)
        naive = search_galvatron(wl, view, budget_gib * GiB, global_batch=batch, rerank_with_des=False, dtype=dtype)
        real = evaluate(naive.best.plan, wl, cl)
        real_d = evaluate_des(naive.best.plan, wl, cl)
        note = (
            ""
            if real.fits_memory and real.peak_memory_bytes <= budget_gib * GiB
            else " (over budget on the real cluster)"
        )
        table.add_row(
            f"uniform: all {cl.node_groups[group].name}",
            f"{real.samples_per_s:.2f}",
            f"{real_d.samples_per_s:.2f}",
            f"{aware_a / real.samples_per_s:.2f}x{note}",
            stages_of(naive.best.plan),
            naive.best.plan.shorthand(),
        )
    console.print(table)


def part_speed(repeats: int) -> None:
    table = Table(
        title="(c) search speed (one process, OMP_NUM_THREADS=1; analytic ranking, no event-engine re-rank)",
        title_justify="left",
    )
    for col in (
        "case",
        "GPUs",
        "configurations",
        "pruned by bound",
        "plans evaluated",
        "CPU time (median)",
        "wall time (median)",
        "target",
    ):
        table.add_column(col, justify="left" if col == "case" else "right")
    cases = [
        ("llama2-7b (32 layers), dgx-a100-40g, 16 GiB, batch 512", "llama2-7b", "dgx-a100-40g", 8, 512, 10),
        ("llama2-70b (80 layers), dgx-a100-80g, 16 GiB, batch 2048", "llama2-70b", "dgx-a100-80g", 128, 2048, 60),
    ]
    for label, workload, cluster_name, nodes, batch, target in cases:
        wl, cl = load_workload(workload), load_cluster(cluster_name, nodes)
        cpu, wall, details = [], [], {}
        for _ in range(repeats):
            c0, w0 = time.process_time(), time.perf_counter()
            result = search_galvatron(wl, cl, 16 * GiB, global_batch=batch, rerank_with_des=False)
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
            details = result.details
        table.add_row(
            label,
            str(cl.num_devices),
            str(details["configurations"]),
            str(details["configurations_pruned_by_bound"]),
            str(details["plans_evaluated"]),
            f"{statistics.median(cpu):.2f} s",
            f"{statistics.median(wall):.2f} s",
            f"<= {target} s",
        )
    console.print(table)


@app.command()
def main(
    part: str = typer.Option("all", help="table, hetero, speed or all"),
    repeats: int = typer.Option(1, help="Speed runs per case (the median is reported)."),
    engine_rerank: bool = typer.Option(
        True,
        "--engine-rerank/--no-engine-rerank",
        help="(a): re-rank the top plans and the baselines with the event engine.",
    ),
) -> None:
    """Print the Galvatron-BMW benchmark tables."""
    if part not in ("table", "hetero", "speed", "all"):
        raise typer.BadParameter("--part must be table, hetero, speed or all")
    if part in ("table", "all"):
        part_table(engine_rerank)
    if part in ("hetero", "all"):
        part_hetero()
    if part in ("speed", "all"):
        part_speed(repeats)


if __name__ == "__main__":
    app()
