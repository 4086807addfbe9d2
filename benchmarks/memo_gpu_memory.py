"""Where MEMO's device memory goes on CUDA: allocated bytes after each block's forward and the peak over
forward and backward, for the plain block, token-wise recompute with alpha 0, MEMO's alpha and 1, plain
swapping of alpha (no recompute), and MEMO with the CPU synchronized at every block (which shows whether
the CPU running ahead of the GPU keeps swapped tensors alive). Needs CUDA.

Usage:
    python benchmarks/memo_gpu_memory.py [--layers 8] [--seq-len 16384] [--alpha 0.344] [--out FILE.json]

The model is tinyllama-1.1b cut to --layers blocks, bf16 weights, one sequence; bytes are
torch.cuda.memory_allocated above what the model and its input hold before forward.
"""

from __future__ import annotations

import argparse
import json
import sys
from itertools import pairwise
from pathlib import Path

import torch

# Run as a script: the repository's packages are importable only after this line.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from executor.offload import memo as offload
from executor.offload.memo import apply_offload
from workloads.catalog import load_workload
from workloads.torch_models import build_model, loss_fn

GIB = 2**30


def run(cfg, variant: str, alpha: float, sync: bool) -> dict:
    torch.manual_seed(0)
    model = build_model(cfg, "cuda").to(torch.bfloat16)
    if variant != "plain":
        recompute = "none" if variant == "swap" else "tokenwise"
        apply_offload(model, lambda block: (recompute, alpha))
    tokens = torch.randint(0, cfg.vocab_size, (1, cfg.seq_len), device="cuda")
    after_block: list[float] = []
    hooks = []
    for block in model.blocks.values():
        if sync:
            hooks.append(block.register_forward_pre_hook(lambda *_: torch.cuda.synchronize()))
        hooks.append(block.register_forward_hook(lambda *_: after_block.append(torch.cuda.memory_allocated())))
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = loss_fn(model(tokens), tokens.roll(-1, 1))
    after_forward = torch.cuda.memory_allocated()
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    for hook in hooks:
        hook.remove()
    del model, loss
    offload._Frame.in_flight.clear()
    torch.cuda.empty_cache()
    growth = [(b - a) / GIB for a, b in pairwise(after_block)]
    return {
        "variant": variant,
        "alpha": alpha,
        "sync": sync,
        "after_forward_gib": (after_forward - base) / GIB,
        "peak_gib": (peak - base) / GIB,
        "per_block_growth_gib": growth,
        "host_peak_gib": offload.STATS.host_peak / GIB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=16384)
    parser.add_argument("--alpha", type=float, default=0.344)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("memo_gpu_memory: needs a CUDA device")
    cfg = load_workload("tinyllama-1.1b", args.seq_len).model_copy(update={"num_layers": args.layers})
    rows = []
    for variant, alpha, sync in [
        ("plain", 0.0, False),
        ("tokenwise", 0.0, False),
        ("tokenwise", args.alpha, False),
        ("tokenwise", 1.0, False),
        ("tokenwise", args.alpha, True),
        ("swap", args.alpha, False),
    ]:
        offload.STATS.host_peak = 0
        try:
            row = run(cfg, variant, alpha, sync)
        except torch.cuda.OutOfMemoryError as exc:
            row = {"variant": variant, "alpha": alpha, "sync": sync, "error": str(exc)[:200]}
            torch.cuda.empty_cache()
        rows.append(row)
        growth = row.get("per_block_growth_gib", [])
        after, peak = row.get("after_forward_gib", float("nan")), row.get("peak_gib", float("nan"))
        print(
            f"{variant:10s} alpha {alpha:.3f} sync {sync!s:5s}: after forward {after:6.2f} GiB, peak {peak:6.2f} GiB, "
            f"per block {' '.join(f'{g:.2f}' for g in growth)}, "
            f"host peak {row.get('host_peak_gib', 0):.2f} GiB {row.get('error', '')}",
            flush=True,
        )
    if args.out:
        args.out.write_text(json.dumps({"layers": args.layers, "seq_len": args.seq_len, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
