"""How long the discrete-event engine takes to simulate one iteration, on one core.

Usage:
    python benchmarks/des_speed.py [--repeats 3]

1. GPT-3 175B on 1,024 A100s: tp=8, pp=16, dp=8, 64 micro-batches, 1F1B (target: at most 5 s).
2. Uniform plans from 8 to 8,192 GPUs (llama2-70b, tp=8, pp=8 where it fits, the rest data parallel,
   16 micro-batches): simulated time should grow far slower than the GPU count, because identical
   ranks collapse into one representative per stage.
3. A heterogeneous 32-GPU plan on mixed-a100-v100: a pipeline stage on the A100 nodes and one on the
   V100 nodes, plus a stage that mixes both (target: at most 5 s).

Times are this process's CPU time; medians over repeats.
"""

from __future__ import annotations

import argparse
import statistics
import time

from hwmodel import load_cluster
from simulator.binding import bind
from simulator.des.engine import Simulation
from simulator.plan import Plan, StageSpec
from workloads import load_workload


def timed(bound, repeats: int) -> tuple[float, Simulation]:
    times = []
    for _ in range(repeats):
        simulation = Simulation(bound)
        started = time.process_time()
        result = simulation.run()
        times.append(time.process_time() - started)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    print("1. GPT-3 175B, 1,024 A100-80GB, tp=8 pp=16 dp=8, 64 micro-batches, 1F1B")
    plan = Plan(
        tp=8,
        pp=16,
        dp=8,
        micro_batch=1,
        global_batch=512,
        schedule="1f1b",
        sequence_parallel=True,
        recompute="selective",
    )
    bound = bind(plan, load_workload("gpt3-175b"), load_cluster("dgx-a100-80g", nodes=128))
    seconds, result = timed(bound, args.repeats)
    print(
        f"   simulated in {seconds:.2f} s CPU ({len(result.reps)} representatives, "
        f"{result.num_tasks} tasks and flows); "
        f"iteration {result.iteration_time:.2f} s"
    )

    print("\n2. Uniform llama2-70b plans, 16 micro-batches")
    print(f"   {'GPUs':>6s} {'plan':>18s} {'reps':>5s} {'tasks':>7s} {'CPU s':>7s}")
    workload = load_workload("llama2-70b")
    for gpus in (8, 32, 128, 512, 1024, 2048, 4096, 8192):
        pp = 8 if gpus >= 64 else 1
        tp = 8
        dp = gpus // (tp * pp)
        plan = Plan(
            tp=tp,
            pp=pp,
            dp=dp,
            micro_batch=1,
            global_batch=dp * 16,
            recompute="full",
            dp_type="zero1",
            sequence_parallel=True,
        )
        bound = bind(plan, workload, load_cluster("dgx-h100", nodes=gpus // 8))
        seconds, result = timed(bound, args.repeats)
        print(f"   {gpus:6d} {f'tp{tp} pp{pp} dp{dp}':>18s} {len(result.reps):5d} {result.num_tasks:7d} {seconds:7.3f}")

    print("\n3. Heterogeneous 32 GPUs (mixed-a100-v100), llama2-7b at 2048 tokens, fp16")
    workload = load_workload("llama2-7b").with_seq_len(2048)
    cluster = load_cluster("mixed-a100-v100")
    plans = {
        "A100 stage + V100 stage": Plan(
            tp=2,
            pp=2,
            micro_batch=1,
            global_batch=64,
            dtype="fp16",
            stages=(StageSpec(num_layers=20, devices="a100"), StageSpec(num_layers=12, devices="v100")),
        ),
        "one stage over both types": Plan(tp=8, micro_batch=1, global_batch=32, dtype="fp16"),
    }
    for name, plan in plans.items():
        seconds, result = timed(bind(plan, workload, cluster), args.repeats)
        print(
            f"   {name:28s} simulated in {seconds:.3f} s CPU ({len(result.reps)} representatives, "
            f"{result.num_tasks} tasks and flows); iteration {result.iteration_time:.2f} s"
        )


if __name__ == "__main__":
    main()
