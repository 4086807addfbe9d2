"""`simulate search angel-ptm`: the largest model a node trains with paged model states (max-model), or the
fastest placement for a model (throughput), beside ZeRO-3, ZeRO-Offload, ZeRO-Infinity and PatrickStar."""

from __future__ import annotations

import json
from pathlib import Path

import typer
import yaml
from rich.table import Table

from hwmodel.catalog import load_cluster
from hwmodel.cli_common import YAML, check_output, make_console, write_output
from hwmodel.errors import UserError
from hwmodel.units import format_bytes
from simulator.search.angel_ptm.search import AngelReport, search_angel
from simulator.search.angel_ptm.sweep import SWEEP_HELP, SweepPoint, binding, parse_sweep, run_sweep
from simulator.search.result import SearchResult
from workloads.catalog import load_workload


def _row(table: Table, name: str, report: AngelReport | None, reason: str | None) -> None:
    if report is None:
        table.add_row(name, "-", "-", "-", "-", "-", reason or "")
        return
    where = (
        f"GPU {format_bytes(report.gpu_state_bytes)} / host {format_bytes(report.host_state_bytes)} / "
        f"SSD {format_bytes(report.ssd_state_bytes)}"
    )
    table.add_row(
        name,
        report.model,
        f"{report.params / 1e9:.1f}B",
        f"{report.samples_per_s:.3g}",
        f"{report.step_s:.3g} s",
        f"{report.bound_s:.3g} s",
        where,
    )


def render(result: SearchResult, title: str) -> None:
    table = Table(title=title, title_justify="left")
    for col in ("system", "model", "params", "samples/s", "step", "bound", "states (or why not)"):
        table.add_column(col)
    best = result.best.report
    assert isinstance(best, AngelReport)
    _row(table, "angel-ptm", best, None)
    for b in result.baselines:
        _row(table, b.name, b.report if isinstance(b.report, AngelReport) else None, b.reason)
    make_console().print(table)


def render_sweep(points: list[SweepPoint], objective: str, title: str) -> None:
    table = Table(title=title, title_justify="left")
    first = "model" if objective == "max-model" else "samples/s"
    for col in (
        points[0].key,
        first,
        "samples/s" if first == "model" else "params",
        "step",
        "bound",
        "binds",
        "states",
    ):
        table.add_column(col)
    for p in points:
        if p.result is None:
            table.add_row(p.value, "-", "-", "-", "-", "-", p.reason or "")
            continue
        r = p.result.best.report
        assert isinstance(r, AngelReport)
        model = f"{r.model} ({r.params / 1e9:.1f}B)"
        a, b = (model, f"{r.samples_per_s:.3g}") if first == "model" else (f"{r.samples_per_s:.3g}", model)
        where = f"GPU {format_bytes(r.gpu_state_bytes)} / host {format_bytes(r.host_state_bytes)} / "
        where += f"SSD {format_bytes(r.ssd_state_bytes)}"
        table.add_row(p.value, a, b, f"{r.step_s:.3g} s", f"{r.bound_s:.3g} s", binding(r), where)
    make_console().print(table)


def angel_command(
    workload: str = typer.Option(..., "--workload", "-w", help="Workload name or file; max-model scales its family."),
    cluster: str = typer.Option(..., "--cluster", "-c", help="Cluster name or YAML file (one node)."),
    objective: str = typer.Option("max-model", "--objective", help="max-model | throughput."),
    top: int = typer.Option(5, "--top", help="Runners-up to keep."),
    as_json: bool = typer.Option(False, "--json", help="Print the shared search result shape as JSON."),
    out_file: Path | None = typer.Option(None, "--out", help="Write the chosen plan (*.yaml)."),
    force: bool = typer.Option(False, "--force", help="Allow --out to replace an existing file."),
    sweep: str | None = typer.Option(
        None, "--sweep", help=f"KEY=V1,V2,...: rerun the search per value and print one table. Keys: {SWEEP_HELP}."
    ),
) -> None:
    """Angel-PTM: model states in pages over GPU, host memory and SSD, prefetched by the known access order,
    with the CPU update of step t overlapping step t+1 (staleness 1)."""
    if objective not in ("max-model", "throughput"):
        raise UserError(f"--objective: expected max-model or throughput, got {objective!r}")
    if top < 1:
        raise UserError(f"--top must be at least 1, got {top}")
    if sweep is not None and out_file is not None:
        raise UserError("--out writes one plan; it cannot be used with --sweep (drop one of them)")
    if out_file is not None:
        check_output(out_file, "--out", YAML, force)
    swept = parse_sweep(sweep) if sweep is not None else None
    cl = load_cluster(cluster)
    wl = load_workload(workload)
    if swept is not None:
        points = run_sweep(wl, cl, objective, top, *swept)
        if as_json:
            print(json.dumps([p.to_dict() for p in points], indent=2))
            return
        render_sweep(points, objective, f"Angel-PTM on {cl.name} ({objective}): {wl.name}, sweeping {swept[0]}")
        return
    result = search_angel(wl, cl, objective, top)
    if out_file is not None:
        data = {"plan": result.best.plan.model_dump(mode="json", exclude_defaults=True)}
        write_output(out_file, yaml.safe_dump(data, sort_keys=False), "--out", YAML, force)
    if as_json:
        print(result.to_json())
        return
    render(result, f"Angel-PTM on {cl.name} ({objective}): {wl.name}")
