"""Predicted vs measured iteration time on this machine, with a spec measured by `execute calibrate`.

Usage:
    python benchmarks/executor_accuracy.py [--spec FILE] [--steps 5] [--warmup 2] [--out DIR]

Without --spec it first runs `execute calibrate --ranks 2` (about two minutes) into --out. Then, for a
~30M-parameter GPT (`gpt-30m`: 8 layers, hidden 512, seq 256, fp32) it runs each plan with `execute
--json` (one thread per rank: OMP_NUM_THREADS=1, so a device is one core, as the spec measured it) and
predicts the same plan on the same spec with both engines. Prints a table of measured median
iteration time, predictions and errors.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from hwmodel import load_cluster
from simulator.analytic import evaluate
from simulator.des import evaluate_des
from simulator.plan import parse_shorthand
from workloads import load_workload

WORKLOAD = "gpt-30m"
# name -> (ranks, plan); 8 sequences of 256 tokens per iteration everywhere.
PLANS = {
    "single process": (1, "micro_batch=8,global_batch=8,dtype=fp32"),
    "dp2": (2, "dp=2,micro_batch=4,global_batch=8,dtype=fp32"),
    "tp2": (2, "tp=2,micro_batch=8,global_batch=8,dtype=fp32"),
    "pp2 (1f1b, 4 micro-batches)": (2, "pp=2,micro_batch=2,global_batch=8,schedule=1f1b,dtype=fp32"),
    "dp2 + zero3": (2, "dp=2,dp_type=zero3,micro_batch=4,global_batch=8,dtype=fp32"),
    "full recompute": (1, "micro_batch=8,global_batch=8,recompute=full,dtype=fp32"),
}


def calibrate(out: Path) -> Path:
    spec = out / "calibrated.yaml"
    print(f"calibrating this machine into {spec} (execute calibrate --ranks 2) ...", flush=True)
    subprocess.run(
        [sys.executable, "-m", "executor.cli", "calibrate", "--ranks", "2", "--out", str(spec), "--force"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return spec


def measure(spec: Path, ranks: int, plan: str, steps: int, warmup: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "executor.cli",
        "--workload",
        WORKLOAD,
        "--cluster",
        str(spec),
        "--devices-per-node",
        str(ranks),
        "--plan",
        plan,
        "--steps",
        str(steps),
        "--warmup",
        str(warmup),
        "--json",
        "--force",
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"execute failed for {plan!r}:\n{result.stderr}")
    return json.loads(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", type=Path, help="a cluster spec written by `execute calibrate --ranks 2`")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="where to write the calibration (default: a temp dir)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="hetplan-accuracy-"))
    spec = args.spec or calibrate(out)
    workload = load_workload(WORKLOAD)
    rows = []
    for name, (ranks, text) in PLANS.items():
        cluster = load_cluster(str(spec), devices_per_node=ranks)
        plan = parse_shorthand(text)
        measured = measure(spec, ranks, text, args.steps, args.warmup)
        t = measured["iteration_time_s"]
        des = evaluate_des(plan, workload, cluster).iteration_time_s
        analytic = evaluate(plan, workload, cluster).iteration_time_s
        rows.append((name, t, des, analytic))
        print(
            f"  {name:30s} measured {t:7.3f} s  des {des:7.3f} s ({100 * (des - t) / t:+6.1f}%)  "
            f"analytic {analytic:7.3f} s ({100 * (analytic - t) / t:+6.1f}%)",
            flush=True,
        )
    print(
        f"\n{WORKLOAD} on {spec}, fp32, {args.steps} measured iterations after {args.warmup} warm-up, "
        "one thread per rank"
    )
    print(f"{'plan':30s} {'measured s':>10s} {'des s':>8s} {'error':>7s} {'analytic s':>10s} {'error':>7s}")
    for name, t, des, analytic in rows:
        print(
            f"{name:30s} {t:10.3f} {des:8.3f} {100 * (des - t) / t:+6.1f}% "
            f"{analytic:10.3f} {100 * (analytic - t) / t:+6.1f}%"
        )
    worst = max(abs(des - t) / t for _, t, des, _ in rows)
    print(f"worst |error| (des): {100 * worst:.1f}%")


if __name__ == "__main__":
    main()
