"""Typed access to a causal LM's blocks while the plan is applied to them.

`nn.Module.__getattr__` types every submodule as `Tensor | Module`, so `model.blocks[name].attn` tells
a type checker nothing. These helpers name what the plan code relies on. A block may already be wrapped
when a later step reaches it (FSDP2 keeps the block's class as a base; a checkpoint wrapper forwards
attribute access to the block inside), so they are casts, not isinstance checks.
"""

from __future__ import annotations

from typing import cast

from torch import nn

from workloads.torch_models import Block


def blocks_of(model: nn.Module) -> nn.ModuleDict:
    """The `blocks` ModuleDict of a CausalLM (or of a part of one holding some of its blocks)."""
    found = model.get_submodule("blocks")
    assert isinstance(found, nn.ModuleDict), f"blocks is a {type(found).__name__}"
    return found


def block_items(model: nn.Module) -> list[tuple[str, Block]]:
    """(name, block) of every block, in order; a name is the block's layer index."""
    return [(name, cast(Block, block)) for name, block in blocks_of(model).items()]
