"""Fused (flash) attention efficiency against sequence length on this GPU: how the fraction of the matrix
peak that attention reaches grows with the kernel's size. Needs CUDA (run by scripts/gpu_check.sh).

Usage:
    python benchmarks/attention_gpu.py [--heads 32] [--head-dim 128] [--out attention.json]

For each sequence length, PyTorch's scaled_dot_product_attention with the flash backend (causal, bf16,
batch 1) runs forward and backward; the median of several CUDA-event timings after warm-up is kept.
Efficiency uses the simulator's own FLOP convention (workloads/transformer.py): forward core FLOPs
4*b*heads*s^2*d/2 under a causal mask, backward 2.5 times that, over the catalog device's dense bf16
peak. The simulator keys `attention_efficiency` by these FLOPs, so the JSON's (flops, efficiency) pairs
are points of that curve for this device.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

# Run as a script: the repository's packages and scripts/ are importable only after these lines.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from one_gpu_cluster import catalog_device

from hwmodel.catalog import load_device

SEQ_LENS = [1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072]


def _time(fn, reps: int) -> float:
    """Median seconds of `fn` over `reps` runs, after two warm-ups, timed with CUDA events."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def measure(seq: int, heads: int, head_dim: int) -> tuple[float, float]:
    """(forward seconds, backward seconds) of causal flash attention at this length."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    q, k, v = (
        torch.randn(1, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)
    )
    reps = 10 if seq <= 16384 else 3
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        forward = _time(lambda: sdpa(q, k, v, is_causal=True), reps)
        out = sdpa(q, k, v, is_causal=True)
        grad = torch.randn_like(out)
        both = _time(lambda: torch.autograd.grad(sdpa(q, k, v, is_causal=True), (q, k, v), grad), reps)
    return forward, max(both - forward, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("attention_gpu: needs a CUDA device")
    name = torch.cuda.get_device_name(0)
    device_name = catalog_device(name, torch.cuda.get_device_properties(0).total_memory / 2**30) or "h100-sxm"
    peak = load_device(device_name).compute.peak("bf16", "matrix")
    rows = []
    for seq in SEQ_LENS:
        try:
            forward, backward = measure(seq, args.heads, args.head_dim)
        except torch.cuda.OutOfMemoryError:
            break
        core = 4 * args.heads * seq * seq * args.head_dim * 0.5
        rows.append(
            {
                "seq_len": seq,
                "forward_flops": core,
                "forward_s": forward,
                "backward_s": backward,
                "forward_efficiency": core / (forward * peak),
                "backward_efficiency": 2.5 * core / (backward * peak),
            }
        )
        torch.cuda.empty_cache()
    table = Table(
        title=f"causal flash attention (SDPA), {name}, heads {args.heads}, head dim {args.head_dim}, "
        f"bf16; efficiency of {device_name}'s {peak / 1e12:.0f} TFLOP/s"
    )
    for col in ("seq", "fwd FLOPs", "fwd ms", "bwd ms", "fwd eff.", "bwd eff."):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r["seq_len"]),
            f"{r['forward_flops']:.2e}",
            f"{r['forward_s'] * 1e3:.2f}",
            f"{r['backward_s'] * 1e3:.2f}",
            f"{r['forward_efficiency']:.3f}",
            f"{r['backward_efficiency']:.3f}",
        )
    Console(width=140).print(table)
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "gpu": name,
                    "catalog_device": device_name,
                    "peak_flops": peak,
                    "heads": args.heads,
                    "head_dim": args.head_dim,
                    "torch": torch.__version__,
                    "rows": rows,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
