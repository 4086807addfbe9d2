"""Fit the VFL statistical-efficiency model to executor runs and store it with the workload.

Reads the runs of `benchmarks/results/vfl_measured.json` (from `benchmarks/vfl_wan.py`): the vanilla runs'
AUC-against-rounds points fit the vanilla curve; each FedBCD and CELU-VFL run is simulated on its own link
(its mode, W, R, sampling, weighting) to get its local updates' staleness and repeats, and the value of a
local update (rho, tau, kappa; `simulator/search/vfl/efficiency.py`) is fitted so that each run's AUC after n rounds
matches the vanilla curve at its progress (n plus what its local updates were worth): weighted CELU-VFL runs
fit `local`, FedBCD and the runs without weighting fit `local_unweighted`, all with the curve at once (where
the runs with local updates level off tells the curve's limit, which a short vanilla run cannot). Writes
`simulator/search/vfl/data/<workload>.json` with the fit's provenance (the runs, the file's hash, the
residuals) and prints measured against fitted AUC.

    .venv/bin/python benchmarks/vfl_fit.py                 # fit and print; --write stores the result
    .venv/bin/python benchmarks/vfl_fit.py --write --force # replace a stored fit
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as a script (python benchmarks/vfl_fit.py): the repository's packages are importable only after this line,
# hence the imports below it carry noqa: E402.
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from hwmodel.catalog import load_cluster  # noqa: E402
from hwmodel.errors import UserError  # noqa: E402
from simulator.search.vfl.costs import default_sites, timing_model  # noqa: E402
from simulator.search.vfl.efficiency import EfficiencyModel, data_file, fit_jointly, load_efficiency  # noqa: E402
from simulator.search.vfl.engine import simulate_mode  # noqa: E402
from simulator.search.vfl.measured import MeasuredRun, load_measured  # noqa: E402
from simulator.search.vfl.search import with_wan  # noqa: E402

DEFAULT_MEASURED = ROOT / "benchmarks" / "results" / "vfl_measured.json"


ALL_POINTS = False  # --all-points


def points(run: MeasuredRun) -> tuple[list[float], list[float]]:
    """(rounds, test AUC) of a run's evaluations, up to its best AUC: the model's curves only rise, and what
    comes after the peak (overfitting a small data set) says nothing about the time to reach a target."""
    evals = [e for e in run.evals if e.get("auc") is not None and e.get("round", 0) > 0]
    if evals and not ALL_POINTS:
        best = max(range(len(evals)), key=lambda i: evals[i]["auc"])
        evals = evals[: best + 1]
    return [float(e["round"]) for e in evals], [float(e["auc"]) for e in evals]


def timeline_of(run: MeasuredRun, cluster):
    cfg = run.workload
    link = with_wan(cluster, run.bandwidth, run.latency_s)
    model = timing_model(cfg, link, default_sites(link), run.mode, run.weighting)
    # The staleness over the whole run (a long start-up shows in the first epoch's AUC too).
    return simulate_mode(model, run.mode, run.workset, run.local_updates, full=True, sampling=run.sampling)


def _shown(path: Path) -> str:
    """`path` relative to the repository where it lies inside it."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--measured", type=Path, default=DEFAULT_MEASURED, help="the runs (default %(default)s)")
    parser.add_argument("--cluster", default="two-sites-wan", help="cluster whose two sites are the parties")
    parser.add_argument("--all-points", action="store_true", help="fit every evaluation, also after a run's best AUC")
    parser.add_argument(
        "--write", action="store_true", help="store the fit in simulator/search/vfl/data/<workload>.json"
    )
    parser.add_argument("--force", action="store_true", help="with --write: replace a stored fitted model")
    args = parser.parse_args()
    global ALL_POINTS
    ALL_POINTS = args.all_points
    console = Console(width=max(Console().width, 110))
    try:
        runs = load_measured(args.measured)
        cluster = load_cluster(args.cluster)
        workloads = sorted({r.workload.name for r in runs})
        if len(workloads) != 1:
            raise UserError(f"the runs mix workloads ({', '.join(workloads)}); fit one at a time")
        workload = workloads[0]
        vanilla = [r for r in runs if r.mode == "vanilla" and points(r)[0]]
        if not vanilla:
            raise UserError("no vanilla run with AUC evaluations: the vanilla curve cannot be fitted")
        rounds = [n for r in vanilla for n in points(r)[0]]
        weighted, unweighted, used = [], [], []
        for run in runs:
            if run.mode == "vanilla" or not points(run)[0]:
                continue
            e, a = points(run)
            entry = (timeline_of(run, cluster), e, a)
            (weighted if run.mode == "celu" and run.weighting else unweighted).append(entry)
            used.append(run)
        curve, local, local_unweighted = fit_jointly([points(r) for r in vanilla], weighted, unweighted)
        prior = load_efficiency(workload) if data_file(workload).is_file() else None
        if local is None:
            local = local_unweighted or (prior.local if prior else None)
        if local is None:
            raise UserError("no FedBCD or CELU-VFL run with AUC evaluations: the local-update value cannot be fitted")
        model = EfficiencyModel(
            workload=workload,
            curve=curve,
            local=local,
            local_unweighted=local_unweighted or local,
            reference_rounds=max(rounds),
            fitted=True,
            provenance={
                "source": f"benchmarks/vfl_fit.py --measured {_shown(args.measured)}",
                "measured_sha256": hashlib.sha256(args.measured.read_bytes()).hexdigest()[:16],
                "fitted_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "runs": [
                    f"{r.name}: {r.label} W={r.workset} R={r.local_updates}, {r.link_label}" for r in vanilla + used
                ],
                "cluster": args.cluster,
            },
        )
    except UserError as exc:
        console.print(f"[bold red]error:[/bold red] {exc}")
        sys.exit(2)

    table = Table(title=f"{workload}: measured test AUC against the fitted model", title_justify="left")
    for column in ("run", "W", "R", "to round", "measured", "fitted", "RMS error", "worth"):
        table.add_column(column, justify="left" if column == "run" else "right", no_wrap=column == "run")
    residuals = []
    for run in vanilla + used:
        e, a = points(run)
        timeline, weighted = timeline_of(run, cluster), run.mode == "celu" and run.weighting
        worth = model.round_worth(timeline, weighted)
        fitted = model.auc_after(e, timeline, weighted)
        errors = fitted - np.asarray(a)
        residuals.extend(errors.tolist())
        table.add_row(
            run.label,
            str(run.workset),
            str(run.local_updates),
            f"{e[-1]:.0f}",
            f"{a[-1]:.4f}",
            f"{fitted[-1]:.4f}",
            f"{np.sqrt(np.mean(errors**2)):.4f}",
            f"{worth:.2f}",
        )
    console.print(table)
    rms = float(np.sqrt(np.mean(np.square(residuals))))
    console.print(
        f"curve: A_inf={curve.auc_limit:.4f}, n_0={curve.scale_rounds:.1f} rounds, p={curve.power:.3f}; local: "
        f"rho={model.local.rho:.3f}, tau={model.local.tau:.1f}, kappa={model.local.kappa:.3f}; unweighted: "
        f"rho={model.local_unweighted.rho:.3f}, tau={model.local_unweighted.tau:.1f}, "
        f"kappa={model.local_unweighted.kappa:.3f}; RMS AUC residual {rms:.4f}"
    )
    if args.write:
        path = data_file(workload)
        if path.is_file() and load_efficiency(workload).fitted and not args.force:
            console.print(
                f"[bold red]error:[/bold red] {path} already holds a fitted model; pass --force to replace it"
            )
            sys.exit(2)
        model = model.model_copy(update={"provenance": {**model.provenance, "rms_auc_residual": round(rms, 5)}})
        path.write_text(json.dumps(model.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8")
        console.print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
