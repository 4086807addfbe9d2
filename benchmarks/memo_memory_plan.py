"""MEMO's bi-level memory plan: solve times and peaks for a transformer's activations.

Usage:
    python benchmarks/memo_memory_plan.py [--workload llama2-7b] [--seq-lens 4096,32768,1048576]
        [--micro-batch 1] [--configs 1:none,8:selective,1:full,8:full] [--repeats 3] [--random-sets 10]
        [--random-sizes 12,20,30,40] [--markdown]

Table 1, per tensor-parallel degree, recompute mode and sequence length: level one on one layer's forward
and backward (all its tensors), the whole model (every layer, level two stacking the level-one frames)
and, for the same tensors on one timeline,
greedy best-fit (offline, largest first), an online best-fit allocator (tensors placed as they are
allocated, what a caching allocator without a plan does) and the lower bound (most bytes alive at once).
Fragmentation avoided = greedy (or online) peak - planned peak. Targets: a layer within 10 s, the
whole model within 60 s; planned peak never above greedy.

Table 2: random layer-sized tensor sets (the kind greedy does not solve exactly), to show the MIP at work:
how often no greedy order reaches the lower bound so CBC runs, how often the plan beats greedy best-fit
and by how much, and how long a plan takes (CBC limit 10 s).

Times are wall-clock medians over --repeats runs.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simulator.search.memo.memory_plan import (
    TensorLife,
    check_plan,
    online_best_fit,
    plan_layer,
    plan_model,
    transformer_layer_tensors,
    transformer_model_tensors,
)
from workloads import load_workload


def model_rows(args) -> list[dict]:
    cfg = load_workload(args.workload)
    rows = []
    for (tp, recompute), seq in ((config, seq) for config in args.configs for seq in args.seq_lens):
        intra, cross = transformer_layer_tensors(cfg, args.micro_batch, seq, tp, recompute)
        layer_times, model_times = [], []
        for _ in range(args.repeats):
            layer_plan = plan_layer(intra + cross, time_limit_s=10.0)
            layer_times.append(layer_plan.solve_time_s)
        layer_status = layer_plan.solver_status + (", CBC ran" if layer_plan.cbc_called else ", no CBC needed")
        layers, cross_layer = transformer_model_tensors(cfg, args.micro_batch, seq, tp, recompute)
        everything = [t for layer in layers for t in layer] + cross_layer
        for _ in range(args.repeats):
            plan = plan_model(layers, cross_layer, time_limit_s=60.0)
            model_times.append(plan.solve_time_s)
        check_plan(everything, plan.offsets, alignment=512)
        _, online = online_best_fit(everything)
        rows.append(
            dict(
                tp=tp,
                recompute=recompute,
                seq=seq,
                tensors=len(everything),
                layer_s=statistics.median(layer_times),
                layer_status=layer_status,
                model_s=statistics.median(model_times),
                status=plan.solver_status,
                distinct=plan.distinct_layer_plans,
                planned=plan.peak_bytes,
                greedy=plan.greedy_peak_bytes,
                online=online,
                bound=plan.lower_bound_bytes,
            )
        )
    return rows


def random_layer(rng: random.Random, n: int, steps: int) -> list[TensorLife]:
    out = []
    for i in range(n):
        start = rng.randrange(steps)
        end = rng.randrange(start, min(steps, start + rng.randrange(1, 6)))
        out.append(TensorLife(f"t{i}", rng.choice([1, 2, 3, 4, 5, 6, 8]) << 24, start, end))
    return out


def random_rows(args) -> list[dict]:
    rows = []
    for n in args.random_sizes if args.random_sets else ():
        times, gains, beaten, timeouts, cbc = [], [], 0, 0, 0
        for seed in range(args.random_sets):
            tensors = random_layer(random.Random(seed), n, steps=12)
            plan = plan_layer(tensors, time_limit_s=10.0)
            check_plan(tensors, plan.offsets, alignment=512)
            assert plan.lower_bound_bytes <= plan.peak_bytes <= plan.greedy_peak_bytes
            times.append(plan.solve_time_s)
            gains.append(plan.fragmentation_avoided_pct)
            beaten += plan.peak_bytes < plan.greedy_peak_bytes
            timeouts += plan.solver_status != "optimal"
            cbc += plan.cbc_called
        rows.append(
            dict(
                n=n,
                sets=args.random_sets,
                cbc=cbc,
                beaten=beaten,
                gain_max=max(gains),
                gain_mean=statistics.mean(gains),
                median_s=statistics.median(times),
                max_s=max(times),
                timeouts=timeouts,
            )
        )
    return rows


def parse_configs(text: str) -> list[tuple[int, str]]:
    out = []
    for item in text.split(","):
        tp, _, recompute = item.partition(":")
        if recompute not in ("none", "selective", "full") or not tp.isdigit():
            raise argparse.ArgumentTypeError(f"expected tp:recompute with recompute none/selective/full, got {item!r}")
        out.append((int(tp), recompute))
    return out


def gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.3f} GiB"


def pct(saved: int, base: int) -> str:
    amount = gib(saved) if saved >= 2**30 else f"{saved / 2**20:.1f} MiB"
    return f"{amount} ({100 * saved / base:.2f}%)" if base else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="llama2-7b")
    parser.add_argument("--seq-lens", default="4096,32768,1048576", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument(
        "--configs",
        default="1:none,8:selective,1:full,8:full",
        type=parse_configs,
        help="tp:recompute pairs (recompute: none, selective, full), comma-separated",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--random-sets", type=int, default=10, help="random sets per size (0: skip table 2)")
    parser.add_argument(
        "--random-sizes",
        default="12,20,30,40",
        type=lambda s: [int(x) for x in s.split(",")],
        help="tensors per random set",
    )
    parser.add_argument("--markdown", action="store_true", help="print markdown tables (for BENCHMARKS.md)")
    args = parser.parse_args()

    heads1 = [
        "tp",
        "recompute",
        "seq len",
        "tensors",
        "layer solve",
        "model solve (status: distinct frames)",
        "planned peak",
        "greedy peak",
        "online best-fit peak",
        "lower bound",
        "avoided vs greedy",
        "avoided vs online",
    ]
    table1 = [
        [
            str(r["tp"]),
            r["recompute"],
            f"{r['seq']:,}",
            str(r["tensors"]),
            f"{r['layer_s']:.2f} s ({r['layer_status']})",
            f"{r['model_s']:.2f} s ({r['status']}: {r['distinct']})",
            gib(r["planned"]),
            gib(r["greedy"]),
            gib(r["online"]),
            gib(r["bound"]),
            pct(r["greedy"] - r["planned"], r["greedy"]),
            pct(r["online"] - r["planned"], r["online"]),
        ]
        for r in model_rows(args)
    ]
    heads2 = [
        "tensors",
        "sets",
        "CBC needed",
        "plan beats greedy",
        "avoided vs greedy (mean / max)",
        "solve median",
        "solve max",
        "hit time limit",
    ]
    table2 = [
        [
            str(r["n"]),
            str(r["sets"]),
            str(r["cbc"]),
            str(r["beaten"]),
            f"{r['gain_mean']:.1f}% / {r['gain_max']:.1f}%",
            f"{r['median_s']:.2f} s",
            f"{r['max_s']:.2f} s",
            str(r["timeouts"]),
        ]
        for r in random_rows(args)
    ]
    title1 = (
        f"{args.workload}, micro-batch {args.micro_batch} (tp > 1 with sequence parallel): one layer "
        "(level one) and the whole model (bi-level)"
    )
    title2 = "Random layer-sized tensor sets (12 steps, sizes 16-128 MiB, lifetimes up to 5 steps), CBC limit 10 s"
    if args.markdown:
        for title, heads, rows in ((title1, heads1, table1), (title2, heads2, table2)):
            if not rows:
                continue
            print(f"\n{title}\n")
            print("| " + " | ".join(heads) + " |")
            print("|" + "|".join("---" if i == 0 else "---:" for i in range(len(heads))) + "|")
            for row in rows:
                print("| " + " | ".join(row) + " |")
        return
    console = Console()
    for title, heads, rows in ((title1, heads1, table1), (title2, heads2, table2)):
        if not rows:
            continue
        table = Table(title=title)
        for i, head in enumerate(heads):
            table.add_column(head, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)


if __name__ == "__main__":
    main()
