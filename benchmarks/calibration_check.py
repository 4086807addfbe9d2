"""Check a calibrated spec on work it was not fitted on: one GPT decoder layer, forward + backward,
in every dtype asked for (default fp32 and bf16), all predicted from the one spec.

Usage:
    python benchmarks/calibration_check.py --cluster my-box.yaml [--raw my-box.json] [--dtype fp32,bf16]
        [--hidden 384] [--heads 6] [--seq 256] [--micro-batch 4] [--dropout/--no-dropout] [--repeats 7]

Builds the layer the way the workloads count it (pre-norm, q/k/v projections, causal SDPA, output
projection, GELU MLP, residuals, dropout when asked), times forward and forward + backward on this
machine with the spec's threads per rank, and prints them next to the simulator's prediction from
the spec (`simulator.cost.compute.layer_times`), which uses the dtype's own curves under
`compute.per_dtype`. With `--raw` (the timings `execute calibrate --raw` wrote with the spec), a last
column predicts as calibrations did before `per_dtype`: the curve dtype's curves shared by every dtype,
each at the matrix peak that makes them reproduce its total GEMM time (`MatmulFit.shared_peaks`),
elementwise rates unchanged. bf16 and fp16 run under CPU autocast, as the
executor runs them without FSDP. One process: the spec's figures were measured with all its ranks
running at once, so on a machine where ranks contend for memory bandwidth, expect this single rank
to run a little faster than predicted. Timing is thread CPU time with one thread (immune to other
processes), else wall time; medians of the repeats, with the spread (max / min - 1) of the step
times shown for the noise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.nn import functional as F

from executor.calibrate.fit import fit_matmul
from hwmodel import load_cluster
from hwmodel.components import DeviceSpec, DtypeEfficiency
from simulator.cost.compute import layer_times, roofline
from workloads.config import WorkloadConfig
from workloads.ops import ShardShape
from workloads.transformer import layer_profile


class Block(nn.Module):
    """A GPT-2 pre-norm decoder block with separate q/k/v projections."""

    def __init__(self, h: int, heads: int, dropout: float):
        super().__init__()
        self.h, self.heads = h, heads
        self.ln1, self.ln2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(h, h) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(h, 4 * h), nn.Linear(4 * h, h)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        y = self.ln1(x)
        q, k, v = (w(y).view(b, s, self.heads, h // self.heads).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.drop(self.wo(a.transpose(1, 2).reshape(b, s, h)))
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.ln2(x)))))


def measure(block: nn.Module, x: torch.Tensor, dtype: str, repeats: int, clock) -> tuple[float, float, float]:
    """(forward, forward + backward, spread of forward + backward) in seconds, medians of `repeats`."""
    params = list(block.parameters())
    autocast = torch.autocast(
        "cpu", dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype, torch.float32), enabled=dtype != "fp32"
    )

    def forward():
        with autocast:
            return block(x)

    def step():
        for p in params:
            p.grad = None
        x.grad = None
        forward().float().sum().backward()

    for _ in range(2):
        step()  # warm-up: allocator, kernel selection
    fwd_s, step_s = [], []
    for _ in range(repeats):
        t0 = clock()
        out = forward()
        fwd_s.append(clock() - t0)
        del out
        t0 = clock()
        step()
        step_s.append(clock() - t0)
    return statistics.median(fwd_s), statistics.median(step_s), max(step_s) / min(step_s) - 1


def shared_curve_device(device: DeviceSpec, raw: dict) -> DeviceSpec:
    """`device` as a calibration before `per_dtype` would have written it from the same timings."""
    mm = fit_matmul(raw["gemm"], raw["curve_dtype"], raw["gemm_zero_s"])
    compute = device.compute
    vector_only = {
        d: DtypeEfficiency(vector_efficiency=e.vector_efficiency)
        for d, e in compute.per_dtype.items()
        if e.vector_efficiency is not None
    }
    matrix = {d: mm.shared_peaks.get(d, peak) for d, peak in compute.matrix.items()}
    return device.model_copy(
        update={"compute": compute.model_copy(update={"per_dtype": vector_only, "matrix": matrix})}
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cluster", required=True, help="calibrated cluster YAML (execute calibrate --out)")
    parser.add_argument("--raw", help="its timings (execute calibrate --raw): adds the shared-curves prediction")
    parser.add_argument("--dtype", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16 (default fp32,bf16)")
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--dropout", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    if not dtypes or any(d not in ("fp32", "bf16", "fp16") for d in dtypes):
        parser.error(f"--dtype {args.dtype!r}: a comma-separated list of fp32, bf16, fp16")

    cluster = load_cluster(args.cluster)
    device = cluster.node_groups[0].node.device
    shared = shared_curve_device(device, json.loads(Path(args.raw).read_text(encoding="utf-8"))) if args.raw else None
    ranks = cluster.node_groups[0].node.num_devices
    threads = int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // ranks))
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    clock = time.thread_time if threads == 1 else time.perf_counter

    block = Block(args.hidden, args.heads, 0.1 if args.dropout else 0.0).train()
    x = torch.randn(args.micro_batch, args.seq, args.hidden, requires_grad=True)
    cfg = WorkloadConfig(
        name="check",
        family="gpt",
        num_layers=1,
        hidden_size=args.hidden,
        num_heads=args.heads,
        vocab_size=1024,
        seq_len=args.seq,
        dropout=args.dropout,
    )

    table = Table(
        title=f"{args.cluster}: GPT layer h={args.hidden} heads={args.heads} seq={args.seq} "
        f"mb={args.micro_batch}{' +dropout' if args.dropout else ''}, {threads} thread(s), one spec"
    )
    for col in ("dtype", "", "predicted", "measured", "error", "spread") + (("shared curves",) if shared else ()):
        table.add_column(col, justify="left" if col in ("dtype", "") else "right")
    for dtype in dtypes:
        fwd, total, spread = measure(block, x, dtype, args.repeats, clock)
        shape = ShardShape(micro_batch=args.micro_batch, seq_len=args.seq, dtype_bytes=4 if dtype == "fp32" else 2)
        profile = layer_profile(cfg, "decoder", shape)
        pred = layer_times(profile, roofline(device, dtype))
        alt = layer_times(profile, roofline(shared if shared else device, dtype))
        for label, p, a, m in (
            ("forward", pred.forward, alt.forward, fwd),
            ("backward", pred.backward, alt.backward, total - fwd),
            ("forward + backward", pred.forward + pred.backward, alt.forward + alt.backward, total),
        ):
            table.add_row(
                dtype if label == "forward" else "",
                label,
                f"{p * 1e3:.2f} ms",
                f"{m * 1e3:.2f} ms",
                f"{p / m - 1:+.0%}",
                f"{spread:.0%}" if label == "forward + backward" else "",
                *((f"{a / m - 1:+.0%}",) if shared else ()),
            )
        table.add_section()
    Console().print(table)


if __name__ == "__main__":
    main()
