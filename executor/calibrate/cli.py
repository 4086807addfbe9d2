"""`execute calibrate`: measure this machine and write a cluster spec that `simulate` accepts.

Standalone: ``python -m executor.calibrate.cli --out my-box.yaml``. To mount it as a subcommand of
`execute`, one line in executor/cli.py::

    app.command("calibrate")(calibrate_cli.calibrate_command)

The command turns user errors into a message and exit status 2 itself, so it behaves the same
whichever `main()` runs it.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from hwmodel.cli_common import JSON, YAML, check_output, make_console, progress_bar, report_written, run_app
from hwmodel.errors import UserError

out = make_console()
err = make_console(stderr=True)

HELP = (
    "Measure this machine -- matmul throughput and efficiency over sizes, attention and elementwise ops, "
    "each in every dtype (fp32, bf16, fp16; tf32 on GPUs), memory bandwidth, per-kernel overhead, "
    "all-reduce / all-gather / reduce-scatter / all-to-all / send-recv over the real backend for every "
    "group size, compute/communication overlap, storage -- and write a cluster spec YAML (device inline) "
    "that `simulate --cluster FILE` uses: every dtype gets its own peaks and efficiency curves "
    "(compute.per_dtype), every collective kind its own bandwidth and latency (intra_node.collectives). "
    "One device per rank: N ranks run with cores // N threads each, all measured at once, as `execute` "
    "runs them. A full calibration takes minutes: about 7 on a 2-core machine that other work shares (the "
    "framework probe, on by default with 2+ ranks, is part of it); --quick runs a short sweep without the probe in "
    "well under a minute, for smoke checks and tests."
)


def calibrate_command(
    out_file: Path = typer.Option(
        ..., "--out", "-o", help="Cluster YAML to write (*.yaml); never replaced without --force."
    ),
    device_out: Path | None = typer.Option(
        None,
        "--device-out",
        help="Also write the device alone as a device YAML (usable as `device: PATH` in a cluster file).",
    ),
    name: str | None = typer.Option(
        None, "--name", help="Cluster name (default cpu-local-calibrated); its device is NAME-device."
    ),
    ranks: int | None = typer.Option(
        None,
        "--ranks",
        "-r",
        help="Devices (processes) of the node: default the GPUs, else the CPU cores. Each gets cores // N threads.",
    ),
    quick: bool = typer.Option(
        False, "--quick", help="A short sweep (well under a minute, no framework probe) for tests and smoke checks."
    ),
    storage_dir: Path | None = typer.Option(
        None,
        "--storage-dir",
        help="Folder for the storage benchmark's temporary file (default: the system temp folder).",
    ),
    curve_dtype: str | None = typer.Option(
        None,
        "--curve-dtype",
        help="dtype whose own curves are also written as the shared ones, for dtypes without curves of their own, "
        "and whose GEMMs the overlap probe runs (default bf16, the plans' default). Every measured dtype gets its own "
        "curves anyway.",
    ),
    baseline: str | None = typer.Option(
        None,
        "--baseline",
        help="Catalog cluster to compare with in the summary (default cpu-local on CPU; none on GPUs).",
    ),
    raw_out: Path | None = typer.Option(None, "--raw", help="Also write every timing as JSON to this new file."),
    framework: bool | None = typer.Option(
        None,
        "--framework/--no-framework",
        help="CPU, 2+ ranks: also run a probe GPT with `execute` (single with large and small micro-batches, tensor "
        "and data parallel, ~1 min) to measure what the framework adds around kernels on the compute cores "
        "(per-layer calls, sharded-tensor dispatch, gradient packing). "
        "Default: on, except with --quick.",
    ),
    timeout: float = typer.Option(900.0, "--timeout", help="Give up when the benchmark ranks take longer (seconds)."),
    force: bool = typer.Option(False, "--force", help="Replace existing output files."),
) -> None:
    """Measure this machine and write its cluster spec."""
    try:
        _calibrate(
            out_file,
            device_out,
            name,
            ranks,
            quick,
            storage_dir,
            curve_dtype,
            baseline,
            raw_out,
            timeout,
            force,
            framework,
        )
    except UserError as exc:
        err.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from None


calibrate_command.__doc__ = HELP


def _calibrate(
    out_file,
    device_out,
    name,
    ranks,
    quick,
    storage_dir,
    curve_dtype,
    baseline,
    raw_out,
    timeout,
    force,
    framework=False,
) -> None:
    # Imported here so that `--help` answers without loading torch.
    from executor.calibrate import run as cal_mod
    from executor.calibrate.measure import RichProgress
    from hwmodel.catalog import load_cluster

    # Every option is checked before the first measurement: a typo costs nothing.
    check_output(out_file, "--out", YAML, force)
    if device_out is not None:
        check_output(device_out, "--device-out", YAML, force)
    if raw_out is not None:
        check_output(raw_out, "--raw", JSON, force)
    cal_mod.check_outputs(out_file, device_out, force)  # and the rules of the calibration itself
    cal_mod.resolve_options(
        ranks=ranks,
        quick=quick,
        storage_dir=storage_dir,
        name=name or cal_mod.DEFAULT_NAME,
        curve_dtype=curve_dtype,
        timeout_s=timeout,
    )
    baseline_cluster = load_cluster(baseline) if baseline else None
    start = time.monotonic()
    with progress_bar(
        err, TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
    ) as progress:
        cal = cal_mod.calibrate(
            ranks=ranks,
            quick=quick,
            storage_dir=storage_dir,
            name=name or cal_mod.DEFAULT_NAME,
            curve_dtype=curve_dtype,
            timeout_s=timeout,
            progress=RichProgress(progress),
        )
        num_ranks = cal.cluster.node_groups[0].node.num_devices
        if (framework if framework is not None else not quick) and cal.device.kind == "cpu" and num_ranks >= 2:
            _calibrate_framework(cal, num_ranks, cal_mod.threads_per_rank(num_ranks), progress, timeout)
    cal_mod.write_calibration(cal, out_file, device_out, force, raw_out)
    if baseline_cluster is None and cal.device.kind == "cpu":
        baseline_cluster = load_cluster("cpu-local")
    base_device = baseline_cluster.node_groups[0].node.device if baseline_cluster is not None else None
    _print_summary(cal, cal_mod, base_device, baseline_cluster)
    for path in (out_file, device_out, raw_out):
        if path is not None:
            report_written(path, err)
    out.print(
        f"calibrated in {time.monotonic() - start:.0f} s; "
        f"use it with: simulate run --cluster {out_file} --workload ... --plan ...",
        highlight=False,
    )


def _calibrate_framework(cal, ranks: int, threads: int, progress: Progress, timeout: float) -> None:
    """Add the framework's costs on the compute cores to the calibrated device (executor/calibrate/framework.py)."""
    from executor.calibrate import framework as fw
    from hwmodel.cluster import ClusterSpec
    from hwmodel.loading import validate
    from hwmodel.units import format_bandwidth, format_seconds

    task = progress.add_task("framework overhead", total=fw.probe_count())
    fit = fw.calibrate_framework(cal.cluster_mapping, ranks, threads, lambda: progress.advance(task), timeout)
    values = {
        "blocking_collectives": True,
        "sharded_kernel_overhead": format_seconds(fit.sharded_kernel_overhead, digits=3),
        "dp_layer_overhead": format_seconds(fit.dp_layer_overhead, digits=3),
        "layer_call_overhead": format_seconds(fit.layer_call_overhead, digits=3),
    }
    if fit.grad_pack_bandwidth is not None:
        values["grad_pack_bandwidth"] = format_bandwidth(fit.grad_pack_bandwidth, digits=4)
    for mapping in {
        id(m): m for m in (cal.device_mapping, cal.cluster_mapping["node_groups"][0]["node"]["device"])
    }.values():
        mapping["compute"].update(values)
        for key in values:
            mapping.setdefault("sources", {})[f"compute.{key}"] = (
                fw.BLOCKING_SOURCE
                if key == "blocking_collectives"
                else fit.source(time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
            )
    cal.cluster = validate(ClusterSpec, cal.cluster_mapping, "calibrated cluster")
    cal.device = cal.cluster.node_groups[0].node.device
    for row in fit.rows:
        cal.notes.append(
            f"framework probe {row['probe']} {row['plan']}: measured {row['measured_s'] * 1e3:.0f} ms, predicted "
            f"{row['predicted_before_s'] * 1e3:.0f} ms without framework costs, "
            f"{row['predicted_after_s'] * 1e3:.0f} ms with them"
        )


def _print_summary(cal, cal_mod, base_device, baseline_cluster) -> None:
    base_label = f"catalog {baseline_cluster.name}" if baseline_cluster is not None else "baseline"
    table = Table(title=f"measured on this machine vs {base_label}", title_justify="left")
    for col in ("figure", "measured", base_label, "ratio"):
        table.add_column(col, justify="left" if col == "figure" else "right")
    for row in cal_mod.summary_rows(cal, base_device, baseline_cluster):
        table.add_row(*row)
    out.print(table)
    fits = Table(
        title="how well the spec reproduces the measurements (|predicted / measured - 1|)",
        title_justify="left",
        caption="before: the median with one set of curves shared by all dtypes, or one link figure for every "
        "collective kind, on the same timings",
        caption_justify="left",
    )
    for col in ("timing", "median", "max", "before"):
        fits.add_column(col, justify="left" if col == "timing" else "right")
    for row in cal_mod.fit_rows(cal):
        fits.add_row(*row)
    out.print(fits)
    notes = list(cal.notes)
    for what, why in cal.raw.get("unsupported", {}).items():
        notes.append(f"{what}: {why}")
    dropout = cal.fits.get("dropout")
    if dropout:
        big = max(dropout, key=lambda p: p["elems"])
        notes.append(
            f"dropout costs {big['seconds'] / big['elems'] * 1e9:.3g} ns per element (fp32, {big['elems']} elements); "
            "the simulator counts it as 2 FLOPs per element, so runs with dropout take longer than predicted"
        )
    if cal.device.kind == "cpu":
        notes.append("host-device copies: none on a CPU; the host link is an in-memory copy")
    for note in notes:
        out.print(f"note: {escape(note)}", highlight=False)


app = typer.Typer(name="calibrate", help=HELP, add_completion=False, pretty_exceptions_enable=False)
app.command(name="calibrate", help=HELP)(calibrate_command)


def main() -> None:
    """Console entry point: user errors become a message and exit status 2, never a traceback."""
    run_app(app, err)


if __name__ == "__main__":
    main()
