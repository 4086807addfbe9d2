"""MEMO on one GPU: the longest trainable sequence and the MFU of a ~1B model with no recompute, full
recompute and MEMO (token-wise recompute with alpha swapped to host), measured and predicted. Needs CUDA
(run by scripts/gpu_check.sh).

Usage:
    python benchmarks/memo_gpu.py --cluster ONE_GPU.yaml [--workload tinyllama-1.1b] [--seq-lens 16384,32768,...]
        [--budget-s 240] [--out memo_gpu.json]

Each mode climbs the sequence lengths in a process of its own (an out-of-memory error ends that mode's
climb and its process, so no allocator state carries over to the next mode), one micro-batch of one
sequence, bf16, 1 warm-up and 2 measured iterations (one iteration, no warm-up, once an iteration takes
over 5 s: it shows the length trains, and the warm-up's extra cost is small beside it). A mode also stops
when the next length's iteration, extrapolated from the last one by the ratio of model FLOPs, would not
fit in its share of --budget-s: then the longest length is a lower bound ("time cap"), and the table also gives
the length at which the measured peak memory, extended linearly in the sequence length, would reach the GPU's
memory. MEMO's alpha at each length is what `simulate search memo` would choose on this cluster
(PCIe bandwidth, layer time and this machine's host memory: see scripts/one_gpu_cluster.py).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODES = ("none", "full", "memo")
BASE_PLAN = "micro_batch=1,global_batch=1,dtype=bf16"
LONG_ITERATION_S = 5.0


def _plan_for(mode: str, cfg, cluster):
    from simulator.plan import parse_shorthand
    from simulator.search.memo.search import choose_alpha

    plan = parse_shorthand(BASE_PLAN)
    if mode == "full":
        return plan.model_copy(update={"recompute": "full"}), None
    if mode == "memo":
        choice = choose_alpha(plan, cfg, cluster)
        return plan.model_copy(update={"recompute": "tokenwise", "offload": choice.alpha}), choice
    return plan, None


def climb(mode: str, workload: str, cluster_ref: str, seq_lens: list[int], budget_s: float) -> None:
    """One mode's ladder, in this process; prints one JSON line per length."""
    import torch

    from executor.checks import admit
    from executor.cli import _predict
    from executor.job import Job
    from executor.launch import RankFailure, run_jobs
    from executor.results import measured_report
    from hwmodel.catalog import load_cluster
    from workloads.catalog import load_workload

    cluster = load_cluster(cluster_ref)
    deadline = time.monotonic() + budget_s
    last = None  # (model FLOPs, iteration seconds) of the last length that ran
    for seq in seq_lens:
        cfg = load_workload(workload, seq)
        plan, choice = _plan_for(mode, cfg, cluster)
        bound, device_type, _ = admit(plan, cfg, cluster, True)
        predicted = _predict(bound, "des")
        row = {
            "mode": mode,
            "seq_len": seq,
            "plan": plan.model_dump(mode="json", exclude_defaults=True),
            "alpha_reason": choice.reason if choice else None,
            "predicted": {
                "iteration_time_s": predicted.iteration_time_s,
                "mfu": predicted.mfu,
                "peak_memory_bytes": predicted.peak_memory_bytes,
            },
        }
        warmup, steps = 1, 2
        if last is not None:
            estimate = last[1] * predicted.model_flops_per_iteration / last[0]
            if estimate > LONG_ITERATION_S:  # one iteration shows it trains; its own warm-up is a small part of it
                warmup, steps = 0, 1
            if (warmup + steps) * estimate + 10 > deadline - time.monotonic():
                row["status"] = f"time cap (next iteration ~{estimate:.0f} s)"
                print(json.dumps(row), flush=True)
                return
        row["iterations"] = {"warmup": warmup, "measured": steps}
        job = Job(
            workload=cfg,
            cluster_ref=cluster_ref,
            nodes=None,
            devices_per_node=None,
            plan=bound.plan,
            steps=steps,
            warmup=warmup,
            device_type=device_type,
        )
        try:
            (result,) = run_jobs([job])
        except RankFailure as exc:
            oom = "OutOfMemory" in str(exc) or "out of memory" in str(exc)
            row["status"] = "out of memory" if oom else f"failed: {str(exc)[:200]}"
            print(json.dumps(row), flush=True)
            return
        measured = measured_report(bound, result, [])
        row["status"] = "ran"
        row["measured"] = {
            "iteration_time_s": measured.iteration_time_s,
            "mfu": measured.mfu,
            "peak_memory_bytes": measured.peak_memory_bytes,
            "losses": result.losses,
        }
        print(json.dumps(row), flush=True)
        last = (predicted.model_flops_per_iteration, measured.iteration_time_s)
        del result
        torch.cuda.empty_cache()


def _memory_limit(rows: list[dict], capacity: float) -> int | None:
    """Sequence length at which the measured peak, extended linearly from the last two lengths, fills the GPU."""
    ran = [r for r in rows if r.get("status") == "ran"]
    if len(ran) < 2:
        return None
    (s0, m0), (s1, m1) = [(r["seq_len"], r["measured"]["peak_memory_bytes"]) for r in ran[-2:]]
    slope = (m1 - m0) / (s1 - s0)
    return int(s1 + (capacity - m1) / slope) if slope > 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cluster", required=True, help="one-GPU cluster YAML (scripts/one_gpu_cluster.py)")
    parser.add_argument("--workload", default="tinyllama-1.1b")
    parser.add_argument("--seq-lens", default="16384,32768,65536,131072")
    parser.add_argument("--budget-s", type=float, default=240.0, help="wall time for all the modes together")
    parser.add_argument(
        "--modes",
        default=",".join(MODES),
        help=f"comma-separated subset of {','.join(MODES)} (e.g. memo: spend the device time on one mode)",
    )
    parser.add_argument("--out", type=Path)
    parser.add_argument("--climb", choices=MODES, help=argparse.SUPPRESS)  # one mode, in a child process
    args = parser.parse_args()
    seq_lens = [int(s) for s in args.seq_lens.split(",")]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        parser.error(f"--modes: unknown {', '.join(unknown) or '(empty)'}; accepted: {', '.join(MODES)}")
    if args.climb:
        climb(args.climb, args.workload, args.cluster, seq_lens, args.budget_s)
        return

    import torch
    from rich.console import Console
    from rich.table import Table

    if not torch.cuda.is_available():
        sys.exit("memo_gpu: needs a CUDA device")
    capacity = torch.cuda.get_device_properties(0).total_memory
    rows: list[dict] = []
    start = time.monotonic()
    for i, mode in enumerate(modes):
        share = (args.budget_s - (time.monotonic() - start)) / (len(modes) - i)
        cmd = [
            sys.executable,
            __file__,
            "--climb",
            mode,
            "--cluster",
            args.cluster,
            "--workload",
            args.workload,
            "--seq-lens",
            args.seq_lens,
            "--budget-s",
            str(share),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=share + 120)
        got = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 and not any(r["status"] != "ran" for r in got):
            got.append({"mode": mode, "seq_len": None, "status": f"process failed: {proc.stderr.strip()[-300:]}"})
        rows.extend(got)
        print(f"{mode}: done in {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)

    table = Table(title=f"{args.workload} on one {torch.cuda.get_device_name(0)}: one sequence per iteration, bf16")
    for col in (
        "mode",
        "seq",
        "alpha",
        "status",
        "iter. meas.",
        "iter. pred.",
        "MFU meas.",
        "MFU pred.",
        "peak meas.",
        "peak pred.",
    ):
        table.add_column(col, justify="left" if col in ("mode", "status") else "right")
    for r in rows:
        m, p = r.get("measured"), r.get("predicted") or {}
        alpha = r.get("plan", {}).get("offload")
        table.add_row(
            r["mode"],
            str(r["seq_len"]),
            "-" if alpha is None else f"{alpha:.3f}",
            r["status"],
            f"{m['iteration_time_s']:.2f} s" if m else "-",
            f"{p['iteration_time_s']:.2f} s" if p else "-",
            f"{100 * m['mfu']:.1f}%" if m else "-",
            f"{100 * p['mfu']:.1f}%" if p else "-",
            f"{m['peak_memory_bytes'] / 2**30:.1f} GiB" if m else "-",
            f"{p['peak_memory_bytes'] / 2**30:.1f} GiB" if p else "-",
        )
    console = Console(width=170)
    console.print(table)
    summary = {}
    for mode in modes:
        mine = [r for r in rows if r["mode"] == mode]
        ran = [r for r in mine if r.get("status") == "ran"]
        stop = next((r["status"] for r in mine if r.get("status") != "ran"), "ran every length")
        summary[mode] = {
            "longest_run": ran[-1]["seq_len"] if ran else None,
            "stopped_by": stop,
            "memory_limit_estimate": _memory_limit(mine, capacity),
            "mfu_at_longest": ran[-1]["measured"]["mfu"] if ran else None,
        }
        console.print(
            f"{mode}: longest run {summary[mode]['longest_run']} tokens ({stop}); "
            f"measured peak reaches the GPU's memory near {summary[mode]['memory_limit_estimate']} tokens"
        )
    if args.out:
        args.out.write_text(
            json.dumps(
                {"gpu": torch.cuda.get_device_name(0), "capacity_bytes": capacity, "rows": rows, "summary": summary},
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
