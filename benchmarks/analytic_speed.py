"""How many analytic plan evaluations per second, on one core.

Usage:
    python benchmarks/analytic_speed.py [--workload llama2-7b] [--cluster dgx-a100-80g] [--nodes 8] [--repeats 5]

Enumerates every distinct plan of a grid (tp, pp, dp_type, recompute, micro_batch, sequence parallel,
schedule) for a 32-layer model on 64 GPUs and evaluates each one. "cold" clears every cost cache first
(what a planner pays on its first sweep); "warm" repeats the same plans (what it pays when it revisits
them). Times are this process's CPU time (one core). Prints the median over repeats and the spread;
compare runs as ratios on the same machine.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

from hwmodel import load_cluster
from simulator.analytic import evaluate
from simulator.cost.collectives import collective_time
from simulator.cost.compute import layer_times
from simulator.errors import InfeasiblePlan
from simulator.plan import Plan
from workloads import load_workload
from workloads.transformer import layer_profile


def plan_grid(num_devices: int) -> list[Plan]:
    plans = []
    for tp, pp, dp_type, recompute, mb, sp, schedule in itertools.product(
        (1, 2, 4, 8),
        (1, 2, 4, 8),
        ("ddp", "zero1", "zero2", "zero3"),
        ("none", "selective", "full"),
        (1, 2, 4),
        (False, True),
        ("1f1b", "interleaved"),
    ):
        if schedule == "interleaved" and pp == 1:
            continue
        dp = num_devices // (tp * pp)
        plans.append(
            Plan(
                tp=tp,
                pp=pp,
                dp=dp,
                dp_type=dp_type,
                recompute=recompute,
                micro_batch=mb,
                global_batch=dp * mb * 16,
                sequence_parallel=sp and tp > 1,
                schedule=schedule,
                virtual_stages=2 if schedule == "interleaved" else 1,
            )
        )
    return plans


def clear_caches() -> None:
    layer_profile.cache_clear()
    layer_times.cache_clear()
    collective_time.cache_clear()


def sweep(plans, workload, cluster) -> tuple[float, int]:
    # CPU time of this process: on a shared machine it measures one core's work, not the neighbours'.
    started = time.process_time()
    feasible = 0
    for plan in plans:
        try:
            evaluate(plan, workload, cluster)
            feasible += 1
        except InfeasiblePlan:
            pass
    return time.process_time() - started, feasible


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="llama2-7b")
    parser.add_argument("--cluster", default="dgx-a100-80g")
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    workload = load_workload(args.workload)
    cluster = load_cluster(args.cluster, nodes=args.nodes)
    plans = plan_grid(cluster.num_devices)
    cold, warm = [], []
    feasible = 0
    for _ in range(args.repeats):
        clear_caches()
        elapsed, feasible = sweep(plans, workload, cluster)
        cold.append(len(plans) / elapsed)
        elapsed, _ = sweep(plans, workload, cluster)
        warm.append(len(plans) / elapsed)
    print(
        f"workload {workload.name} ({workload.num_layers} layers), cluster {cluster.name} x{cluster.num_nodes} "
        f"({cluster.num_devices} devices), {len(plans)} distinct plans ({feasible} feasible), {args.repeats} repeats"
    )
    print(f"{'mode':6s} {'median eval/s':>14s} {'min':>10s} {'max':>10s} {'median us/eval':>15s}")
    for name, rates in (("cold", cold), ("warm", warm)):
        med = statistics.median(rates)
        print(f"{name:6s} {med:14.0f} {min(rates):10.0f} {max(rates):10.0f} {1e6 / med:15.1f}")


if __name__ == "__main__":
    main()
