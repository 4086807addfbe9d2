"""Megatron-LM's tensor-parallel split of a causal LM with DTensor, and sequence parallelism on top of it.

The uniform path (`parallelize`) applies it to a whole chunk; the per-layer path (`mixed_layout`) to each group
of blocks that share a layout, on that layout's mesh.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from executor.parallel.blocks import block_items
from workloads.torch_models import CausalLM, InputLayer, OutputLayer

if TYPE_CHECKING:
    from torch.distributed.tensor.parallel import ParallelStyle


class ModelPart(nn.Module):
    """Some blocks of a model, with its embedding and head or not, shared with the model (not copied): a
    tensor-parallel split applied to the part edits the model's own modules."""

    def __init__(self, embed: InputLayer | None, head: OutputLayer | None, blocks: nn.ModuleDict):
        super().__init__()
        self.embed = embed
        self.head = head
        self.blocks = blocks


def apply_tensor_parallel(model: CausalLM | ModelPart, tp_mesh, sequence_parallel: bool) -> None:
    """Megatron-style tensor parallelism (and sequence parallelism) with DTensor."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        PrepareModuleOutput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    sp = sequence_parallel
    hidden_layout = Shard(1) if sp else Replicate()
    edge: dict[str, ParallelStyle] = {}
    if model.embed is not None:
        edge["embed.tok"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
        if sp:
            # Positions are added to the whole sequence; then each rank keeps its sequence shard.
            edge["embed"] = PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(1))
    if model.head is not None:
        if sp:
            edge["head.norm"] = SequenceParallel()
        # Logits stay sharded along the vocabulary; loss_parallel computes the cross-entropy on shards.
        edge["head.lm_head"] = ColwiseParallel(
            input_layouts=hidden_layout, output_layouts=Shard(-1), use_local_output=False
        )
    if edge:
        parallelize_module(model, tp_mesh, edge)
    for _, block in block_items(model):
        plan: dict[str, ParallelStyle] = {
            "attn.wq": ColwiseParallel(),
            "attn.wk": ColwiseParallel(),
            "attn.wv": ColwiseParallel(),
            "attn.wo": RowwiseParallel(output_layouts=hidden_layout),
            "mlp.w1": ColwiseParallel(),
            "mlp.w2": RowwiseParallel(output_layouts=hidden_layout),
        }
        if hasattr(block.mlp, "w3"):
            plan["mlp.w3"] = ColwiseParallel()
        if sp:
            plan.update(
                {
                    "attn_norm": SequenceParallel(),
                    "mlp_norm": SequenceParallel(),
                    "attn": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
                    "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
                }
            )
        parallelize_module(block, tp_mesh, plan)
