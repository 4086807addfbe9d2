"""Predicted memory and time of each recompute policy for one model, under the stacks that offer it.

Usage:
    python benchmarks/recompute_policies.py [--workload llama2-7b] [--cluster dgx-h100]
        [--plan tp=1,pp=1,dp=8,dp_type=zero3,micro_batch=2,global_batch=16] [--stack torchtitan]

For each policy the stack lists (every-n as every-2 and every-4), and Megatron-LM's selective under
megatron-lm for comparison, prints the activations and peak memory of the device with the peak, the
recompute seconds per iteration, the iteration time and MFU (analytic engine).

`--executor` also trains a tiny llama (4 blocks, fp32, 3 steps) on this CPU under every policy `execute`
runs and prints the activation bytes it measured (saved-tensor hooks, and the outputs op-selective's policy
saves) beside the prediction for it under the hetplan stack, and the largest loss difference from none.
"""

from __future__ import annotations

import argparse

from hwmodel import load_cluster
from hwmodel.catalog import load_stack
from simulator.analytic import evaluate
from simulator.plan import parse_shorthand
from workloads import load_workload

GIB = 2**30


def policies(stack: str) -> list[str]:
    out: list[str] = []
    for policy in load_stack(stack).recompute_policies:
        if policy == "every-n":
            out += ["every-2", "every-4"]
        elif policy != "tokenwise":  # MEMO's needs an offload share: not one policy alone
            out.append(policy)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="llama2-7b")
    parser.add_argument("--cluster", default="dgx-h100")
    parser.add_argument("--plan", default="tp=1,pp=1,dp=8,dp_type=zero3,micro_batch=2,global_batch=16")
    parser.add_argument("--stack", default="torchtitan")
    parser.add_argument("--executor", action="store_true", help="also measure a tiny llama on this CPU")
    args = parser.parse_args()
    workload, cluster = load_workload(args.workload), load_cluster(args.cluster)
    rows = [(args.stack, p) for p in policies(args.stack)]
    if "selective" not in policies(args.stack):
        rows.append(("megatron-lm", "selective"))
    print(f"{args.workload} on {args.cluster}, plan {args.plan}, seq_len {workload.seq_len} (analytic engine)")
    print()
    print("| stack | recompute | activations GiB | peak GiB | recompute s | iteration s | MFU |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for stack, policy in rows:
        plan = parse_shorthand(f"{args.plan},recompute={policy},stack={stack}")
        r = evaluate(plan, workload, cluster)
        print(
            f"| {stack} | {policy} | {r.memory_bytes.activations / GIB:.2f} | {r.peak_memory_bytes / GIB:.2f} "
            f"| {r.time_breakdown_s.recompute:.3f} | {r.iteration_time_s:.3f} | {r.mfu:.3f} |"
        )
    if args.executor:
        print()
        executor_table()


def executor_table() -> None:
    import os

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import executor.launch as launch
    from executor.job import Job
    from workloads import WorkloadConfig

    cfg = WorkloadConfig(
        name="tiny-llama",
        family="llama",
        num_layers=4,
        hidden_size=64,
        ffn_hidden_size=96,
        num_heads=4,
        num_kv_heads=2,
        vocab_size=256,
        seq_len=32,
    )
    names = ("none", "selective", "op-selective", "every-2", "every-4", "full")
    base = "micro_batch=2,global_batch=8,dtype=fp32,stack=hetplan"
    plans = [parse_shorthand(f"{base},recompute={n}") for n in names]
    results = launch.run_jobs([Job(cfg, "cpu-local", None, 1, p, steps=3, warmup=0) for p in plans])
    cluster = load_cluster("cpu-local", devices_per_node=1)
    print(f"executor, {cfg.name} on this CPU, 1 rank, plan {base}")
    print()
    print("| recompute | measured activations KiB | predicted KiB | max loss rel. diff vs none |")
    print("|---|---:|---:|---:|")
    reference = results[0].losses
    for name, plan, result in zip(names, plans, results, strict=True):
        predicted = evaluate(plan, cfg, cluster).memory_bytes.activations
        diff = max(abs(a - b) / abs(b) for a, b in zip(result.losses, reference, strict=True))
        print(f"| {name} | {result.memory[0]['activations'] / 1024:.1f} | {predicted / 1024:.1f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
