"""`simulate`: what-if analysis of training plans without the hardware.

Every command takes names from the catalog (`simulate specs list`, `simulate workloads list`) or paths
to your own YAML files. Errors in what you wrote are reported with the file, field and accepted values,
and exit with status 2.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin

import typer
from pydantic import BaseModel
from rich.table import Table

from hwmodel.catalog import cluster_names, device_names, load_cluster, load_device, load_stack, stack_names
from hwmodel.cli_common import (
    CSV,
    IMAGE,
    JSON,
    check_output,
    make_console,
    progress_bar,
    report_written,
    run_app,
    write_output,
)
from hwmodel.errors import SpecError, UserError
from hwmodel.loading import read_mapping, validate
from hwmodel.units import format_bandwidth, format_bytes, format_flop_rate, format_seconds, parse_quantity
from hwmodel.whatif import LINK_FIELDS, with_device_everywhere, with_link_bandwidth
from simulator.analytic import evaluate
from simulator.binding import bind
from simulator.errors import InfeasiblePlan
from simulator.plan import SHORTHAND_KEYS, Plan, load_plan, parse_shorthand
from simulator.render import render_comparison, render_report
from simulator.report import Report
from simulator.stacks import DEFAULT_STACK, STACK_HELP, resolve_stack
from simulator.validation import summarize, validate_llm_foundry, validate_megatron
from workloads.catalog import load_workload, workload_names
from workloads.transformer import model_flops_per_sample, parameter_count

app = typer.Typer(
    name="simulate",
    help=(
        "Predict iteration time, throughput, MFU and per-device memory of a training plan on hardware you "
        "describe, in well under a second, without the hardware.\n\n"
        "Start with:  simulate demo\n\n"
        "Then:  simulate run --workload llama2-7b --cluster dgx-a100-80g --nodes 4 "
        "--plan 'tp=2,pp=2,micro_batch=2,global_batch=256'"
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)
specs_app = typer.Typer(help="List and show hardware specs (devices and clusters).", no_args_is_help=True)
workloads_app = typer.Typer(help="List and show workloads (model shapes).", no_args_is_help=True)
validate_app = typer.Typer(help="Compare predictions with published measurements.", no_args_is_help=True)
app.add_typer(specs_app, name="specs")
app.add_typer(workloads_app, name="workloads")
app.add_typer(validate_app, name="validate")

from simulator.search.cli import search_app  # noqa: E402  (the planners register in simulator.search.registry)

app.add_typer(search_app, name="search")

out = make_console()
err = make_console(stderr=True)

WORKLOAD_HELP = "Workload name (see `simulate workloads list`), a workload YAML or a Hugging Face config.json."
CLUSTER_HELP = "Cluster name (see `simulate specs list`) or a cluster YAML file."
PLAN_HELP = (
    "Plan YAML/JSON file or shorthand such as 'tp=8,pp=2,dp_type=zero1,micro_batch=1,global_batch=512,"
    "recompute=selective'. Keys: " + ", ".join(SHORTHAND_KEYS) + ". dp left out fills the cluster."
)


# ---- run -----------------------------------------------------------------------------------------
ENGINE_HELP = (
    "analytic: closed-form, microseconds per plan. des: discrete-event simulation of the iteration with "
    "contention on shared links, memory over time, --trace and --plot."
)


EXIT_DOES_NOT_FIT = 3  # `simulate run`: the plan's predicted peak memory exceeds a device's (see --allow-oom)


def check_engine(engine: str, trace: Path | None, plot: Path | None) -> None:
    """The engine name, and --trace/--plot only where there is a timeline."""
    if engine not in ("analytic", "des"):
        raise UserError(f"--engine must be analytic or des, got {engine!r}")
    if engine == "analytic" and (trace is not None or plot is not None):
        raise UserError("--trace and --plot need --engine des (the analytic model has no timeline)")


def _predict(
    plan: Plan, workload, cluster, engine: str, trace: Path | None = None, plot: Path | None = None, force: bool = False
) -> Report:
    """One prediction with the chosen engine; the des engine can also write a trace and a plot."""
    check_engine(engine, trace, plot)
    if engine == "analytic":
        return evaluate(plan, workload, cluster)
    if trace is not None:
        check_output(trace, "--trace", JSON, force)
    if plot is not None:
        check_output(plot, "--plot", IMAGE, force)
    from simulator.des import des_report
    from simulator.des.engine import Simulation

    simulation = Simulation(bind(plan, workload, cluster), record_trace=trace is not None or plot is not None)
    total = simulation.total_operations()
    if total > 5000:
        with progress_bar(err) as progress:
            task = progress.add_task("simulating", total=total)
            simulation.progress = lambda n: progress.advance(task, n)
            result = simulation.run()
    else:
        result = simulation.run()
    if trace is not None:
        from simulator.des.trace import write_trace

        write_trace(result, trace)
        report_written(trace, err)
    if plot is not None:
        from simulator.des.plot import plot_timeline

        plot_timeline(result, plot, f"{workload.name} on {cluster.name}: {plan.shorthand(sections=True)}")
        report_written(plot, err)
    return des_report(result)


@app.command()
def run(
    workload: str = typer.Option(..., "--workload", "-w", help=WORKLOAD_HELP),
    cluster: str = typer.Option(..., "--cluster", "-c", help=CLUSTER_HELP),
    plan: str = typer.Option("tp=1", "--plan", "-p", help=PLAN_HELP),
    stack: str | None = typer.Option(None, "--stack", help=STACK_HELP),
    nodes: int | None = typer.Option(None, "--nodes", "-n", help="Node count for a cluster of identical nodes."),
    devices_per_node: int | None = typer.Option(
        None, "--devices-per-node", help="Devices in every node (e.g. 4 ranks on cpu-local)."
    ),
    seq_len: int | None = typer.Option(None, "--seq-len", help="Train at this sequence length instead."),
    engine: str = typer.Option("des", "--engine", "-e", help=ENGINE_HELP),
    trace: Path | None = typer.Option(
        None, "--trace", help="des: write a Chrome trace (*.json; open in Perfetto or chrome://tracing)."
    ),
    plot: Path | None = typer.Option(
        None, "--plot", help="des: draw the timeline and memory over time (*.png, *.pdf or *.svg)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the Report as JSON on stdout."),
    out_file: Path | None = typer.Option(
        None, "--out", help="Also write the Report as JSON (*.json) to this new file."
    ),
    force: bool = typer.Option(False, "--force", help="Allow --out, --trace and --plot to replace existing files."),
    allow_oom: bool = typer.Option(
        False,
        "--allow-oom",
        help=f"Exit 0 even when the plan does not fit in device memory (otherwise exit {EXIT_DOES_NOT_FIT}).",
    ),
) -> None:
    """Predict one plan: time, throughput, MFU, memory, and where the time goes.

    Exit status: 0 the plan fits; 2 an error in the input; 3 the report is printed (and written) but the plan's
    predicted peak memory exceeds a device's memory (--allow-oom: 0).
    """
    # Every output is checked before any work: a typo in a file name costs nothing.
    if out_file is not None:
        check_output(out_file, "--out", JSON, force)
    if engine == "des":
        if trace is not None:
            check_output(trace, "--trace", JSON, force)
        if plot is not None:
            check_output(plot, "--plot", IMAGE, force)
    from workloads.vfl import is_vfl_workload

    if is_vfl_workload(workload):  # two parties over a WAN: rounds, predicted by the VFL engine
        from simulator.search.vfl.cli import simulate_run_vfl

        return simulate_run_vfl(
            workload,
            load_cluster(cluster, nodes, devices_per_node),
            load_plan(plan),
            engine,
            trace,
            plot,
            as_json,
            out_file,
            force,
        )
    the_plan, the_workload = with_stack(load_plan(plan), stack), load_workload(workload, seq_len)
    the_cluster = load_cluster(cluster, nodes, devices_per_node)
    report = _predict(the_plan, the_workload, the_cluster, engine, trace, plot, force)
    if the_plan.offload > 0 or any(layer.offload for layer in the_plan.layers):
        from simulator.search.memo.search import host_memory_used

        # Swapped activations fill the node's DRAM: say how much (what `simulate search memo` reports too).
        report = report.model_copy(update={"host_memory_bytes": host_memory_used(the_plan, the_workload, the_cluster)})
    if out_file is not None:
        write_output(out_file, report.model_dump_json(indent=2), "--out", JSON, force, err)
    if as_json:
        print(report.model_dump_json(indent=2))
    else:
        render_report(report, out)
    if not report.fits_memory and not allow_oom:
        err.print(
            f"[bold red]does not fit:[/bold red] predicted peak memory {format_bytes(report.peak_memory_bytes)} "
            f"exceeds the device memory; exit status {EXIT_DOES_NOT_FIT} (pass --allow-oom to accept it)",
            highlight=False,
        )
        raise typer.Exit(EXIT_DOES_NOT_FIT)


def with_stack(plan: Plan, stack: str | None) -> Plan:
    """`plan` under `--stack` (which wins over the plan file's `stack`); the name is checked here, before work."""
    if stack is None:
        return plan
    resolve_stack(stack)
    return plan.model_copy(update={"stack": stack})


# ---- compare -------------------------------------------------------------------------------------
def _parse_sweep(text: str) -> tuple[str, list[str]]:
    if "=" not in text:
        raise UserError(
            f"--sweep: expected KEY=V1,V2,...; got {text!r} "
            "(e.g. 'tp=1,2,4,8' or 'inter_node_bandwidth=100,200,400Gbit/s')"
        )
    key, values = text.split("=", 1)
    key = key.strip()
    accepted = list(SHORTHAND_KEYS) + ["seq_len", "nodes", "device", "wan_bandwidth"] + list(LINK_FIELDS)
    if key not in accepted:
        raise UserError(f"--sweep: unknown key {key!r}; accepted: {', '.join(accepted)}")
    items = [v.strip() for v in values.split(",") if v.strip()]
    if not items:
        raise UserError(f"--sweep: no values given for {key}")
    if key in ("seq_len", "nodes"):
        bad = [v for v in items if not v.isdigit() or int(v) <= 0]
        if bad:
            raise UserError(f"--sweep: {key} takes positive integers; got {', '.join(repr(v) for v in bad)}")
    if key.endswith("_bandwidth"):
        # "100,200,400Gbit/s": the last value's unit applies to bare numbers before it.
        unit = "".join(ch for ch in items[-1] if not (ch.isdigit() or ch == "."))
        items = [v if any(c.isalpha() for c in v) else v + unit for v in items]
    return key, items


def _swept_plan(base: Plan, key: str, value: str) -> Plan:
    """`base` with one uniform key replaced; dp is re-derived when a degree changes and dp was not given."""
    override = getattr(parse_shorthand(f"{key}={value}"), key)  # a malformed value stops the sweep
    data = base.model_dump(exclude_unset=True)
    data[key] = override
    if key in ("tp", "pp", "cp") and "dp" not in base.model_fields_set:
        data.pop("dp", None)
    return validate(Plan, data, f"--sweep {key}={value}")


@app.command()
def compare(
    workload: str = typer.Option(..., "--workload", "-w", help=WORKLOAD_HELP),
    cluster: list[str] = typer.Option(..., "--cluster", "-c", help=CLUSTER_HELP + " Repeat to compare clusters."),
    plan: str = typer.Option("tp=1", "--plan", "-p", help=PLAN_HELP),
    stack: str | None = typer.Option(None, "--stack", help=STACK_HELP),
    sweep: str | None = typer.Option(
        None,
        "--sweep",
        "-s",
        help="Vary one field: a plan key ('tp=1,2,4,8'), seq_len, nodes, device ('device=a100-80g,h100-sxm') or a "
        "link ('inter_node_bandwidth=100,200,400Gbit/s'; also intra_node_bandwidth, host_link_bandwidth, "
        "wan_bandwidth).",
    ),
    nodes: int | None = typer.Option(None, "--nodes", "-n", help="Node count for clusters of identical nodes."),
    seq_len: int | None = typer.Option(None, "--seq-len", help="Train at this sequence length instead."),
    engine: str = typer.Option("analytic", "--engine", "-e", help=ENGINE_HELP),
    csv_file: Path | None = typer.Option(None, "--csv", help="Also write the table as CSV (*.csv) to this new file."),
    as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON on stdout."),
    force: bool = typer.Option(False, "--force", help="Allow --csv to replace an existing file."),
) -> None:
    """Run one workload and plan across several clusters, or sweep one field, and print a table."""
    if csv_file is not None:
        check_output(csv_file, "--csv", CSV, force)
    from workloads.vfl import is_vfl_workload

    if is_vfl_workload(workload):  # two parties over a WAN: the VFL planner's speedups, sweeping the link
        from simulator.search.vfl.cli import compare_vfl

        return compare_vfl(workload, cluster, sweep, as_json, csv_file, force)
    base_plan = with_stack(load_plan(plan), stack)
    key: str | None = None
    values: list[Any] = [None]
    if sweep:
        key, values = _parse_sweep(sweep)
    rows: list[dict[str, Any]] = []
    for cluster_name in cluster:
        for value in values:
            row: dict[str, Any] = {"cluster": cluster_name}
            if key:
                row[key] = value
            wl = load_workload(workload, int(value) if key == "seq_len" else seq_len)
            cl = load_cluster(cluster_name, int(value) if key == "nodes" else nodes)
            try:
                pl = _swept_plan(base_plan, key, value) if key is not None and key in SHORTHAND_KEYS else base_plan
                if key == "device":
                    cl = with_device_everywhere(cl, value)
                elif key and key.endswith("_bandwidth"):
                    cl = with_link_bandwidth(cl, key, parse_quantity(value, "bandwidth", allow_bare_number=False))
                row["report"] = _predict(pl, wl, cl, engine)
            except (InfeasiblePlan, SpecError) as exc:
                # One configuration that cannot run is a row of the table, not the end of the sweep.
                row["report"] = None
                row["reason"] = str(exc)
            rows.append(row)
    columns = ["cluster"] + ([key] if key else [])
    if as_json:
        print(
            json.dumps(
                [
                    {
                        **{c: r[c] for c in columns},
                        "report": r["report"].model_dump() if r["report"] else None,
                        "reason": r.get("reason"),
                    }
                    for r in rows
                ],
                indent=2,
            )
        )
    else:
        title = f"{workload}: plan {base_plan.shorthand()}, stack {base_plan.stack or DEFAULT_STACK}" + (
            f", sweeping {key}" if key else ""
        )
        render_comparison(rows, out, title, columns)
    if csv_file is not None:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(
            columns + ["iteration_time_s", "tokens_per_s", "mfu", "peak_memory_bytes", "fits_memory", "reason"]
        )
        for r in rows:
            rep = r["report"]
            writer.writerow(
                [r[c] for c in columns]
                + (
                    [rep.iteration_time_s, rep.tokens_per_s, rep.mfu, rep.peak_memory_bytes, rep.fits_memory, ""]
                    if rep
                    else ["", "", "", "", False, r.get("reason", "")]
                )
            )
        write_output(csv_file, buffer.getvalue(), "--csv", CSV, force, err)


# ---- validate ------------------------------------------------------------------------------------
@validate_app.command("llm-foundry")
def validate_llm_foundry_cmd(
    csv_path: Path | None = typer.Option(
        None, "--csv", help="Validate another table with the same columns (gpu values a100_40gb, a100_80gb, h100_80gb)."
    ),
    stack: str = typer.Option("llm-foundry", "--stack", help=STACK_HELP.split(" Left out")[0]),
    engine: str = typer.Option("analytic", "--engine", "-e", help=ENGINE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print rows and summary as JSON on stdout."),
) -> None:
    """Predict every row of the llm-foundry MPT table and compare tokens/s with the measured value."""
    _run_validation("llm-foundry", validate_llm_foundry, csv_path, stack, engine, as_json)


@validate_app.command("megatron")
def validate_megatron_cmd(
    csv_path: Path | None = typer.Option(
        None, "--csv", help="Validate another table with the columns of Narayanan et al. 2021 Table 1's file."
    ),
    stack: str = typer.Option("megatron-lm", "--stack", help=STACK_HELP.split(" Left out")[0]),
    engine: str = typer.Option("analytic", "--engine", "-e", help=ENGINE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print rows and summary as JSON on stdout."),
) -> None:
    """Predict every row of the Megatron-LM set (Narayanan et al. 2021, Table 1, on DGX A100 80GB) and compare
    tokens/s with the measured value."""
    _run_validation("megatron", validate_megatron, csv_path, stack, engine, as_json)


def _run_validation(name: str, validate_rows, csv_path: Path | None, stack: str, engine: str, as_json: bool) -> None:
    started = time.perf_counter()
    check_engine(engine, None, None)
    resolve_stack(stack)
    predict = lambda plan, workload, cluster: _predict(plan, workload, cluster, engine)
    with progress_bar(err) as progress:
        task = progress.add_task("predicting rows", total=None)
        rows = validate_rows(csv_path, progress=lambda: progress.advance(task), predict=predict, stack=stack)
    summary = summarize(rows)
    summary["stack"] = stack
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    _render_validation_rows(
        f"{name}: measured vs predicted tokens/s ({csv_path or 'built-in table'}, stack {stack}, {engine} engine)", rows
    )
    _render_validation_groups(rows)
    out.print(
        f"[bold]{len(rows)} rows[/bold] (stack {stack}): mean |error| [bold]{summary['mean_abs_pct_error']:.2f}%"
        f"[/bold], max |error| {summary['max_abs_pct_error']:.2f}%, Spearman rank correlation "
        f"{summary['spearman']:.3f}, predicted not to fit in device memory: {summary['predicted_not_to_fit']} "
        f"({time.perf_counter() - started:.2f} s)"
    )


def _render_validation_rows(title: str, rows) -> None:
    table = Table(title=title, show_edge=False)
    # MFU as the source counts it (causal attention in full), measured beside predicted.
    for col in (
        "model",
        "gpu",
        "gpus",
        "seq",
        "mb",
        "ckpt",
        "measured",
        "predicted",
        "error",
        "MFU meas.",
        "MFU pred.",
        "pred. memory",
    ):
        table.add_column(col, justify="left" if col in ("model", "gpu") else "right")
    for r in rows:
        color = "green" if abs(r.error_pct) <= 10 else ("yellow" if abs(r.error_pct) <= 25 else "red")
        table.add_row(
            r.model,
            r.gpu,
            str(r.gpus),
            str(r.seq_len),
            str(r.micro_batch),
            "yes" if r.act_ckpt else "no",
            f"{r.measured_tokens_per_s:,.0f}",
            f"{r.predicted_tokens_per_s:,.0f}",
            f"[{color}]{r.error_pct:+.1f}%[/{color}]",
            f"{100 * r.measured_mfu:.1f}%" if r.measured_mfu is not None else "-",
            f"{100 * r.predicted_mfu:.1f}%",
            f"{r.predicted_peak_memory_gib:.1f} GiB" + ("" if r.fits_memory else " [red](does not fit)[/red]"),
        )
    out.print(table)


def _render_validation_groups(rows) -> None:
    groups = Table(title="Error by group (signed: + means predicted faster than measured)", show_edge=False)
    groups.add_column("group", no_wrap=True)
    for col in ("rows", "mean |err|", "median |err|", "max |err|", "mean err"):
        groups.add_column(col, justify="right", no_wrap=True)
    for label, members in _validation_groups(rows):
        errors = [r.error_pct for r in members]
        absolute = sorted(abs(e) for e in errors)
        groups.add_row(
            label,
            str(len(members)),
            f"{sum(absolute) / len(absolute):.2f}%",
            f"{absolute[len(absolute) // 2]:.2f}%",
            f"{absolute[-1]:.2f}%",
            f"{sum(errors) / len(errors):+.2f}%",
        )
    out.print(groups)


def _validation_groups(rows):
    """(label, rows) for each GPU type and for runs with and without activation checkpointing."""
    out = []
    for gpu in sorted({r.gpu for r in rows}):
        out.append((gpu, [r for r in rows if r.gpu == gpu]))
    for flag, label in ((False, "no act. ckpt"), (True, "act. ckpt")):
        members = [r for r in rows if r.act_ckpt == flag]
        if members:
            out.append((label, members))
    return out


# ---- catalogs ------------------------------------------------------------------------------------
@specs_app.command("list")
def specs_list() -> None:
    """List catalog devices, clusters and software stacks."""
    devices = Table(title="Devices", show_edge=False)
    devices.add_column("name", no_wrap=True)
    for col in ("description", "bf16 matrix", "memory", "bandwidth"):
        devices.add_column(col)
    for name in device_names():
        d = load_device(name)
        devices.add_row(
            name,
            d.description,
            format_flop_rate(d.compute.peak("bf16")),
            format_bytes(d.memory.capacity),
            format_bandwidth(d.memory.bandwidth),
        )
    clusters = Table(title="Clusters", show_edge=False)
    clusters.add_column("name", no_wrap=True)
    for col in ("devices", "nodes", "device types", "description"):
        clusters.add_column(col)
    for name in cluster_names():
        c = load_cluster(name)
        clusters.add_row(name, str(c.num_devices), str(c.num_nodes), ", ".join(c.device_types()), c.description)
    stacks = Table(title=f"Software stacks (--stack; default {DEFAULT_STACK})", show_edge=False)
    for col in ("name", "recompute policies", "description"):
        stacks.add_column(col, no_wrap=col == "name")
    for name in stack_names():
        st = load_stack(name)
        stacks.add_row(name, ", ".join(st.recompute_policies), st.description)
    out.print(devices)
    out.print(clusters)
    out.print(stacks)


def _unit_formatters() -> dict[int, Callable[[float], str]]:
    """The formatter of each unit-carrying field type of hwmodel.units, keyed by its validator."""
    from hwmodel import units

    rate = lambda v: format_flop_rate(v).replace("FLOPS", "FLOP/s")
    pairs = (
        (units.Bytes, format_bytes),
        (units.NonNegativeBytes, format_bytes),
        (units.Bandwidth, format_bandwidth),
        (units.FlopRate, rate),
        (units.Flops, units.format_flops),
        (units.Seconds, format_seconds),
        (units.NonNegativeSeconds, format_seconds),
    )
    # get_args of Annotated[float, validator] is (float, validator): the aliases read as plain floats to mypy.
    return {id(get_args(kind)[1]): formatter for kind, formatter in pairs}


def _formatter_of(annotation: Any, metadata: list, formatters: dict) -> Callable[[float], str] | None:
    for item in metadata:
        if id(item) in formatters:
            return formatters[id(item)]
    if get_origin(annotation) is Annotated:
        return _formatter_of(None, list(annotation.__metadata__), formatters)
    for arg in get_args(annotation):  # Bytes | None, dict[str, FlopRate], tuple[Seconds, ...]
        found = _formatter_of(arg, [], formatters)
        if found is not None:
            return found
    return None


def humanize(model: BaseModel) -> dict:
    """A spec as YAML-ready data with every quantity rounded in its unit and other floats to 4 digits."""
    formatters = _unit_formatters()

    def value_of(value: Any, formatter: Callable[[float], str] | None) -> Any:
        if isinstance(value, Enum):
            return value.value
        if isinstance(value, BaseModel):
            return fields_of(value)
        if isinstance(value, dict):
            return {str(k): value_of(v, formatter) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [value_of(v, formatter) for v in value]
        if isinstance(value, float):
            if formatter is not None:
                return formatter(value)
            return int(value) if value.is_integer() and abs(value) < 1e15 else float(f"{value:.4g}")
        if isinstance(value, str | int | bool) or value is None:
            return value
        return str(value)

    def fields_of(item: BaseModel) -> Any:
        dumped = item.model_dump(mode="json")
        if not isinstance(dumped, dict) or set(dumped) != set(type(item).model_fields):
            return value_of(dumped, None)  # a model with its own serialized form (an efficiency curve's pairs)
        return {
            name: value_of(getattr(item, name), _formatter_of(info.annotation, list(info.metadata), formatters))
            for name, info in type(item).model_fields.items()
        }

    return fields_of(model)


@specs_app.command("show")
def specs_show(
    name: str = typer.Argument(..., help="A device or cluster name, or a spec YAML file."),
    nodes: int | None = typer.Option(None, "--nodes", "-n", help="Resize a cluster of identical nodes."),
    raw: bool = typer.Option(
        False, "--raw", help="Every figure as the SI float the model holds (bytes, B/s, FLOP/s, s)."
    ),
) -> None:
    """Show one device or cluster with every figure rounded, in its unit ("80 GiB", "2.04 TB/s", "989 TFLOP/s"),
    and where it comes from (YAML on stdout; --raw for SI floats as the model holds them)."""
    import yaml

    is_file = name.endswith((".yaml", ".yml", ".json"))
    if name in device_names() or (is_file and "node_groups" not in read_mapping(name)):
        device = load_device(name)
        data = device.model_dump(mode="json") if raw else humanize(device)
    elif name in cluster_names() or is_file:
        cluster = load_cluster(name, nodes)
        data = cluster.model_dump(mode="json") if raw else humanize(cluster)
        data["summary"] = cluster.summary()
    else:
        from hwmodel.errors import UnknownNameError

        raise UnknownNameError("spec", name, device_names() + cluster_names())
    print(yaml.safe_dump(data, sort_keys=False))


@workloads_app.command("list")
def workloads_list() -> None:
    """List catalog workloads with their sizes."""
    table = Table(title="Workloads", show_edge=False)
    names = workload_names()
    table.add_column("name", no_wrap=True, min_width=max(map(len, names)))
    for col in ("family", "layers", "hidden", "heads (kv)", "seq", "parameters", "train FLOPs/sample"):
        table.add_column(col, justify="left" if col == "family" else "right")
    for name in names:
        w = load_workload(name)
        table.add_row(
            name,
            w.family,
            str(w.num_layers),
            str(w.hidden_size),
            f"{w.num_heads} ({w.kv_heads})",
            str(w.seq_len),
            f"{parameter_count(w) / 1e9:.3f} B",
            f"{model_flops_per_sample(w):.3g}",
        )
    out.print(table)


@workloads_app.command("show")
def workloads_show(
    name: str = typer.Argument(..., help=WORKLOAD_HELP),
    seq_len: int | None = typer.Option(None, "--seq-len", help="At another sequence length."),
) -> None:
    """Show one workload's shape, parameter count and FLOPs (YAML on stdout)."""
    import yaml

    w = load_workload(name, seq_len)
    data = w.model_dump(mode="json", exclude_none=True)
    data["parameters"] = parameter_count(w)
    data["train_flops_per_sample"] = model_flops_per_sample(w)
    print(yaml.safe_dump(data, sort_keys=False))


# ---- demo ----------------------------------------------------------------------------------------
@app.command()
def demo() -> None:
    """A tour on built-in defaults: one prediction, a plan comparison, and the check against published runs."""
    workload, cluster_name, nodes = "llama2-7b", "dgx-a100-80g", 4
    out.rule("[bold]hetplan demo[/bold]")
    out.print(
        f"Question: how should we train [bold]{workload}[/bold] on {nodes} DGX A100 nodes (32 GPUs), 1024 sequences "
        "of 4096 tokens per step, and what will it cost?\n"
    )
    wl, cl = load_workload(workload), load_cluster(cluster_name, nodes)
    candidates = {
        "DDP": "dp_type=ddp,micro_batch=1,global_batch=1024",
        "ZeRO-1": "dp_type=zero1,micro_batch=1,global_batch=1024",
        "FSDP (ZeRO-3)": "dp_type=zero3,micro_batch=2,global_batch=1024",
        "TP2 + SP + ZeRO-1": "tp=2,dp_type=zero1,micro_batch=2,global_batch=1024,sequence_parallel=true",
        "TP4 x PP2": "tp=4,pp=2,micro_batch=1,global_batch=1024,sequence_parallel=true",
        "TP8 x PP4 interleaved": "tp=8,pp=4,micro_batch=1,global_batch=1024,schedule=interleaved,virtual_stages=2,"
        "recompute=selective",
    }
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for name, text in candidates.items():
        try:
            rows.append({"candidate": name, "report": evaluate(parse_shorthand(text), wl, cl)})
        except InfeasiblePlan as exc:
            rows.append({"candidate": name, "report": None, "reason": str(exc)})
    elapsed = time.perf_counter() - started
    render_comparison(rows, out, f"{len(rows)} candidate plans, predicted in {format_seconds(elapsed)}", ["candidate"])
    for name, text in candidates.items():
        out.print(f"  [bold]{name}[/bold]: --plan '{text}'", highlight=False)
    feasible = [r for r in rows if r["report"] and r["report"].fits_memory]
    best = max(feasible, key=lambda r: r["report"].tokens_per_s)
    out.print("\nThe best candidate in detail, simulated event by event (links shared, memory over time):\n")
    render_report(_predict(best["report"].plan, wl, cl, "des"), out)
    summary = summarize(validate_llm_foundry())
    out.print(
        f"\nHow far to trust it: on the {len(summary['rows'])} published llm-foundry MPT runs (8-64 A100/H100 GPUs, "
        f"512-65536 tokens) predictions are off by [bold]{summary['mean_abs_pct_error']:.1f}%[/bold] on average "
        f"(worst {summary['max_abs_pct_error']:.1f}%). See `simulate validate llm-foundry`."
    )
    out.print(
        "\nNext: `simulate run --help` (add --trace t.json --plot t.png to see the timeline), "
        "`simulate compare --help`, `simulate specs list`, `simulate workloads list`."
    )


def main() -> None:
    """Console entry point: user errors become a message and exit status 2, never a traceback."""
    run_app(app, err)


if __name__ == "__main__":
    main()
