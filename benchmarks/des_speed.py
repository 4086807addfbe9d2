"""How long the discrete-event engine takes to simulate one iteration, on one core.

Usage:
    python benchmarks/des_speed.py [--repeats 1] [--full] [--validation ../shared/validation]

1. Every row of both public validation sets (../shared/validation): the 113 llm-foundry MPT runs (their
   plans as `simulate validate llm-foundry` builds them) and the 10 Megatron-LM runs of Narayanan et al.
   2021, Table 1 (tp, pp, dp, micro-batch, interleaving and full recompute as the row says, fp16, the
   score matrix materialized, on dgx-a100-80g), up to the 1T-parameter plan on 3,072 GPUs with pp=64
   and 512 micro-batches, and the 530B plan with pp=35 and 3 model chunks per stage. Target: at most
   2 s of CPU time each.
2. Deep-pipeline and interleaved cases beyond the sets (GPT-3 175B on 1,024 A100s; pp up to 64).
3. Uniform plans from 8 to 8,192 GPUs (llama2-70b): the cost follows the distinct stages, not the GPUs.
4. A heterogeneous 32-GPU plan on mixed-a100-v100.

Each case reports the events SimPy processed against the bound derived from the plan's task count (the
engine stops a run that passes it), and the micro-batches simulated as events (two shorter runs where
the steady state is costed once, simulator/des/steady.py). With --full every case also runs with every
micro-batch as events (fast=False), and the table gives the largest relative difference of iteration
time and memory peak. Times are this process's CPU time (time.process_time), medians over repeats.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

from hwmodel import load_cluster
from simulator.binding import BoundPlan, bind
from simulator.des import des_report
from simulator.des.engine import DesResult, Simulation
from simulator.plan import Plan, StageSpec
from simulator.validation import read_rows, row_inputs
from workloads import load_workload
from workloads.config import WorkloadConfig

VALIDATION = Path(__file__).resolve().parents[1].parent / "shared" / "validation"
TARGET_S = 2.0


def megatron_inputs(row: dict[str, str]) -> tuple[WorkloadConfig, str, int, Plan]:
    """The workload, cluster, node count and plan of one row of megatron_narayanan2021.csv (its README:
    GPT with learned positions, fp16, full recompute, no fused attention; interleaved 1F1B where
    layers_per_virtual_stage is set)."""
    layers, pp = int(row["num_layers"]), int(row["pp"])
    per_chunk = row["layers_per_virtual_stage"].strip()
    chunks = layers // (pp * int(per_chunk)) if per_chunk else 1
    workload = WorkloadConfig(
        name=f"gpt-{row['model']}",
        family="gpt",
        num_layers=layers,
        hidden_size=int(row["hidden_size"]),
        ffn_hidden_size=int(row["ffn_hidden_size"]),
        num_heads=int(row["num_heads"]),
        vocab_size=int(row["vocab_size"]),
        seq_len=int(row["seq_len"]),
        position_embedding="learned",
    )
    plan = Plan(
        tp=int(row["tp"]),
        pp=pp,
        dp=int(row["dp"]),
        micro_batch=int(row["micro_batch"]),
        global_batch=int(row["global_batch"]),
        schedule="interleaved" if chunks > 1 else "1f1b",
        virtual_stages=chunks,
        recompute="full",
        dtype="fp16",
        attention="naive",
    )
    return workload, "dgx-a100-80g", int(row["gpus"]) // 8, plan


def timed(bound: BoundPlan, repeats: int) -> tuple[float, DesResult, int]:
    """Median CPU seconds of `Simulation(bound).run()`, the result and its event bound."""
    times = []
    for _ in range(repeats):
        started = time.process_time()
        simulation = Simulation(bound)
        result = simulation.run()
        times.append(time.process_time() - started)
    return statistics.median(times), result, simulation.event_bound()


def difference(bound: BoundPlan, fast: DesResult) -> float:
    """Largest relative difference of iteration time and memory peak against every micro-batch as events."""
    full = Simulation(bound, fast=False).run()
    peak_fast, peak_full = des_report(fast).peak_memory_bytes, des_report(full).peak_memory_bytes
    return max(
        abs(fast.iteration_time / full.iteration_time - 1),
        abs(peak_fast / peak_full - 1),
    )


HEADER = (
    f"| {'case':44s} | {'GPUs':>5s} | {'pp':>3s} | {'v':>2s} | {'micro-batches':>13s} | {'simulated':>9s} "
    f"| {'events':>9s} | {'bound':>11s} | {'CPU s':>6s} |"
)


def row_line(name: str, bound: BoundPlan, seconds: float, result: DesResult, event_bound: int, diff) -> str:
    plan = bound.plan
    simulated = "+".join(str(m) for m in result.simulated_micro_batches)
    line = (
        f"| {name:44s} | {len(bound.ranks):5d} | {plan.pp:3d} | {plan.virtual_stages:2d} | "
        f"{bound.num_micro_batches:13,d} | {simulated:>9s} | {result.events:9,d} | {event_bound:11,d} | "
        f"{seconds:6.3f} |"
    )
    return line + (f" {diff:.1e} |" if diff is not None else "")


def run_case(name: str, bound: BoundPlan, args, worst: list[float]) -> None:
    seconds, result, event_bound = timed(bound, args.repeats)
    worst.append(seconds)
    diff = difference(bound, result) if args.full else None
    print(row_line(name, bound, seconds, result, event_bound, diff), flush=True)


def validation_sets(args) -> None:
    print("1. Every row of both public validation sets (target: at most 2 s CPU each)\n")
    print(HEADER + (" vs full |" if args.full else ""))
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if args.full else ""))
    worst: list[float] = []
    path = args.validation / "megatron_narayanan2021.csv"
    with path.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            workload, cluster, nodes, plan = megatron_inputs(row)
            bound = bind(plan, workload, load_cluster(cluster, nodes=nodes))
            run_case(f"megatron {row['model']}", bound, args, worst)
    megatron = list(worst)
    path = args.validation / "llm_foundry_mfu.csv"
    for line, row in enumerate(read_rows(path), start=2):
        workload, cluster, nodes, plan = row_inputs(row, str(path), line)
        bound = bind(plan, workload, load_cluster(cluster, nodes=nodes))
        name = f"llm-foundry line {line}: {row['model']} {row['gpus']}x{row['gpu']} mb{row['micro_batch']}"
        run_case(name, bound, args, worst)
    foundry = worst[len(megatron) :]
    print(
        f"\nmegatron: {len(megatron)} rows, slowest {max(megatron):.3f} s; llm-foundry: {len(foundry)} rows, "
        f"slowest {max(foundry):.3f} s, total {sum(foundry):.2f} s; rows over {TARGET_S:.0f} s: "
        f"{sum(s > TARGET_S for s in worst)}"
    )


def deep_pipelines(args) -> None:
    print("\n2. Deep-pipeline and interleaved cases\n")
    print(HEADER + (" vs full |" if args.full else ""))
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if args.full else ""))
    worst: list[float] = []
    gpt3 = load_workload("gpt3-175b")
    cases = {
        "gpt3-175b tp8 pp16 dp8, 1F1B": (Plan(tp=8, pp=16, dp=8, global_batch=512), 128),
        "gpt3-175b tp8 pp16 dp8, interleaved v=2": (
            Plan(tp=8, pp=16, dp=8, global_batch=512, schedule="interleaved", virtual_stages=2),
            128,
        ),
        "gpt3-175b tp8 pp16 dp8, gpipe": (Plan(tp=8, pp=16, dp=8, global_batch=512, schedule="gpipe"), 128),
        "gpt3-175b tp8 pp32 dp4, 1F1B, 1,024 mb": (Plan(tp=8, pp=32, dp=4, global_batch=4096), 128),
        "gpt3-175b tp4 pp48 dp2, interleaved v=2": (
            Plan(tp=4, pp=48, dp=2, global_batch=1536, schedule="interleaved", virtual_stages=2),
            48,
        ),
        "gpt3-175b tp2 pp96, 1F1B, 768 mb": (Plan(tp=2, pp=96, dp=1, global_batch=768), 24),
    }
    for name, (plan, nodes) in cases.items():
        plan = plan.model_copy(update={"sequence_parallel": True, "recompute": "selective"})
        bound = bind(Plan(**plan.model_dump()), gpt3, load_cluster("dgx-a100-80g", nodes=nodes))
        run_case(name, bound, args, worst)


def uniform_and_mixed(args) -> None:
    print("\n3. Uniform llama2-70b plans, 16 micro-batches, and 4. heterogeneous mixed-a100-v100\n")
    print(HEADER)
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    args_no_full = argparse.Namespace(repeats=args.repeats, full=False, validation=args.validation)
    worst: list[float] = []
    workload = load_workload("llama2-70b")
    for gpus in (8, 32, 128, 512, 1024, 2048, 4096, 8192):
        pp = 8 if gpus >= 64 else 1
        dp = gpus // (8 * pp)
        plan = Plan(tp=8, pp=pp, dp=dp, global_batch=dp * 16, recompute="full", dp_type="zero1", sequence_parallel=True)
        bound = bind(plan, workload, load_cluster("dgx-h100", nodes=gpus // 8))
        run_case(f"llama2-70b tp8 pp{pp} dp{dp}", bound, args_no_full, worst)
    workload = load_workload("llama2-7b").with_seq_len(2048)
    cluster = load_cluster("mixed-a100-v100")
    stages = (StageSpec(num_layers=20, devices="a100"), StageSpec(num_layers=12, devices="v100"))
    plans = {
        "llama2-7b A100 stage + V100 stage": Plan(tp=2, pp=2, global_batch=64, dtype="fp16", stages=stages),
        "llama2-7b one stage over both types": Plan(tp=8, global_batch=32, dtype="fp16"),
    }
    for name, plan in plans.items():
        run_case(name, bind(plan, workload, cluster), args_no_full, worst)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--full", action="store_true", help="also compare with every micro-batch as events")
    parser.add_argument(
        "--validation",
        type=Path,
        default=VALIDATION,
        help="folder of the public validation sets (../shared/validation)",
    )
    args = parser.parse_args()
    validation_sets(args)
    deep_pipelines(args)
    uniform_and_mixed(args)


if __name__ == "__main__":
    main()
