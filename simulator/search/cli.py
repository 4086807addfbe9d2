"""`simulate search`: planners that choose a plan for you. Each planner is a package under
`simulator/search/` and one line of `simulator.search.registry.PLANNERS`; every one prints the chosen plan
beside the baselines and shares the `--json` shape of `simulator.search.result.SearchResult`."""

from __future__ import annotations

import typer
from rich.table import Table

from hwmodel.cli_common import make_console
from simulator.search.registry import PLANNERS

search_app = typer.Typer(
    help=(
        "Search for the best plan under your constraints and compare it with the plans a user would pick by "
        "hand. Every planner prints the chosen plan beside the baselines; --json prints "
        '{"best", "candidates", "baselines", "search_time_s"}; --out writes the plan for `execute --plan`. '
        "`simulate search list` shows the planners."
    ),
    no_args_is_help=True,
)


@search_app.command("list")
def list_planners() -> None:
    """List the planners: the published system each follows, what it maximizes and what it reports."""
    table = Table(title="Planners (simulate search NAME --help)", show_edge=False)
    for column in ("name", "system", "objective", "report"):
        table.add_column(column, no_wrap=column == "name")
    for p in PLANNERS:
        table.add_row(p.name, p.system, p.objective, p.report_type)
    make_console().print(table)


for _planner in PLANNERS:
    search_app.command(_planner.name)(_planner.command())
