"""MEMO in the executor on this machine: device-side activation bytes through the hooks, and step time vs
the prediction made with the calibrated `cpu-local` spec.

Usage:
    python benchmarks/memo_executor.py [--spec FILE] [--steps 5] [--warmup 2] [--out DIR] [--skip-timing]

Part 1 (hooks, one process): for `gpt-30m` (8 layers, hidden 512, 2 x 256 tokens, fp32) the bytes saved
for backward that are alive when forward ends, measured by `executor.memory.SavedTensorTracker` (the
executor's CPU memory account), with plain swapping (`recompute=none,offload=alpha`) and with MEMO
(`recompute=tokenwise,offload=alpha`), and the bytes copied to host (`executor.offload.memo.STATS`). With plain
swapping the blocks' device bytes must fall to (1 - alpha) of the plain run's; with MEMO the blocks keep
nothing on the device (swapped or recomputed). Byte counts are deterministic: one run each.

Part 2 (timing): each plan runs with `execute --json` (one thread per rank, as the spec was measured) and
is predicted on the same spec by both engines; the cp2 rows run on two ranks (`--only cp2` times just
them and the reference row). Without --spec the script first runs `execute calibrate
--ranks 2` (about two minutes) as `benchmarks/executor_accuracy.py` does, so the lead can rerun both on a
quiet machine with one calibration.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from executor_accuracy import calibrate, measure

from executor.memory import SavedTensorTracker
from executor.offload.memo import STATS, apply_offload
from hwmodel import load_cluster
from simulator.analytic import evaluate
from simulator.des import evaluate_des
from simulator.plan import parse_shorthand
from workloads import load_workload
from workloads.torch_models import build_model, loss_fn

WORKLOAD = "gpt-30m"
BASE = "micro_batch=8,global_batch=8,dtype=fp32"
PLANS = {  # name: (ranks, plan)
    "no recompute": (1, BASE),
    "full recompute": (1, f"{BASE},recompute=full"),
    "MEMO alpha=0 (all token-wise recompute)": (1, f"{BASE},recompute=tokenwise,offload=0"),
    "MEMO alpha=0.5": (1, f"{BASE},recompute=tokenwise,offload=0.5"),
    "MEMO alpha=1 (all swapped)": (1, f"{BASE},recompute=tokenwise,offload=1"),
    "plain swapping alpha=0.5": (1, f"{BASE},offload=0.5"),
    # Two ranks, each half of every sequence's tokens (context parallel), as MEMO's long-sequence plans run.
    "cp2, no recompute": (2, f"cp=2,{BASE}"),
    "MEMO cp2 alpha=0.5": (2, f"cp=2,{BASE},recompute=tokenwise,offload=0.5"),
}


def held_bytes(model, tokens) -> tuple[int, int]:
    """(bytes saved for backward alive at the end of forward, bytes copied to host) for one step."""
    STATS.reset()
    with SavedTensorTracker() as tracker:
        loss = loss_fn(model(tokens), tokens.roll(-1, 1))
        held = tracker.live_bytes
        loss.backward()
    return held, STATS.host_bytes


def hooks_table() -> pd.DataFrame:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = load_workload(WORKLOAD)
    base = build_model(cfg, "cpu")
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))

    def measure(recompute: str | None, alpha: float) -> tuple[float, float]:
        model = copy.deepcopy(base)
        if recompute is not None:
            apply_offload(model, lambda block: (recompute, alpha))
        return held_bytes(model, tokens)

    plain, _ = measure(None, 0.0)
    rest, _ = measure("none", 1.0)  # what the input and output layers hold (never swapped)
    blocks = plain - rest
    rows = [
        {
            "mode": "no swapping",
            "alpha": 0.0,
            "device bytes held": plain,
            "blocks' share held": 1.0,
            "expected": 1.0,
            "host bytes": 0,
        }
    ]
    for recompute in ("none", "tokenwise"):
        for alpha in (0.0, 0.25, 0.5, 0.75, 1.0):
            if recompute == "none" and alpha == 0.0:
                continue
            held, host = measure(recompute, alpha)
            rows.append(
                {
                    "mode": "plain swapping" if recompute == "none" else "MEMO (tokenwise)",
                    "alpha": alpha,
                    "device bytes held": held,
                    "blocks' share held": (held - rest) / blocks,
                    "expected": 1 - alpha if recompute == "none" else 0.0,
                    "host bytes": host,
                }
            )
    return pd.DataFrame(rows)


def timing_table(spec: Path, steps: int, warmup: int, only: str = "") -> pd.DataFrame:
    workload = load_workload(WORKLOAD)
    rows = []
    for name, (ranks, text) in PLANS.items():
        if only and only not in name and name != "no recompute":  # the ratio column divides by that row
            continue
        cluster = load_cluster(str(spec), devices_per_node=ranks)
        plan = parse_shorthand(text)
        measured = measure(spec, ranks, text, steps, warmup)["iteration_time_s"]
        des = evaluate_des(plan, workload, cluster)
        analytic = evaluate(plan, workload, cluster)
        rows.append(
            {
                "plan": name,
                "measured s": measured,
                "des s": des.iteration_time_s,
                "des error %": 100 * (des.iteration_time_s - measured) / measured,
                "analytic s": analytic.iteration_time_s,
                "analytic error %": 100 * (analytic.iteration_time_s - measured) / measured,
                "predicted recompute s": analytic.time_breakdown_s.recompute,
                "predicted stall s": analytic.time_breakdown_s.offload_stall,
            }
        )
        print(
            f"  {name:42s} measured {measured:7.3f} s  des {des.iteration_time_s:7.3f} s  "
            f"({rows[-1]['des error %']:+6.1f}%)",
            flush=True,
        )
    df = pd.DataFrame(rows)
    # Ratios to the plan without recompute, measured in the same run: a load that slows every plan alike cancels.
    df["measured / no recompute"] = df["measured s"] / df["measured s"].iloc[0]
    df["des / no recompute"] = df["des s"] / df["des s"].iloc[0]
    return df


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", type=Path, help="a cluster spec written by `execute calibrate --ranks 2`")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="where to write the calibration (default: a temp dir)")
    parser.add_argument("--skip-timing", action="store_true", help="only the hooks table (no calibration, no execute)")
    parser.add_argument("--only", default="", help="time only the plans whose name contains this (and 'no recompute')")
    args = parser.parse_args()
    fmt = {"float_format": lambda v: f"{v:,.3f}"}
    print(f"{WORKLOAD}: bytes saved for backward alive at the end of forward, fp32, 2 x 256 tokens")
    print(hooks_table().to_string(index=False, **fmt))
    if args.skip_timing:
        return
    spec = args.spec or calibrate(args.out or Path(tempfile.mkdtemp(prefix="hetplan-memo-")))
    print(f"\n{WORKLOAD} on {spec}, one rank (cp2: two), {args.steps} measured iterations after {args.warmup} warm-up")
    table = timing_table(spec, args.steps, args.warmup, args.only)
    print(table.to_string(index=False, **fmt))
    memo = table[table["plan"].str.startswith("MEMO")]
    print(f"worst |error| over the MEMO plans (des): {memo['des error %'].abs().max():.1f}%")


if __name__ == "__main__":
    main()
