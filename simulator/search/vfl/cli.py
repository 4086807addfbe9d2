"""`simulate search vfl`: CELU-VFL's W and R for a workload and a WAN, with vanilla VFL and FedBCD beside them;
`--sweep-bandwidth/--sweep-latency` repeat the search over other links. Also the VFL side of `simulate run`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import typer
import yaml
from rich.console import Console
from rich.table import Table

from hwmodel.catalog import load_cluster
from hwmodel.cli_common import CSV, JSON, YAML, check_output, make_console, write_output
from hwmodel.cluster import ClusterSpec
from hwmodel.errors import UnknownNameError, UserError
from hwmodel.units import format_bandwidth, format_bytes, format_seconds, parse_quantity
from simulator.plan import Plan
from simulator.search.result import SearchResult
from simulator.search.vfl.costs import default_sites
from simulator.search.vfl.efficiency import load_efficiency
from simulator.search.vfl.report import VflReport
from simulator.search.vfl.search import UPDATES_GRID, WORKSET_GRID, evaluate, plan_mode, search_vfl, with_wan
from simulator.stacks import STACK_HELP, cluster_with_stack
from workloads import vfl as wl

MODE_NAMES = {"vanilla": "vanilla VFL", "fedbcd": "FedBCD", "celu": "CELU-VFL"}


def _console(stderr: bool = False) -> Console:
    return make_console(stderr=stderr)


def load_vfl(name: str) -> wl.VflWorkloadConfig:
    """A VFL workload; a transformer workload's name gets a message saying what this command takes."""
    try:
        return wl.load_vfl_workload(name)
    except UnknownNameError:
        from workloads.catalog import workload_names

        if name in workload_names():
            raise UserError(
                f"{name!r} is a transformer workload; VFL planning takes a two-party VFL workload: "
                f"{', '.join(wl.vfl_workload_names())} (or a YAML file with family: vfl-wdl)"
            ) from None
        raise


def _parse_sites(parties: str | None, cluster: ClusterSpec) -> tuple[str, str]:
    if parties is None:
        return default_sites(cluster)
    sites = tuple(s.strip() for s in parties.split(",") if s.strip())
    if len(sites) != 2:
        raise UserError(f"--parties takes two sites, the active party's first (e.g. 'dc-a,dc-b'); got {parties!r}")
    return sites[0], sites[1]


def _parse_grid(text: str | None, name: str, default: tuple[int, ...]) -> tuple[int, ...]:
    if text is None:
        return default
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"{name} takes comma-separated positive integers such as '1,2,4,8'; got {text!r}") from None
    if not values or min(values) < 1:
        raise UserError(f"{name} takes comma-separated positive integers such as '1,2,4,8'; got {text!r}")
    return values


def _parse_list(text: str | None, dimension: str, option: str, example: str) -> list[float | None]:
    if text is None:
        return [None]
    items = [v.strip() for v in text.split(",") if v.strip()]
    if not items:
        raise UserError(f"{option}: no values given; e.g. {example}")
    # "10,100,1000Mbit/s": the last value's unit applies to bare numbers before it (as `compare --sweep`).
    unit = "".join(ch for ch in items[-1] if not (ch.isdigit() or ch in ".eE+-")).strip()
    out: list[float | None] = []
    for item in items:
        text_value = item if any(c.isalpha() for c in item) else item + unit
        try:
            out.append(parse_quantity(text_value, dimension, allow_bare_number=False))
        except UserError as exc:
            raise UserError(f"{option}: {exc}") from None
    return out


# ---- rendering ----------------------------------------------------------------------------------------------
def _time(seconds: float) -> str:
    return format_seconds(seconds) if math.isfinite(seconds) else "never"


def render_vfl_search(result: SearchResult, console: Console) -> None:
    best: VflReport = result.best.report  # type: ignore[assignment]
    link = f"{format_bandwidth(best.wan_bandwidth)} achievable, {format_seconds(best.wan_latency_s)} one way"
    table = Table(
        title=f"{best.workload} on {best.cluster} ({link}): time to AUC {best.target_auc:.4f}",
        title_justify="left",
    )
    for column in ("", "W", "R", "round", "epoch", "worth", "to target", "best is"):
        table.add_column(column, justify="left" if not column else "right", no_wrap=True)

    def row(label: str, report: VflReport, style: str | None = None) -> None:
        speed = report.time_to_target_s / best.time_to_target_s if best.time_to_target_s > 0 else math.inf
        table.add_row(
            label,
            str(report.workset),
            str(report.local_updates),
            format_seconds(report.round_time_s),
            format_seconds(report.epoch_time_s),
            f"{report.round_worth:.2f}",
            _time(report.time_to_target_s),
            f"{speed:.2f}x",
            style=style,
        )

    for i, candidate in enumerate(result.candidates or [result.best]):
        row("CELU-VFL" if i == 0 else f"  #{i + 1}", candidate.report, "bold green" if i == 0 else None)  # type: ignore[arg-type]
    for baseline in result.baselines:
        if isinstance(baseline.report, VflReport):
            report = baseline.report
            row(MODE_NAMES[report.mode] if report.weighting else "no weighting", report)
    console.print(table)
    d = result.details
    console.print(
        f"CELU-VFL W={best.workset}, R={best.local_updates}: predicted [bold]{d['speedup_over_vanilla']:.2f}x[/bold] "
        f"faster to the target than vanilla VFL and [bold]{d['speedup_over_fedbcd']:.2f}x[/bold] than FedBCD; "
        f"an epoch takes {d['epoch_time_ratio_to_vanilla']:.2f}x vanilla's ({best.bottleneck}-bound, "
        f"{format_bytes(best.communication_bytes_per_epoch)} over the WAN per epoch). worth: a round in fresh "
        "rounds; R counts the fresh use, W=1, R=1 is vanilla."
    )
    if not best.efficiency_fitted:
        console.print(
            "[yellow]note:[/yellow] the statistical-efficiency model holds prior values, not a fit to executor runs "
            "(benchmarks/vfl_fit.py fits it); times per round and epoch do not depend on it."
        )
    console.print(f"searched {d['evaluated']} configurations in {result.search_time_s:.2f} s")


def _seconds(value: float) -> str:
    if not math.isfinite(value):
        return "never"
    return f"{value:.0f} s" if value >= 99.5 else format_seconds(value)


def render_sweep(rows: list[dict], console: Console, title: str) -> None:
    table = Table(title=title, title_justify="left", show_edge=False)
    for column in ("WAN", "delay", "W,R", "vanilla", "FedBCD", "CELU", "vs vanilla", "vs FedBCD"):
        table.add_column(column, justify="left" if column == "WAN" else "right", no_wrap=True)
    for r in rows:
        table.add_row(
            r["bandwidth_label"],
            r["latency_label"],
            f"{r['workset']},{r['local_updates']}",
            _seconds(r["vanilla_s"]),
            _seconds(r["fedbcd_s"]),
            _seconds(r["celu_s"]),
            f"{r['speedup_over_vanilla']:.2f}x",
            f"{r['speedup_over_fedbcd']:.2f}x",
        )
    console.print(table)
    console.print(
        "predicted wall time to the target AUC of each mode with its best W and R; WAN is the line rate, "
        "latency one way"
    )


# ---- the commands -------------------------------------------------------------------------------------------
def sweep_rows(
    cfg: wl.VflWorkloadConfig,
    cluster: ClusterSpec,
    bandwidths: list[float | None],
    latencies: list[float | None],
    **search,
) -> list[dict]:
    """The search repeated for every (WAN bandwidth, one-way latency); None keeps the cluster's own."""
    rows = []
    for bandwidth in bandwidths:
        for latency in latencies:
            swept = with_wan(cluster, bandwidth, latency)
            result = search_vfl(cfg, swept, **search)
            best: VflReport = result.best.report  # type: ignore[assignment]
            by_mode = {
                b.report.mode: b.report
                for b in result.baselines
                if isinstance(b.report, VflReport) and b.report.weighting
            }
            link = swept.wan[0].link
            rows.append(
                {
                    "bandwidth": link.bandwidth,
                    "latency_s": link.latency,
                    "bandwidth_label": _bits(link.bandwidth),
                    "latency_label": format_seconds(link.latency),
                    "workset": best.workset,
                    "local_updates": best.local_updates,
                    "vanilla_s": by_mode["vanilla"].time_to_target_s,
                    "fedbcd_s": by_mode["fedbcd"].time_to_target_s,
                    "fedbcd_local_updates": by_mode["fedbcd"].local_updates,
                    "celu_s": best.time_to_target_s,
                    "speedup_over_vanilla": result.details["speedup_over_vanilla"],
                    "speedup_over_fedbcd": result.details["speedup_over_fedbcd"],
                    "epoch_time_ratio_to_vanilla": result.details["epoch_time_ratio_to_vanilla"],
                    "plan": result.best.plan.model_dump(mode="json", exclude_defaults=True),
                    "report": best.model_dump(mode="json"),
                }
            )
    return rows


def _bits(bandwidth: float) -> str:
    bits = 8 * bandwidth
    for factor, unit in ((1e9, "Gbit/s"), (1e6, "Mbit/s"), (1e3, "kbit/s")):
        if bits >= factor:
            return f"{bits / factor:.3g} {unit}"
    return f"{bits:.3g} bit/s"


def plan_yaml(plan: Plan, report: VflReport) -> str:
    header = (
        f"# CELU-VFL plan from `simulate search vfl`: workload {report.workload}, cluster {report.cluster}\n"
        f"# predicted: {format_seconds(report.epoch_time_s)} per epoch, {_time(report.time_to_target_s)} to AUC "
        f"{report.target_auc:.4f}\n"
    )
    return header + yaml.safe_dump(plan.model_dump(mode="json", exclude_defaults=True), sort_keys=False)


def vfl_command(
    workload: str = typer.Option(
        ...,
        "--workload",
        "-w",
        help="VFL workload: " + ", ".join(wl.vfl_workload_names()) + " (or a YAML file with family: vfl-wdl).",
    ),
    cluster: str = typer.Option(
        ..., "--cluster", "-c", help="Cluster with two sites joined by a WAN (e.g. two-sites-wan)."
    ),
    stack: str | None = typer.Option(None, "--stack", help=STACK_HELP),
    target_auc: float | None = typer.Option(
        None,
        "--target-auc",
        help="Test AUC to reach; default: vanilla's AUC at the end of the run the model was fitted to, less 0.005.",
    ),
    parties: str | None = typer.Option(
        None,
        "--parties",
        help="The two parties' sites, the active (label) party "
        "first, e.g. 'dc-a,dc-b'; default: the cluster's first two sites.",
    ),
    worksets: str | None = typer.Option(
        None, "--workset", help=f"Workset sizes W to try, e.g. '1,2,4,8' (default {','.join(map(str, WORKSET_GRID))})."
    ),
    local_updates: str | None = typer.Option(
        None,
        "--local-updates",
        help="R to try: uses of each batch's "
        "statistics, the fresh update included, so R=1 is vanilla VFL "
        f"(default {','.join(map(str, UPDATES_GRID))}).",
    ),
    top: int = typer.Option(5, "--top", min=1, help="Candidates to list, the chosen one included."),
    sweep_bandwidth: str | None = typer.Option(
        None, "--sweep-bandwidth", help="Repeat the search for these WAN line rates, e.g. '10Mbit/s,100Mbit/s,1Gbit/s'."
    ),
    sweep_latency: str | None = typer.Option(
        None, "--sweep-latency", help="Repeat the search for these one-way WAN latencies, e.g. '5ms,20ms,50ms'."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON (the shared search shape)."),
    out_file: Path | None = typer.Option(None, "--out", help="Write the chosen plan (*.yaml) for `execute --plan`."),
    force: bool = typer.Option(False, "--force", help="Allow --out to replace an existing file."),
) -> None:
    """CELU-VFL: the workset size W and local updates R that reach the target AUC soonest over your WAN."""

    if out_file is not None:
        if sweep_bandwidth is not None or sweep_latency is not None:
            raise UserError("--out writes one plan; leave it out with --sweep-bandwidth/--sweep-latency")
        check_output(out_file, "--out", YAML, force)
    cfg = load_vfl(workload)
    cl = load_cluster(cluster)
    cl = cluster_with_stack(cl, stack)
    sites = _parse_sites(parties, cl)
    search: dict[str, Any] = dict(
        target=target_auc,
        sites=sites,
        worksets=_parse_grid(worksets, "--workset", WORKSET_GRID),
        updates=_parse_grid(local_updates, "--local-updates", UPDATES_GRID),
        top_k=top,
    )
    if target_auc is not None:
        load_efficiency(cfg.name).check_target(target_auc)
    if sweep_bandwidth is not None or sweep_latency is not None:
        if out_file is not None:
            raise UserError("--out writes one plan; leave it out with --sweep-bandwidth/--sweep-latency")
        rows = sweep_rows(
            cfg,
            cl,
            _parse_list(sweep_bandwidth, "bandwidth", "--sweep-bandwidth", "'10Mbit/s,100Mbit/s,1Gbit/s'"),
            _parse_list(sweep_latency, "time", "--sweep-latency", "'5ms,20ms,50ms'"),
            **search,
        )
        if as_json:
            print(json.dumps({"workload": cfg.name, "cluster": cl.name, "rows": rows}, indent=2))
        else:
            render_sweep(rows, _console(), f"{cfg.name} on {cl.name}: CELU-VFL against vanilla VFL and FedBCD")
        return
    result = search_vfl(cfg, cl, **search)
    if out_file is not None:
        write_output(out_file, plan_yaml(result.best.plan, result.best.report), "--out", YAML, force, _console(True))  # type: ignore[arg-type]
    if as_json:
        print(result.to_json())
    else:
        render_vfl_search(result, _console())


def run_vfl(workload: str, cluster: ClusterSpec, plan: Plan, target: float | None = None) -> VflReport:
    """`simulate run` for a VFL workload: vanilla VFL without plan.federated, else CELU-VFL with its W and R."""
    cfg = load_vfl(workload)
    efficiency = load_efficiency(cfg.name)
    target = efficiency.default_target() if target is None else target
    efficiency.check_target(target)
    federated = plan.federated
    sites = tuple(federated.parties[:2]) if federated is not None else default_sites(cluster)
    if federated is not None and len(federated.parties) != 2:
        raise UserError(f"plan.federated.parties lists {len(federated.parties)} parties; the simulator models two")
    if federated is None:
        mode, w, r = "vanilla", 1, 1
    else:
        mode, w, r = plan_mode(federated), federated.workset, federated.local_updates
        if mode not in ("vanilla", "fedbcd", "celu"):
            raise UserError(f"plan.federated.mode must be vanilla, fedbcd or celu, got {mode!r}")
        if mode == "vanilla" and (w, r) != (1, 1):
            raise UserError(
                f"vanilla VFL has W=1 and R=1; the plan says W={w}, R={r} (mode fedbcd or celu for local updates)"
            )
    return evaluate(mode, w, r, cfg=cfg, cluster=cluster, efficiency=efficiency, target=target, sites=sites, full=True)  # type: ignore[arg-type]


def render_vfl_report(report: VflReport, console: Console) -> None:
    table = Table(
        title=f"{report.workload} on {report.cluster}: {MODE_NAMES[report.mode]} W={report.workset} "
        f"R={report.local_updates} (prediction, {report.engine})",
        title_justify="left",
        show_edge=False,
    )
    table.add_column("figure")
    table.add_column("value", justify="right")
    for label, value in (
        ("round (one fresh batch)", format_seconds(report.round_time_s)),
        ("epoch", f"{format_seconds(report.epoch_time_s)} ({report.rounds_per_epoch} rounds)"),
        ("the two messages alone", format_seconds(report.communication_s)),
        ("WAN bytes per epoch", format_bytes(report.communication_bytes_per_epoch)),
        ("active compute per round", format_seconds(report.active.fresh_compute_s + report.active.local_compute_s)),
        ("passive compute per round", format_seconds(report.passive.fresh_compute_s + report.passive.local_compute_s)),
        ("bottleneck", report.bottleneck),
        ("round worth (fresh rounds)", f"{report.round_worth:.2f}"),
        (f"to AUC {report.target_auc:.4f}", f"{report.epochs_to_target:.2f} epochs, {_time(report.time_to_target_s)}"),
    ):
        table.add_row(label, value)
    console.print(table)


def simulate_run_vfl(
    workload: str,
    cluster: ClusterSpec,
    plan: Plan,
    engine: str,
    trace: Path | None,
    plot: Path | None,
    as_json: bool,
    out_file: Path | None,
    force: bool,
) -> None:
    """`simulate run --workload <a VFL workload>`: one mode's prediction (plan.federated: CELU-VFL with its W
    and R; no federated section: vanilla VFL). To choose W and R, `simulate search vfl`."""

    if engine != "des":
        raise UserError(f"VFL workloads are predicted by the event engine only; leave out --engine (got {engine!r})")
    if trace is not None or plot is not None:
        raise UserError("--trace and --plot are not available for VFL workloads; `simulate search vfl` compares modes")
    if out_file is not None:
        check_output(out_file, "--out", JSON, force)
    report = run_vfl(workload, cluster, plan)
    if out_file is not None:
        write_output(out_file, report.model_dump_json(indent=2), "--out", JSON, force, _console(True))
    if as_json:
        print(report.model_dump_json(indent=2))
    else:
        render_vfl_report(report, _console())
        _console().print(
            "To choose W and R for this link: simulate search vfl --workload "
            f"{report.workload} --cluster {report.cluster}"
        )


SWEEP_KEYS = {
    "wan_bandwidth": ("bandwidth", "'wan_bandwidth=10,100,1000Mbit/s'"),
    "wan_latency": ("time", "'wan_latency=5,20,50ms'"),
}


def compare_vfl(
    workload: str, clusters: list[str], sweep: str | None, as_json: bool, csv_file: Path | None, force: bool
) -> None:
    """`simulate compare` for a VFL workload: the planner's predicted speedups per cluster, or over a WAN sweep
    (`--sweep wan_bandwidth=...` line rates, `--sweep wan_latency=...` one-way latencies)."""
    import csv
    import io

    if csv_file is not None:
        check_output(csv_file, "--csv", CSV, force)
    cfg = load_vfl(workload)
    bandwidths: list[float | None] = [None]
    latencies: list[float | None] = [None]
    if sweep is not None:
        key, _, values = sweep.partition("=")
        key = key.strip()
        if key not in SWEEP_KEYS or not values.strip():
            raise UserError(
                f"--sweep for a VFL workload takes {' or '.join(SWEEP_KEYS)} with values, e.g. "
                f"{SWEEP_KEYS['wan_bandwidth'][1]} or {SWEEP_KEYS['wan_latency'][1]}; got {sweep!r}"
            )
        dimension, example = SWEEP_KEYS[key]
        parsed = _parse_list(values, dimension, "--sweep", example)
        if key == "wan_bandwidth":
            bandwidths = parsed
        else:
            latencies = parsed
    rows = []
    for name in clusters:
        for row in sweep_rows(cfg, load_cluster(name), bandwidths, latencies):
            rows.append({"cluster": name, **row})
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        render_sweep(
            rows,
            _console(),
            f"{cfg.name}: CELU-VFL against vanilla VFL and FedBCD"
            + (f" on {', '.join(clusters)}" if len(clusters) > 1 else f" on {clusters[0]}"),
        )
    if csv_file is not None:
        columns = [
            "cluster",
            "bandwidth",
            "latency_s",
            "workset",
            "local_updates",
            "vanilla_s",
            "fedbcd_s",
            "celu_s",
            "speedup_over_vanilla",
            "speedup_over_fedbcd",
            "epoch_time_ratio_to_vanilla",
        ]
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([row[c] for c in columns])
        write_output(csv_file, buffer.getvalue(), "--csv", CSV, force, _console(True))
