"""`execute`: run a plan on real devices and report what happened next to the prediction.

This release ships the command's interface only; running plans arrives with the executor issue.
"""

from __future__ import annotations

import sys

import typer

app = typer.Typer(
    name="execute",
    help=(
        "Run a training plan on real devices (one process per device, or under torchrun across nodes), "
        "measure iteration time, throughput and memory, and compare with the simulator's prediction.\n\n"
        "Not available yet in this release: today it only prints this help. Use `simulate run` to predict a plan."
    ),
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback(invoke_without_command=True)
def execute(ctx: typer.Context) -> None:
    """Print what execute will do and exit."""
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(0)


def main() -> None:
    app()
    sys.exit(0)


if __name__ == "__main__":
    main()
