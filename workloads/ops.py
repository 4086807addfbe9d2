"""Operator tables: what one layer costs on one device for one micro-batch.

A `LayerProfile` lists the layer's operators with forward/backward FLOPs, bytes moved and kernel counts,
the activation bytes it keeps for backward under each recompute mode, its parameters, and the
tensor-parallel communication it needs. Everything is per device (after tensor, sequence and context
parallel sharding) and per micro-batch, in SI units. The simulator turns FLOPs and bytes into time with
a device's roofline; it never needs to know which model produced the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

MATRIX, ATTENTION, VECTOR = 0, 1, 2
UNIT_NAMES = ("matrix", "attention", "vector")
RECOMPUTE_MODES = ("none", "selective", "full")
# torchtitan's op-level selective checkpointing (its `_custom_policy` over `_save_list`): inside a block it
# saves the output of every aten.mm but the 2nd, 4th, ... (the 1st, 3rd, ... are saved: q, v, the MLP gate
# and down projections of a Llama block as torchtitan writes it, wq/wk/wv and w1/w3 separate) and the
# outputs of the fused attention kernel (output and log-sum-exp); everything else (norms, rotary, the
# activation, residuals, the other matmuls) re-runs in backward from the block input and what was saved.
OP_SELECTIVE = "op-selective"


@dataclass(frozen=True)
class ShardShape:
    """How one micro-batch of a layer is laid onto one device.

    Attributes:
        micro_batch: sequences per data-parallel replica per micro-step.
        seq_len: full sequence length (context parallelism splits it).
        tp: tensor-parallel degree.
        sequence_parallel: norms/dropouts sharded along tokens over the tp group.
        cp: context-parallel degree (tokens split over cp ranks).
        ep: expert-parallel degree (MoE experts split over ep ranks).
        dtype_bytes: bytes per activation/weight element (2 for fp16/bf16, 4 for fp32).
        attention: 'flash' (fused, nothing quadratic kept) or 'naive' (scores materialized).
        cross_entropy: the loss kernel, a property of the software stack: 'pytorch' (F.cross_entropy on
            fp32-upcast logits: keeps the fp32 softmax, backward makes fp32 gradients beside it), 'vocab_parallel'
            (Megatron's: keeps the fp32 softmax and writes the gradient into it) or 'fused' (flash-attn's
            cross-entropy kernel, as llm-foundry runs: keeps the bf16 logits and the log-sum-exp, backward
            writes one bf16 gradient).
    """

    micro_batch: int
    seq_len: int
    tp: int = 1
    sequence_parallel: bool = False
    cp: int = 1
    ep: int = 1
    dtype_bytes: int = 2
    attention: Literal["flash", "naive"] = "flash"
    cross_entropy: Literal["pytorch", "vocab_parallel", "fused"] = "pytorch"


def kernel_family(attention: str) -> Literal["flash", "naive"]:
    """The operators and saved tensors of a plan's attention kernel: every fused kernel (flash, flash_triton)
    has flash attention's; they differ only in how fast the device runs them (simulator.cost.compute)."""
    return "naive" if attention == "naive" else "flash"


@dataclass(frozen=True)
class Collective:
    kind: Literal["all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv"]
    nbytes: float  # total bytes of the full tensor (all-gather output / reduce-scatter input)
    group: Literal["tp", "cp", "ep"]


@dataclass(frozen=True, eq=False)  # identity hash: profiles are cached and used as cache keys
class LayerProfile:
    """Per-device, per-micro-batch costs of one layer (see module docstring)."""

    kind: str
    op_names: tuple[str, ...]
    unit: np.ndarray  # MATRIX / ATTENTION / VECTOR per op
    fwd_flops: np.ndarray
    fwd_bytes: np.ndarray
    bwd_flops: np.ndarray
    bwd_bytes: np.ndarray
    fwd_kernels: np.ndarray
    bwd_kernels: np.ndarray
    min_dim: np.ndarray  # smallest GEMM dimension of a matmul op; keys per call of a fused attention op; else 0
    selective: np.ndarray  # bool: op is recomputed under selective recompute
    op_selective: np.ndarray  # share of the op's forward op-selective recompute re-runs (0: its output saved)
    saved_bytes: dict[str, float]  # recompute mode -> activation bytes kept for backward
    params_local: float  # parameters held by this device (after tp/ep sharding)
    params_total: float  # parameters of the whole layer
    model_fwd_flops: float  # model FLOPs of the whole layer for this micro-batch (unsharded; causal scores halved)
    model_fwd_flops_selective: float  # the part of it selective recompute re-runs (the attention core)
    fwd_comm: tuple[Collective, ...]
    bwd_comm: tuple[Collective, ...]
    output_bytes: float  # activation sent to the next pipeline stage, per device
    tied_params_local: float = 0.0  # a tied output layer's copy of the embedding, held when on another stage
    # Temporaries backward allocates beside the saved tensors (per device), gone before the next layer's
    # backward: counted once, at the moment backward passes this layer.
    backward_workspace: float = 0.0
    # The half of causal score matrices a mask removes: not in model_fwd_flops, but Megatron-LM's, PaLM's
    # and llm-foundry's MFU formulas count it (simulator.metrics).
    model_fwd_flops_masked: float = 0.0

    def recompute_flops(self, mode: str) -> float:
        if mode == "full":
            return float(self.fwd_flops.sum())
        if mode == "selective":
            return float(self.fwd_flops[self.selective].sum())
        if mode == OP_SELECTIVE:
            return float((self.fwd_flops * self.op_selective).sum())
        return 0.0


class OpTableBuilder:
    """Accumulates operators and saved tensors for one layer."""

    def __init__(self, kind: str, shape: ShardShape):
        self.kind = kind
        self.shape = shape
        self.names: list[str] = []
        self.rows: list[tuple] = []
        self.saved = {"none": 0.0, "selective": 0.0}
        self.full_saved = 0.0
        self.params_local = 0.0
        self.params_total = 0.0
        self.model_flops = 0.0
        self.model_flops_selective = 0.0
        self.model_flops_masked = 0.0
        self.fwd_comm: list[Collective] = []
        self.bwd_comm: list[Collective] = []
        self.output_bytes = 0.0
        self.tied_params_local = 0.0
        self.backward_workspace = 0.0
        self.mm_count = 0  # aten.mm calls so far, as torchtitan's op-selective policy counts them
        self.op_selective_saved = 0.0  # output bytes op-selective saves
        self.op_selective_share: list[float] = []

    def op(
        self,
        name: str,
        unit: int,
        fwd_flops: float,
        fwd_bytes: float,
        *,
        bwd_flops: float | None = None,
        bwd_bytes: float | None = None,
        fwd_kernels: int = 1,
        bwd_kernels: int | None = None,
        selective: bool = False,
        model_flops: float = 0.0,
        min_dim: float = 0.0,
        mm_outputs: tuple[float, ...] = (),
        saved_output: float = 0.0,
    ) -> None:
        """Add one operator.

        Args:
            bwd_flops, bwd_bytes: default to 2x forward for matmuls (input and weight gradients) and
                1x FLOPs / 2x bytes for elementwise work.
            selective: the op is part of the attention core that selective recompute re-runs.
            model_flops: its FLOPs in the MFU convention (whole layer; a causal score matrix counts half).
            min_dim: for a matmul, its smallest dimension (m, k or n); for fused attention, the key/value
                length one kernel call runs over.
            mm_outputs: for a matmul, the output bytes of each aten.mm it stands for, in forward order
                (a fused q/k/v projection is three in torchtitan's blocks), its FLOPs split alike.
            saved_output: bytes op-selective recompute saves of a non-matmul op it keeps whole (the fused
                attention kernel's output and log-sum-exp); 0: the op re-runs.
        """
        if bwd_flops is None:
            bwd_flops = 2.0 * fwd_flops if unit == MATRIX else fwd_flops
        if bwd_bytes is None:
            bwd_bytes = 2.0 * fwd_bytes
        if bwd_kernels is None:
            bwd_kernels = 2 if unit == MATRIX else 1
        self.names.append(name)
        self.rows.append(
            (unit, fwd_flops, fwd_bytes, bwd_flops, bwd_bytes, fwd_kernels, bwd_kernels, min_dim, selective)
        )
        self.op_selective_share.append(self.op_selective_step(mm_outputs, saved_output))
        self.model_flops += model_flops
        if selective:
            self.model_flops_selective += model_flops

    def op_selective_step(self, mm_outputs: tuple[float, ...], saved_output: float) -> float:
        """Share of one op's forward that op-selective recompute re-runs; adds what it saves."""
        if saved_output > 0:
            self.op_selective_saved += saved_output
            return 0.0
        if not mm_outputs:
            return 1.0
        rerun = 0.0
        for nbytes in mm_outputs:
            self.mm_count += 1
            if self.mm_count % 2 == 0:  # torchtitan recomputes every second mm
                rerun += nbytes
            else:
                self.op_selective_saved += nbytes
        total = sum(mm_outputs)
        return rerun / total if total > 0 else 1.0

    def keep(self, nbytes: float, *, dropped_by_selective: bool = False) -> None:
        """Record a tensor kept for backward (no recompute); selective recompute may drop it."""
        self.saved["none"] += nbytes
        if not dropped_by_selective:
            self.saved["selective"] += nbytes

    def params(self, count: float, sharded: float = 1.0) -> None:
        """Add `count` parameters, split over `sharded` devices (tp, or tp*ep for experts)."""
        self.params_total += count
        self.params_local += count / sharded

    def build(self, full_saved: float) -> LayerProfile:
        arr = np.array([r[:8] for r in self.rows], dtype=float).reshape(-1, 8)
        sel = np.array([r[8] for r in self.rows], dtype=bool)
        unit = arr[:, 0].astype(int)
        return LayerProfile(
            kind=self.kind,
            op_names=tuple(self.names),
            unit=unit,
            fwd_flops=arr[:, 1],
            fwd_bytes=arr[:, 2],
            bwd_flops=arr[:, 3],
            bwd_bytes=arr[:, 4],
            fwd_kernels=arr[:, 5],
            bwd_kernels=arr[:, 6],
            min_dim=arr[:, 7],
            selective=sel,
            op_selective=np.array(self.op_selective_share, dtype=float),
            saved_bytes={
                "none": self.saved["none"],
                "selective": self.saved["selective"],
                "full": min(full_saved, self.saved["selective"]),
                # The block input (what the checkpoint keeps) and the saved outputs, never more than no
                # recompute keeps nor less than full recompute does.
                OP_SELECTIVE: min(
                    self.saved["none"],
                    max(min(full_saved, self.saved["selective"]), full_saved + self.op_selective_saved),
                ),
            },
            params_local=self.params_local,
            params_total=self.params_total,
            model_fwd_flops=self.model_flops,
            model_fwd_flops_selective=self.model_flops_selective,
            model_fwd_flops_masked=self.model_flops_masked,
            fwd_comm=tuple(self.fwd_comm),
            bwd_comm=tuple(self.bwd_comm),
            output_bytes=self.output_bytes,
            tied_params_local=self.tied_params_local,
            backward_workspace=self.backward_workspace,
        )
