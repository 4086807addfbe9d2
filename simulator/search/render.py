"""The table every training-throughput planner prints: the chosen plan, the runners-up and the baselines,
with throughput, MFU, peak memory and the speedup of the chosen plan over each."""

from __future__ import annotations

from rich.console import Console, JustifyMethod
from rich.table import Table

from hwmodel.units import format_bytes, format_seconds
from simulator.report import Report
from simulator.search.result import SearchResult


def _rate(per_s: float) -> str:
    """Samples per second readable at every scale: a million-token sample takes minutes (0.00142, not 0.00)."""
    return f"{per_s:,.2f}" if per_s >= 1 else f"{per_s:.3g}"


def render_search(result: SearchResult, console: Console, title: str) -> None:
    best = result.best.report
    assert isinstance(best, Report), "render_search draws training Reports; planners with other reports draw their own"
    table = Table(title=title, title_justify="left")
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("", "left"),
        ("plan", "left"),
        ("iteration", "right"),
        ("samples/s", "right"),
        ("MFU", "right"),
        ("peak memory", "right"),
        ("best is", "right"),
    )
    for column, justify in columns:
        table.add_column(column, justify=justify, overflow="fold")

    def row(label: str, shorthand: str, report: Report | None, reason: str | None, style: str | None = None) -> None:
        if report is None:
            table.add_row(label, shorthand, "-", "-", "-", "-", f"[red]{reason or 'infeasible'}[/red]", style=style)
            return
        speedup = best.samples_per_s / report.samples_per_s if report.samples_per_s > 0 else float("inf")
        table.add_row(
            label,
            shorthand,
            format_seconds(report.iteration_time_s),
            _rate(report.samples_per_s),
            f"{100 * report.mfu:.1f}%",
            format_bytes(report.peak_memory_bytes),
            f"{speedup:.2f}x",
            style=style,
        )

    for i, candidate in enumerate(result.candidates or [result.best]):
        assert isinstance(candidate.report, Report), "a planner's candidates carry reports of one kind"
        row(
            "chosen" if i == 0 else f"#{i + 1}",
            candidate.plan.shorthand(sections=True),
            candidate.report,
            None,
            "bold green" if i == 0 else None,
        )
    for baseline in result.baselines:
        report = baseline.report if isinstance(baseline.report, Report) else None
        row(baseline.name, baseline.plan.shorthand(sections=True) if baseline.plan else "-", report, baseline.reason)
    console.print(table)
    console.print(f"searched in {result.search_time_s:.2f} s")
