"""Human-readable output of `execute`: the measured run, and predicted vs measured side by side."""

from __future__ import annotations

from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from hwmodel.units import format_bytes, format_seconds
from simulator.render import causal_in_full_note
from simulator.report import Report

# (label, how to read the field from a Report, how to print it)
COMPARED = (
    ("iteration time", lambda r: r.iteration_time_s, format_seconds),
    ("tokens/s", lambda r: r.tokens_per_s, lambda v: f"{v:,.0f}"),
    ("samples/s", lambda r: r.samples_per_s, lambda v: f"{v:,.2f}"),
    ("MFU", lambda r: r.mfu, lambda v: f"{100 * v:.2f}%"),
    ("HFU", lambda r: r.hfu, lambda v: f"{100 * v:.2f}%"),
    ("peak memory", lambda r: r.peak_memory_bytes, format_bytes),
    ("  weights", lambda r: r.memory_bytes.weights, format_bytes),
    ("  gradients", lambda r: r.memory_bytes.gradients, format_bytes),
    ("  optimizer", lambda r: r.memory_bytes.optimizer, format_bytes),
    ("  activations", lambda r: r.memory_bytes.activations, format_bytes),
    ("  buffers", lambda r: r.memory_bytes.buffers, format_bytes),
)


def relative_error(predicted: float, measured: float) -> float | None:
    """(predicted - measured) / measured; None when nothing was measured."""
    return (predicted - measured) / measured if measured else None


def render_measured(report: Report, losses: list[float], first_step: int, device: str, console: Console) -> None:
    mem = report.memory_bytes
    loss_line = (
        f"loss {losses[0]:.4f} at iteration {first_step} -> {losses[-1]:.4f} at iteration "
        f"{first_step + len(losses) - 1}"
        if losses
        else "no iterations ran"
    )
    headline = (
        f"[bold]{report.workload}[/bold] on [bold]{report.cluster}[/bold] ({report.num_devices} x {device}), "
        f"plan [cyan]{report.plan.shorthand()}[/cyan]\n"
        f"iteration [bold]{format_seconds(report.iteration_time_s)}[/bold] (median) for "
        f"{report.global_batch} sequences of {report.seq_len} tokens ({report.num_micro_batches} micro-batches)\n"
        f"throughput [bold]{report.tokens_per_s:,.0f} tokens/s[/bold] = {report.samples_per_s:,.2f} samples/s   "
        f"MFU [bold]{100 * report.mfu:.2f}%[/bold]{causal_in_full_note(report)}   HFU {100 * report.hfu:.2f}%\n"
        f"peak memory [bold]{format_bytes(report.peak_memory_bytes)}[/bold] on rank {report.peak_memory_device} "
        f"(weights {format_bytes(mem.weights)}, gradients {format_bytes(mem.gradients)}, optimizer "
        f"{format_bytes(mem.optimizer)}, activations {format_bytes(mem.activations)}, buffers "
        f"{format_bytes(mem.buffers)})\n"
        f"{loss_line}"
    )
    console.print(Panel(headline, title="measured", expand=False))
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)


def render_comparison(predicted: Report, measured: Report, console: Console) -> None:
    """Predicted vs measured, field by field, with the signed error of the prediction."""
    table = Table(
        title=f"{measured.workload} on {measured.cluster}, plan {measured.plan.shorthand()}: predicted vs measured",
        show_edge=False,
    )
    table.add_column("field")
    for col in ("predicted", "measured", "error"):
        table.add_column(col, justify="right", no_wrap=True)
    for label, field, fmt in COMPARED:
        p, m = field(predicted), field(measured)
        err = relative_error(p, m)
        if err is None:
            shown = "-"
        else:
            color = "green" if abs(err) <= 0.15 else ("yellow" if abs(err) <= 0.5 else "red")
            shown = f"[{color}]{100 * err:+.1f}%[/{color}]"
        table.add_row(label, fmt(p), fmt(m), shown)
    console.print(table)
    console.print(
        "error = (predicted - measured) / measured. On CPU the measured memory is an account of model states and "
        "saved activations (no allocator); buffers are not measured there.",
        highlight=False,
    )
