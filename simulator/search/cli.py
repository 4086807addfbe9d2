"""`simulate search`: planners that choose a plan for you. Each planner lives in its own module and adds
one command here; all print the chosen plan beside the baselines and share the `--json` shape of
`simulator.search.result.SearchResult`."""

from __future__ import annotations

import typer

search_app = typer.Typer(
    help=(
        "Search for the best plan under your constraints and compare it with the plans a user would pick by "
        "hand. Every planner prints the chosen plan beside the baselines; --json prints "
        '{"best", "candidates", "baselines", "search_time_s"}; --out writes the plan for `execute --plan`.'
    ),
    no_args_is_help=True,
)

# Planners register below, one line each: search_app.command("name")(command_function)
from ..memo.cli import memo_command  # noqa: E402
search_app.command("memo")(memo_command)
from ..vfl.cli import vfl_command  # noqa: E402
search_app.command("vfl")(vfl_command)
from .galvatron_cli import galvatron_command  # noqa: E402
search_app.command("galvatron")(galvatron_command)
