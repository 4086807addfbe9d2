"""`execute paging`: paged training of an MLP whose layer pages live in a device pool with a hard budget, a
host pool and checksummed page files under --page-dir; prints each step's loss and the bytes it moved."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import typer

from executor.paging.train import MlpShape, train_paged
from hwmodel.cli_common import make_console
from hwmodel.errors import UserError


def paging_command(
    page_dir: Path = typer.Option(..., "--page-dir", help="Folder for the page files (checked before training)."),
    layers: int = typer.Option(8, "--layers", help="MLP layers, one page each."),
    width: int = typer.Option(256, "--width", help="MLP width."),
    device_pages: int = typer.Option(2, "--device-pages", help="Device pool budget in pages (enforced)."),
    host_pages: int = typer.Option(2, "--host-pages", help="Pages homed in host memory; the rest on SSD."),
    steps: int = typer.Option(10, "--steps", help="Training steps."),
    staleness: int = typer.Option(0, "--staleness", help="0: synchronous update; 1: lock-free, one step late."),
) -> None:
    """Train with model states in pages over a device budget, host memory and SSD page files."""
    for name, value, low in (("--layers", layers, 1), ("--width", width, 1), ("--steps", steps, 1)):
        if value < low:
            raise UserError(f"{name} must be at least {low}, got {value}")
    if device_pages < 1:
        raise UserError(f"--device-pages must be at least 1 (a block's page), got {device_pages}")
    if not 0 <= host_pages <= layers:
        raise UserError(f"--host-pages must be between 0 and --layers ({layers}), got {host_pages}")
    if staleness not in (0, 1):
        raise UserError(f"--staleness must be 0 or 1, got {staleness}")
    rng = np.random.default_rng(0)
    batch = (rng.normal(size=(32, width)), rng.normal(size=(32, width)))
    shape = MlpShape((width,) * (layers + 1))
    losses, moved = train_paged(shape, [batch] * steps, page_dir, device_pages, host_pages, staleness)
    console = make_console()
    for t, (loss, m) in enumerate(zip(losses, moved, strict=True), start=1):
        console.print(
            f"step {t}: loss {loss:.6f}  host->device {m['h2d'] / 1e6:.2f} MB  SSD read {m['ssd_read'] / 1e6:.2f} MB"
            f"  SSD write {m['ssd_write'] / 1e6:.2f} MB"
        )
