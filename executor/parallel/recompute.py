"""Activation checkpointing of blocks as the plan asks: `full` recomputes the whole block in backward,
`selective` only the attention core (scores, softmax, dropout, context), which saves the largest tensors
for the least recompute."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

from torch import nn

from executor.memory import count_checkpoint_inputs
from workloads.torch_models import Block, CausalLM


def apply_recompute(model: CausalLM, recompute_of: Callable[[int], str]) -> None:
    """Checkpoint whole blocks (`full`) or their attention core (`selective`); `recompute_of(block)`."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    def wrap(module: nn.Module) -> nn.Module:
        wrapper = checkpoint_wrapper(module, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
        count_checkpoint_inputs(wrapper)
        return wrapper

    for name in list(model.blocks.keys()):
        mode = recompute_of(int(name))
        if mode == "full":
            model.blocks[name] = wrap(model.blocks[name])
        elif mode == "selective":
            attn = cast(Block, model.blocks[name]).attn
            # The wrapper stands in for the core and forwards to it (the annotation names the core alone).
            attn.core = wrap(attn.core)  # type: ignore[assignment]
