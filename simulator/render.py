"""Human-readable output: reports, comparison tables and spec listings, drawn with rich."""

from __future__ import annotations

from collections.abc import Iterable

from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from hwmodel.units import format_bytes, format_seconds
from simulator.report import Report

BREAKDOWN_LABELS = {
    "compute": "compute",
    "recompute": "recompute (activation checkpointing)",
    "exposed_communication": "communication not hidden behind compute",
    "pipeline_bubble": "pipeline bubble (idle stages)",
    "offload_stall": "waiting for activation offload copies",
    "optimizer": "optimizer step",
}


def causal_in_full_note(report: Report) -> str:
    """' (causal scores in full, as Megatron-LM counts: 62.7%)' where that convention (Megatron-LM's, PaLM's,
    llm-foundry's, and most papers') reads differently from ours (long causal sequences); '' otherwise."""
    full = report.mfu_causal_in_full
    if full is None or abs(full - report.mfu) < 0.0005:
        return ""
    return f" (causal scores in full, as Megatron-LM counts: {100 * full:.1f}%)"


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:5.1f}%" if whole > 0 else "  -  "


def _bar(part: float, whole: float, width: int = 24) -> str:
    filled = round(width * part / whole) if whole > 0 else 0
    return "█" * filled + "·" * (width - filled)


def render_report(report: Report, console: Console) -> None:
    fits = "[green]fits[/green]" if report.fits_memory else "[bold red]does NOT fit[/bold red]"
    headline = (
        f"[bold]{report.workload}[/bold] on [bold]{report.cluster}[/bold] ({report.num_devices} devices), "
        f"stack [bold]{report.stack}[/bold]{'' if report.plan.stack else ' (default)'}, "
        f"plan [cyan]{report.plan.shorthand()}[/cyan]\n"
        f"iteration [bold]{format_seconds(report.iteration_time_s)}[/bold] for {report.global_batch} sequences of "
        f"{report.seq_len} tokens ({report.num_micro_batches} micro-batches)\n"
        f"throughput [bold]{report.tokens_per_s:,.0f} tokens/s[/bold] = {report.samples_per_s:,.2f} samples/s, "
        f"{report.tokens_per_s / report.num_devices:,.0f} tokens/s per device\n"
        f"MFU [bold]{100 * report.mfu:.1f}%[/bold]{causal_in_full_note(report)}   HFU {100 * report.hfu:.1f}%   "
        f"peak memory [bold]{format_bytes(report.peak_memory_bytes)}[/bold] of "
        f"{format_bytes(report.memory_capacity_bytes)} per device: {fits}"
    )
    if report.host_memory_bytes:
        headline += (
            f"\nhost memory for swapped activations {format_bytes(report.host_memory_bytes)} on the fullest node"
        )
    console.print(Panel(headline, title=f"prediction ({report.engine})", expand=False))

    times = Table(title="Where the iteration time goes", show_edge=False)
    times.add_column("part")
    times.add_column("time", justify="right")
    times.add_column("share", justify="right")
    times.add_column("")
    total = report.iteration_time_s
    for key, label in BREAKDOWN_LABELS.items():
        value = getattr(report.time_breakdown_s, key)
        times.add_row(label, format_seconds(value), _pct(value, total), _bar(value, total))

    memory = Table(title=f"Memory of the fullest device (rank {report.peak_memory_device})", show_edge=False)
    memory.add_column("part")
    memory.add_column("bytes", justify="right")
    memory.add_column("share", justify="right")
    mem = report.memory_bytes
    for key in ("weights", "gradients", "optimizer", "activations", "buffers"):
        value = getattr(mem, key)
        memory.add_row(key, format_bytes(value), _pct(value, mem.total))
    memory.add_row("[bold]total[/bold]", f"[bold]{format_bytes(mem.total)}[/bold]", "")
    console.print(times)
    console.print(memory)

    if len(report.stages) > 1:
        stages = Table(title="Pipeline stages", show_edge=False)
        for col in (
            "stage",
            "layers",
            "devices",
            "device",
            "tp",
            "dp",
            "fwd/micro-batch",
            "bwd/micro-batch",
            "peak memory",
        ):
            stages.add_column(col, justify="right" if col not in ("device",) else "left")
        for s in report.stages:
            stages.add_row(
                str(s.index),
                f"{s.first_layer}-{s.last_layer}",
                str(s.num_devices),
                s.device,
                str(s.tp),
                str(s.dp),
                format_seconds(s.forward_s),
                format_seconds(s.backward_s),
                format_bytes(s.peak_memory_bytes),
            )
        console.print(stages)
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")


def render_comparison(rows: list[dict], console: Console, title: str, key_columns: Iterable[str]) -> None:
    """A table of one row per configuration, the best feasible one marked; reasons for rows that cannot
    run are listed under the table (they are sentences, not cells)."""
    table = Table(title=title, show_edge=False)
    key_columns = list(key_columns)
    for col in key_columns:
        table.add_column(col, no_wrap=True)
    for col in ("iteration", "tokens/s", "MFU", "memory"):
        table.add_column(col, justify="right", no_wrap=True, min_width=len(col))
    table.add_column("note", no_wrap=True)
    feasible = [r for r in rows if r.get("report") and r["report"].fits_memory]
    best = max(feasible, key=lambda r: r["report"].tokens_per_s) if feasible else None
    reasons = []
    for row in rows:
        report: Report | None = row.get("report")
        keys = [str(row[c]) for c in key_columns]
        if report is None:
            reasons.append(row.get("reason", ""))
            table.add_row(*keys, "-", "-", "-", "-", f"[red]cannot run [{len(reasons)}][/red]")
            continue
        memory = format_bytes(report.peak_memory_bytes)
        if report.fits_memory:
            note = "[bold green]best[/bold green]" if row is best else ""
        else:
            memory = f"[red]{memory}[/red]"
            note = "[red]OOM[/red]"
        table.add_row(
            *keys,
            format_seconds(report.iteration_time_s),
            f"{report.tokens_per_s:,.0f}",
            f"{100 * report.mfu:.1f}%",
            memory,
            note,
        )
    console.print(table)
    for i, reason in enumerate(reasons, start=1):
        console.print(f"  [{i}] {reason}", highlight=False, markup=False)
