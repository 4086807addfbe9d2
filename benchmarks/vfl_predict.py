"""Predicted against measured time per epoch of the VFL runs through the shaped WAN (issue 7's accuracy check).

Reads the executor's runs (`benchmarks/results/vfl_measured.json`, written by `benchmarks/vfl_wan.py`), and
for each run predicts its time per epoch with the simulator: the two parties of the cluster (default
`two-sites-wan`; each party one `cpu` device, as each runs one thread) with the WAN replaced by the run's
link (its line rate and one-way delay; the spec's 90% efficiency is kept), the run's mode, W, R, sampling
and weighting, simulated over as many epochs as were measured. Prints the median epoch time of both and the
error; the target is 15% for vanilla VFL and CELU-VFL at both link settings.

    .venv/bin/python benchmarks/vfl_predict.py                      # the catalog cpu device
    .venv/bin/python benchmarks/vfl_predict.py --calibrate          # this machine, measured first (~1-3 min)
    .venv/bin/python benchmarks/vfl_predict.py --device dev.yaml    # a device from `execute calibrate --device-out`

With the time-to-target AUC as well, where the runs recorded AUC curves and the statistical-efficiency model
of the workload is stored (`benchmarks/vfl_fit.py` fits it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as a script (python benchmarks/vfl_predict.py): the repository's packages are importable only after this line,
# hence the imports below it carry noqa: E402.
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from hwmodel.catalog import load_cluster, load_device  # noqa: E402
from hwmodel.errors import UserError  # noqa: E402
from simulator.search.vfl.costs import default_sites, timing_model  # noqa: E402
from simulator.search.vfl.efficiency import load_efficiency  # noqa: E402
from simulator.search.vfl.engine import LOCK_POLICIES, simulate_mode  # noqa: E402
from simulator.search.vfl.measured import MeasuredRun, load_measured  # noqa: E402
from simulator.search.vfl.search import with_wan  # noqa: E402

DEFAULT_MEASURED = ROOT / "benchmarks" / "results" / "vfl_measured.json"
TARGET = 0.15


def calibrated_device(out_dir: Path, quick: bool):
    """Measure this machine as 2 one-core devices (both parties share it, one thread each), as `execute` runs them."""
    cluster, device = out_dir / "cluster.yaml", out_dir / "device.yaml"
    command = [
        str(ROOT / ".venv" / "bin" / "execute"),
        "calibrate",
        "--ranks",
        "2",
        "--out",
        str(cluster),
        "--device-out",
        str(device),
        "--no-framework",
        "--curve-dtype",
        "fp32",
    ] + (["--quick"] if quick else [])
    subprocess.run(command, check=True)
    return load_device(str(device))


def timeline_of(run: MeasuredRun, base_cluster, lock: str):
    cluster = with_wan(base_cluster, run.bandwidth, run.latency_s)
    model = timing_model(run.workload, cluster, default_sites(cluster), run.mode, run.weighting)
    return simulate_mode(model, run.mode, run.workset, run.local_updates, full=True, lock=lock, sampling=run.sampling)


def predicted_epochs(run: MeasuredRun, base_cluster, lock: str) -> list[float]:
    timeline = timeline_of(run, base_cluster, lock)
    per_epoch = timeline.rounds_per_epoch
    return [
        timeline.time_for((i + 1) * per_epoch) - timeline.time_for(i * per_epoch) for i in range(len(run.epoch_times_s))
    ]


def time_to_target_rows(runs: list[MeasuredRun], cluster, lock: str) -> list[dict]:
    """Predicted (timeline x stored statistical-efficiency model) against measured time to the benchmark's target."""
    rows = []
    for run in runs:
        if run.target_auc is None or not run.evals:
            continue
        efficiency = load_efficiency(run.workload.name)
        timeline = timeline_of(run, cluster, lock)
        rounds = efficiency.mode_rounds_to(run.target_auc, timeline, run.mode == "celu" and run.weighting)
        measured = run.time_to(run.target_auc)
        rows.append(
            {
                "run": run.name,
                "mode": run.label,
                "workset": run.workset,
                "local_updates": run.local_updates,
                "target_auc": run.target_auc,
                "measured_s": measured,
                "predicted_s": timeline.time_for(rounds),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--measured", type=Path, default=DEFAULT_MEASURED, help="the runs (default %(default)s)")
    parser.add_argument("--cluster", default="two-sites-wan", help="cluster whose two sites are the parties")
    parser.add_argument(
        "--device", help="device YAML replacing the cluster's cpu device (a calibration of this machine)"
    )
    parser.add_argument("--calibrate", action="store_true", help="calibrate this machine first (execute calibrate)")
    parser.add_argument("--quick", action="store_true", help="with --calibrate: the ~20 s sweep")
    parser.add_argument(
        "--lock",
        choices=LOCK_POLICIES,
        default="fifo",
        help="how a party's model lock is handed over between its main loop and local updates",
    )
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    console = Console(width=max(Console().width, 110))
    try:
        runs = load_measured(args.measured)
        cluster = load_cluster(args.cluster)
        source = "catalog cpu device"
        if args.calibrate:
            with tempfile.TemporaryDirectory(prefix="vfl-predict-") as tmp:
                device = calibrated_device(Path(tmp), args.quick)
            cluster, source = cluster.with_device("cpu", device), "this machine, calibrated now"
        elif args.device:
            cluster, source = cluster.with_device("cpu", load_device(args.device)), args.device
        rows = []
        for run in (r for r in runs if r.epoch_times_s):
            by_lock = {lock: statistics.median(predicted_epochs(run, cluster, lock)) for lock in LOCK_POLICIES}
            predicted = by_lock[args.lock]
            measured = run.epoch_time_s
            rows.append(
                {
                    "run": run.name,
                    "kind": run.kind,
                    "link": run.link_label,
                    "mode": run.label,
                    "workset": run.workset,
                    "local_updates": run.local_updates,
                    "epochs": len(run.epoch_times_s),
                    "measured_epoch_s": measured,
                    "predicted_epoch_s": predicted,
                    "predicted_by_lock_s": by_lock,
                    "error": predicted / measured - 1,
                }
            )
        targets = time_to_target_rows(runs, cluster, args.lock)
    except UserError as exc:
        console.print(f"[bold red]error:[/bold red] {exc}")
        sys.exit(2)
    if args.json:
        print(json.dumps({"epochs": rows, "time_to_target": targets}, indent=2))
        return
    table = Table(
        title=f"VFL time per epoch, predicted ({source}, lock {args.lock}) against measured (median)",
        title_justify="left",
    )
    other = next(lock for lock in LOCK_POLICIES if lock != args.lock)
    for column in ("link", "mode", "W", "R", "epochs", "measured", "predicted", "error", f"({other})"):
        table.add_column(column, justify="left" if column in ("link", "mode") else "right")
    for row in rows:
        checked = row["mode"] in ("vanilla", "CELU-VFL")
        style = "" if not checked else ("green" if abs(row["error"]) <= TARGET else "red")
        table.add_row(
            row["link"],
            row["mode"],
            str(row["workset"]),
            str(row["local_updates"]),
            str(row["epochs"]),
            f"{row['measured_epoch_s']:.2f} s",
            f"{row['predicted_epoch_s']:.2f} s",
            f"[{style}]{100 * row['error']:+.1f}%[/{style}]" if style else f"{100 * row['error']:+.1f}%",
            f"{row['predicted_by_lock_s'][other]:.2f} s",
        )
    console.print(table)
    checked = [r for r in rows if r["mode"] in ("vanilla", "CELU-VFL")]
    within = sum(abs(r["error"]) <= TARGET for r in checked)
    console.print(
        f"vanilla and CELU-VFL within {TARGET:.0%}: {within} of {len(checked)}; median |error| "
        f"{100 * statistics.median(abs(r['error']) for r in rows):.1f}% over all {len(rows)} runs"
    )

    if targets:
        table = Table(
            title=f"Time to AUC {targets[0]['target_auc']:.4f} (the benchmark's target), predicted with the "
            "stored efficiency model against measured (first evaluation at or above it)",
            title_justify="left",
        )
        for column in ("mode", "W", "R", "measured", "predicted", "error"):
            table.add_column(column, justify="left" if column == "mode" else "right")
        for row in targets:
            measured = row["measured_s"]
            table.add_row(
                row["mode"],
                str(row["workset"]),
                str(row["local_updates"]),
                "not reached" if measured is None else f"{measured:.1f} s",
                f"{row['predicted_s']:.1f} s",
                "-" if measured is None else f"{100 * (row['predicted_s'] / measured - 1):+.1f}%",
            )
        console.print(table)
        console.print("measured times are at evaluation points (every eval_every rounds), so they round up")
        stored = load_efficiency(runs[0].workload.name).provenance.get("measured_sha256")
        if stored == hashlib.sha256(args.measured.read_bytes()).hexdigest()[:16]:
            console.print(
                "the efficiency model was fitted to these runs' AUC curves: the AUC side is in-sample, the "
                "time per round is not"
            )


if __name__ == "__main__":
    main()
