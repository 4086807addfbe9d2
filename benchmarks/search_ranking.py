"""Does the Galvatron search's ranking hold in reality? Predicted vs measured on this machine, 2 gloo ranks.

Usage:
    python benchmarks/search_ranking.py [--spec FILE] [--out DIR] [--steps 4] [--warmup 2] [--rounds 2]

Without --spec it first runs `execute calibrate --ranks 2` (about two minutes; the same step as
benchmarks/executor_accuracy.py) into --out. Then:

1. `search_galvatron` searches `gpt-30m` at a short sequence (`--seq-len`, default 64, so one plan
   runs in seconds) on the calibrated 2-device cluster (fp32, 8 sequences per iteration) and gives its
   top 3 and its baselines;
2. the distinct plans among the top 3, the baselines and a few hand-written plans (a per-layer mixed
   tp2 -> dp2 plan, uneven pipeline stages) are written as plan YAML files into --out (what
   `simulate search galvatron --out` writes; each runs with `execute --plan FILE`), loaded back with
   `load_plan` and executed on 2 gloo ranks (one thread each, as the spec measured a device), in
   `--rounds` interleaved rounds so that slow drift of a shared machine hits every plan alike;
3. the measured iteration time of a plan is the median over all its timed iterations; the predicted
   one is the discrete-event engine's on the same spec (the engine the search re-ranks with).

Prints predicted vs measured per plan, the Spearman rank correlation (target >= 0.8) and whether the
search's first choice is within 10% of the fastest measured plan. `spread` is (slowest - fastest) /
median of a plan's timed iterations: how much the machine disturbed it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

# Run as a script: the benchmarks' own modules (beside this file) are importable only after this line.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from executor_accuracy import calibrate

from hwmodel import load_cluster
from simulator.plan import LayerStrategy, Plan, StageSpec, load_plan
from workloads import load_workload

WORKLOAD = "gpt-30m"
RANKS = 2
GLOBAL_BATCH = 8
SPEARMAN_TARGET = 0.8
FIRST_CHOICE_SLACK = 0.10


def hand_plans(num_layers: int) -> dict[str, Plan]:
    """Plans a person might try, beside the search's: mixed layouts and uneven stages (fp32, batch 8)."""
    half = num_layers // 2
    base = dict(global_batch=GLOBAL_BATCH, dtype="fp32")
    return {
        "hand: tp2 first half, dp2 second half": Plan(
            tp=2, micro_batch=8, layers=(LayerStrategy(layers=(half, num_layers - 1), tp=1),), **base
        ),
        "hand: dp2, tp2+sp first half": Plan(
            dp=2, micro_batch=4, layers=(LayerStrategy(layers=(0, half - 1), tp=2, sequence_parallel=True),), **base
        ),
        "hand: pp2 uneven stages (1 + rest), gpipe": Plan(
            pp=2,
            micro_batch=2,
            schedule="gpipe",
            stages=(StageSpec(num_layers=1), StageSpec(num_layers=num_layers - 1)),
            **base,
        ),
        "hand: dp2 full recompute": Plan(dp=2, micro_batch=4, recompute="full", **base),
    }


def search_plans(
    workload, cluster, budget_bytes: float
) -> tuple[list[tuple[str, Plan]], list[tuple[str, Plan]], float]:
    """(top-3 candidates, baselines with a plan, search seconds) from `search_galvatron`."""
    from simulator.search.galvatron.search import search_galvatron

    started = time.perf_counter()
    result = search_galvatron(workload, cluster, budget_bytes, global_batch=GLOBAL_BATCH, top_k=3, dtype="fp32")
    seconds = time.perf_counter() - started
    top = [(f"search #{i + 1}", c.plan) for i, c in enumerate(result.candidates[:3])]
    if not top:
        top = [("search #1", result.best.plan)]
    baselines = [
        (f"baseline: {b.name}", b.plan) for b in result.baselines if b.plan is not None and b.report is not None
    ]
    return top, baselines, seconds


def layout_key(bound) -> tuple:
    """What a bound plan runs, with what cannot matter left out: dp_type where a layer has one replica,
    the plan's own fields that `layers` and `stages` override."""
    from dataclasses import replace

    runs = tuple(
        (
            tuple(stage.ranks),
            tuple(replace(run, dp_type="-") if len(stage.ranks) == run.tp else run for run in stage.runs),
        )
        for stage in bound.stages
    )
    plan = bound.plan
    return (plan.micro_batch, plan.global_batch, plan.schedule, plan.virtual_stages, plan.dtype, plan.optimizer, runs)


def describe(plan: Plan) -> str:
    """The shorthand, plus per-layer strategies and explicit stages when the plan has them."""
    text = plan.shorthand()
    for strategy in plan.layers:
        fields = strategy.model_dump(exclude_none=True, exclude={"layers"})
        first, last = strategy.layers
        text += f"; blocks {first}-{last}: " + ",".join(f"{k}={v}" for k, v in fields.items())
    if plan.stages:
        text += "; stages " + "+".join(str(s.num_layers) for s in plan.stages)
    return text


def distinct(named: list[tuple[str, Plan]], workload, cluster) -> list[tuple[str, Plan, object]]:
    """Drop plans that bind to the same layout as an earlier one (e.g. dp=2 written out or left to fill)."""
    from simulator.binding import bind

    seen: dict[tuple, str] = {}
    out = []
    for name, plan in named:
        bound = bind(plan, workload, cluster)
        key = layout_key(bound)
        if key in seen:
            print(f"  {name}: the same plan as {seen[key]}, measured once", flush=True)
            continue
        seen[key] = name
        out.append((name, plan, bound))
    return out


def measure(jobs, rounds: int) -> list[list[float]]:
    """Timed iteration times of each job, from `rounds` interleaved passes over all of them (one spawn each)."""
    from executor.launch import run_jobs

    times: list[list[float]] = [[] for _ in jobs]
    for r in range(rounds):
        order = list(range(len(jobs))) if r % 2 == 0 else list(reversed(range(len(jobs))))
        started = time.perf_counter()
        results = run_jobs([jobs[i] for i in order])
        for i, result in zip(order, results):
            times[i].extend(result.step_times_s[k] for k in result.timed)
        print(f"  round {r + 1}/{rounds}: {len(jobs)} plans in {time.perf_counter() - started:.0f} s", flush=True)
    return times


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rho: the Pearson correlation of the ranks (average ranks for ties)."""
    return float(pd.Series(a).rank().corr(pd.Series(b).rank()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", type=Path, help="a cluster spec written by `execute calibrate --ranks 2`")
    parser.add_argument(
        "--out", type=Path, default=None, help="where the calibration and plan files go (default: a temp dir)"
    )
    parser.add_argument("--seq-len", type=int, default=64, help="sequence length of gpt-30m (default 64)")
    parser.add_argument("--steps", type=int, default=4, help="timed iterations per plan and round")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up iterations per plan and round")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved passes over all plans")
    parser.add_argument("--memory-budget-gib", type=float, default=8.0, help="the search's per-device budget")
    parser.add_argument("--hand-only", action="store_true", help="skip the search (hand-written plans only)")
    args = parser.parse_args()

    from executor.checks import admit
    from executor.job import Job
    from simulator.des import evaluate_des

    os.environ["OMP_NUM_THREADS"] = "1"  # one core per rank, as calibrate measured a device
    out = args.out or Path(tempfile.mkdtemp(prefix="hetplan-ranking-"))
    out.mkdir(parents=True, exist_ok=True)
    spec = args.spec or calibrate(out)
    workload = load_workload(WORKLOAD, args.seq_len)
    cluster = load_cluster(str(spec), devices_per_node=RANKS)

    named: list[tuple[str, Plan]] = []
    search_seconds = None
    if not args.hand_only:
        try:
            top, baselines, search_seconds = search_plans(workload, cluster, args.memory_budget_gib * 2**30)
        except ImportError as exc:  # the planner is not there (yet): the hand-written plans still run
            print(f"search_galvatron unavailable ({exc}); measuring the hand-written plans only", flush=True)
            top, baselines = [], []
        named += top + baselines
    named += list(hand_plans(workload.num_layers).items())
    plans = distinct(named, workload, cluster)

    jobs, rows = [], []
    plan_dir = out / "plans"
    plan_dir.mkdir(exist_ok=True)
    for i, (name, plan, _) in enumerate(plans):
        # As `simulate search galvatron --out` writes a plan, and as `execute --plan FILE` reads it.
        path = plan_dir / f"plan{i}.yaml"
        path.write_text(yaml.safe_dump(plan.model_dump(mode="json", exclude_defaults=True), sort_keys=False))
        loaded = load_plan(path)
        bound, device_type, _ = admit(loaded, workload, cluster, force=True)
        jobs.append(
            Job(
                workload,
                str(spec),
                None,
                RANKS,
                bound.plan,
                steps=args.steps,
                warmup=args.warmup,
                device_type=device_type,
            )
        )
        predicted = evaluate_des(loaded, workload, cluster).iteration_time_s
        rows.append({"plan": name, "file": path.name, "what": describe(bound.plan), "predicted_s": predicted})
    _warn_if_contended()
    print(f"executing {len(jobs)} distinct plans on {RANKS} gloo ranks, {args.rounds} rounds ...", flush=True)
    times = measure(jobs, args.rounds)
    for row, t in zip(rows, times):
        row["measured_s"] = statistics.median(t)
        row["spread"] = (max(t) - min(t)) / row["measured_s"]  # how noisy this plan's iterations were
        row["error"] = row["predicted_s"] / row["measured_s"] - 1

    table = pd.DataFrame(rows)
    table["predicted rank"] = table["predicted_s"].rank(method="min").astype(int)
    table["measured rank"] = table["measured_s"].rank(method="min").astype(int)
    # Rounded: Spearman of untied ranks is a rational number, and 0.8 exactly (11 plans, 44 squared rank
    # differences) comes out of the floating-point correlation as 0.7999999999999999.
    rho = round(spearman(list(table["predicted_s"]), list(table["measured_s"])), 12)
    fastest = table["measured_s"].min()
    first = table[table["plan"] == "search #1"]
    print(
        f"\n{WORKLOAD} at seq {args.seq_len}, fp32, {GLOBAL_BATCH} sequences per iteration, {RANKS} gloo ranks "
        f"(one thread each), spec {spec}; median of {args.rounds} x {args.steps} timed iterations per plan"
    )
    if search_seconds is not None:
        print(f"search_galvatron: {search_seconds:.2f} s, budget {args.memory_budget_gib:g} GiB per device")
    show = table[
        ["plan", "file", "predicted_s", "measured_s", "spread", "error", "predicted rank", "measured rank", "what"]
    ]
    with pd.option_context("display.max_colwidth", 120, "display.width", 300):
        print(
            show.to_string(
                index=False,
                formatters={
                    "predicted_s": "{:.3f} s".format,
                    "measured_s": "{:.3f} s".format,
                    "spread": "{:.0%}".format,
                    "error": "{:+.1%}".format,
                },
            )
        )
    print(
        f"\nSpearman rank correlation, predicted vs measured: {rho:.3f} (target >= {SPEARMAN_TARGET}): "
        f"{'met' if rho >= SPEARMAN_TARGET else 'NOT met'}"
    )
    if len(first):
        ratio = float(first["measured_s"].iloc[0]) / fastest
        print(
            f"search's first choice measured {first['measured_s'].iloc[0]:.3f} s, the fastest {fastest:.3f} s: "
            f"{100 * (ratio - 1):.1f}% slower (target within {FIRST_CHOICE_SLACK:.0%}): "
            f"{'met' if ratio <= 1 + FIRST_CHOICE_SLACK else 'NOT met'}"
        )
    print(f"plan files: {plan_dir}")
    print("\nMarkdown (for BENCHMARKS.md):\n")
    print("| plan | predicted | measured | spread | error | predicted rank | measured rank | what |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for row in table.to_dict("records"):
        print(
            f"| {row['plan']} | {row['predicted_s']:.3f} s | {row['measured_s']:.3f} s | {row['spread']:.0%} | "
            f"{row['error']:+.1%} | "
            f"{row['predicted rank']} | {row['measured rank']} | `{row['what']}` |"
        )
    _warn_if_contended()


def _warn_if_contended() -> None:
    """Say so when other work competed for the cores: the times then measure the machine's load."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores:
        print(
            f"\nwarning: load average {load:.1f} on {cores} cores: other processes competed with the ranks, so the "
            "measured times (and the ranking) say more about the machine's load than about the plans; "
            "rerun on a quiet machine"
        )


if __name__ == "__main__":
    main()
