"""`simulate search galvatron`: the fastest per-layer hybrid-parallel plan within a memory budget, beside the
plans a user would pick by hand."""

from __future__ import annotations

import re
from pathlib import Path

import typer
import yaml
from rich.progress import BarColumn, TextColumn, TimeElapsedColumn

from hwmodel.catalog import load_cluster
from hwmodel.cli_common import YAML, check_output, make_console, progress_bar, write_output
from hwmodel.errors import UserError
from hwmodel.units import DIMENSIONS, format_bytes, parse_quantity
from simulator.report import Report
from simulator.search.galvatron.search import search_galvatron
from simulator.search.render import render_search
from simulator.stacks import STACK_HELP, cluster_with_stack
from workloads.catalog import load_workload


def parse_budget(text: str) -> float:
    """A per-device memory budget such as "16GiB" or "16 GiB"; a bare number is refused (GiB or GB?)."""
    table, _ = DIMENSIONS["bytes"]
    units = ", ".join(sorted(table, key=lambda u: (table[u], u)))
    if re.fullmatch(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*", text or ""):
        raise UserError(f"--memory-budget {text!r} has no unit; write it like '16GiB' or '16 GiB' (units: {units})")
    value = parse_quantity(text, "bytes", allow_bare_number=False)
    if value <= 0:
        raise UserError(f"--memory-budget must be positive, got {text!r}")
    return value


def plan_yaml(plan) -> str:
    """The plan as YAML that `execute --plan` and `simulate run --plan` read."""
    return yaml.safe_dump(plan.model_dump(mode="json", exclude_defaults=True), sort_keys=False)


def galvatron_command(
    workload: str = typer.Option(
        ..., "--workload", "-w", help="Workload name or file (see `simulate workloads list`)."
    ),
    cluster: str = typer.Option(..., "--cluster", "-c", help="Cluster name or YAML file (see `simulate specs list`)."),
    stack: str | None = typer.Option(None, "--stack", help=STACK_HELP),
    memory_budget: str = typer.Option(..., "--memory-budget", "-m", help="Per-device memory budget, e.g. 16GiB."),
    nodes: int | None = typer.Option(None, "--nodes", "-n", help="Node count for a cluster of identical nodes."),
    devices_per_node: int | None = typer.Option(None, "--devices-per-node", help="Devices in every node."),
    global_batch: int | None = typer.Option(
        None, "--global-batch", help="Sequences per iteration (default: searched up to 8 per device)."
    ),
    max_global_batch: int | None = typer.Option(
        None, "--max-global-batch", help="Search the global batch too, up to this many sequences."
    ),
    top: int = typer.Option(3, "--top", help="How many plans to list (the chosen one and runners-up)."),
    out_file: Path | None = typer.Option(
        None, "--out", help="Write the chosen plan as YAML (*.yaml) for `execute --plan`."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the shared search result shape as JSON."),
    engine_rerank: bool = typer.Option(
        True, "--engine-rerank/--no-engine-rerank", help="Re-rank the top plans with the discrete-event engine."
    ),
    force: bool = typer.Option(False, "--force", help="Allow --out to replace an existing file."),
) -> None:
    """Galvatron-BMW: choose tp (with or without sequence parallel), ZeRO stage and recompute per layer, the
    pipeline stages (uneven, of different GPU types on mixed clusters) and the micro-batching, for the
    highest predicted throughput within the per-device memory budget."""

    budget = parse_budget(memory_budget)
    if top < 1:
        raise UserError(f"--top must be at least 1, got {top}")
    if out_file is not None:
        check_output(out_file, "--out", YAML, force)
    wl = load_workload(workload)
    cl = load_cluster(cluster, nodes, devices_per_node)
    cl = cluster_with_stack(cl, stack)
    err = make_console(stderr=True)
    with progress_bar(
        err,
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    ) as progress:
        task = progress.add_task("searching", total=None)

        def report(done: int, total: int, what: str) -> None:
            progress.update(task, completed=done, total=total, description=f"searching {what}")

        result = search_galvatron(wl, cl, budget, global_batch, max_global_batch, top, engine_rerank, report)
    if out_file is not None:
        write_output(out_file, plan_yaml(result.best.plan), "--out", YAML, force, err)
    if as_json:
        print(result.to_json())
        return
    console = make_console()
    d = result.details
    render_search(
        result,
        console,
        f"Galvatron-BMW on {cl.name} ({cl.num_devices} devices): {wl.name}, "
        f"budget {format_bytes(budget)} per device, {d['engine']} engine",
    )
    best = result.best.report
    assert isinstance(best, Report)  # the Galvatron planner reports training Reports
    feasible = [b.report for b in result.baselines if isinstance(b.report, Report)]
    if feasible:
        top_baseline = max(feasible, key=lambda r: r.samples_per_s)
        console.print(f"chosen plan: {best.samples_per_s / top_baseline.samples_per_s:.2f}x the best baseline")
    console.print(
        f"{d['configurations']} configurations ({d['configurations_pruned_by_bound']} pruned by bound), "
        f"{d['plans_evaluated']} plans evaluated, {d['stage_programs']} stage programs"
    )
    plan = result.best.plan
    if plan.stages:
        console.print("stages: " + "; ".join(f"{s.num_layers} layers on {s.devices} (tp {s.tp})" for s in plan.stages))
    if plan.layers:
        console.print(
            "layers: "
            + "; ".join(
                f"{s.layers[0]}-{s.layers[1]}: tp{s.tp or plan.tp}{'+sp' if s.sequence_parallel else ''} "
                f"{s.dp_type or plan.dp_type} recompute {s.recompute or plan.recompute}"
                for s in plan.layers
            )
        )
    if out_file is not None:
        console.print(f"run the chosen plan with `execute --plan {out_file}` or `simulate run --plan {out_file}`")
