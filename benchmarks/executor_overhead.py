"""How much slower is `execute` on one process than a plain PyTorch training loop?

Both train the same model (`workloads.torch_models`, same seed), on the same synthetic batches, with
the same AdamW and the same micro-batching; the plain loop is what a person would write by hand:
forward, loss / micro-batches, backward, step, zero_grad. `execute` adds what it needs to measure and
to honour plans (per-iteration reseeding, the dp slice of the batch, contexts, synchronized timing).

For each repeat, both run warm-up + N iterations (in alternating order, so drifts in the machine's load
hit both alike) and we take the median CPU time (`time.process_time`) and wall time per iteration;
the table shows the medians over repeats and the ratio. Target: execute at most 5% slower.

    python benchmarks/executor_overhead.py [--repeats 5] [--steps 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from executor.job import Job
from executor.launch import run
from executor.parallel.parallelize import ADAMW
from simulator.plan import parse_shorthand
from workloads import WorkloadConfig
from workloads.torch_models import SyntheticTokens, build_model, init_weights, loss_fn

MODEL = WorkloadConfig(
    name="bench-gpt",
    family="gpt",
    num_layers=4,
    hidden_size=256,
    num_heads=8,
    vocab_size=8192,
    seq_len=128,
    dropout=False,
)
PLAN = "micro_batch=4,global_batch=8,dtype=fp32"


def plain_loop(steps: int, warmup: int) -> tuple[list[float], list[float], list[float]]:
    """A hand-written loop; returns per-iteration CPU times, wall times and losses."""
    plan = parse_shorthand(PLAN)
    model = build_model(MODEL, "cpu")
    init_weights(model, MODEL, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), foreach=True, **ADAMW)
    data = SyntheticTokens(MODEL, plan.global_batch, seed=0)
    m = plan.global_batch // plan.micro_batch
    cpu, wall, losses = [], [], []
    for step in range(warmup + steps):
        started, cpu_started = time.perf_counter(), time.process_time()
        x, y = data.batch(step)
        total = 0.0
        for j in range(m):
            sl = slice(j * plan.micro_batch, (j + 1) * plan.micro_batch)
            loss = loss_fn(model(x[sl]), y[sl])
            (loss / m).backward()
            total += loss.detach()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            cpu.append(time.process_time() - cpu_started)
            wall.append(time.perf_counter() - started)
        losses.append(float(total / m))
    return cpu, wall, losses


def executor_run(steps: int, warmup: int) -> tuple[list[float], list[float], list[float]]:
    job = Job(MODEL, "cpu-local", None, 1, parse_shorthand(PLAN), steps=steps, warmup=warmup, seed=0)
    result = run(job)
    timed = result.timed
    return [result.cpu_times_s[i] for i in timed], [result.step_times_s[i] for i in timed], result.losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads for both (default 1: steadier on a shared box)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import os

    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # what `execute` reads for its rank

    rows = {"plain": ([], []), "execute": ([], [])}
    losses = {}
    for r in range(args.repeats):
        order = (
            (("plain", plain_loop), ("execute", executor_run))
            if r % 2 == 0
            else (("execute", executor_run), ("plain", plain_loop))
        )
        for name, fn in order:
            cpu, wall, loss = fn(args.steps, args.warmup)
            rows[name][0].append(statistics.median(cpu))
            rows[name][1].append(statistics.median(wall))
            losses[name] = loss
    same = max(abs(a - b) / abs(b) for a, b in zip(losses["plain"], losses["execute"]))

    table = Table(
        title=f"execute vs a plain PyTorch loop: {MODEL.num_layers}x{MODEL.hidden_size} GPT, seq {MODEL.seq_len}, "
        f"plan {PLAN}, {args.threads} thread(s), median of {args.repeats} repeats x {args.steps} iterations"
    )
    for col in ("", "plain loop", "execute", "execute / plain"):
        table.add_column(col, justify="right")
    for i, label in enumerate(("CPU time per iteration", "wall time per iteration")):
        plain, ex = statistics.median(rows["plain"][i]), statistics.median(rows["execute"][i])
        table.add_row(label, f"{plain * 1e3:.2f} ms", f"{ex * 1e3:.2f} ms", f"{ex / plain:.3f}")
    console = Console()
    console.print(table)
    console.print(f"losses agree within {same:.1e} relative (same model, data and optimizer); target: ratio <= 1.05")


if __name__ == "__main__":
    main()
