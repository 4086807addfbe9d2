"""Activation checkpointing of blocks as the plan asks, with torch.utils.checkpoint (non-reentrant):

- `full` recomputes the whole block in backward from its input; `every-N` is `full` on every N-th block of
  a stage and none on the others (simulator.binding resolves it per block, so it arrives here as those two);
- `selective` (Megatron-LM's) checkpoints only the attention core (scores, softmax, dropout, context), which
  saves the largest tensors for the least recompute;
- `op-selective` (torchtitan's op-level selective checkpointing) checkpoints the whole block with a policy
  (`create_selective_checkpoint_contexts`): the outputs of the 1st, 3rd, ... matmul of the block (aten.mm /
  addmm, counted in forward order) and of the fused attention kernel (SDPA) are MUST_SAVE, every other op
  (the 2nd, 4th, ... matmul, norms, rotary, activation, residuals) PREFER_RECOMPUTE. The blocks of
  workloads.torch_models are laid out as torchtitan's (wq, wk, wv, wo, w1, w3, w2), so the outputs of wq,
  wv, w1 and w2 and of SDPA (output and log-sum-exp) are saved and wk, wo and w3 re-run, as the
  simulator's accounting has it (workloads.ops). flash-attn's kernel (CUDA, when installed) is not an aten
  operator: under op-selective its output is recomputed rather than saved.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from executor.memory import SavedTensorTracker, count_checkpoint_inputs
from workloads.torch_models import Block, CausalLM

RUNNABLE = ("none", "selective", "op-selective", "full")  # every-N arrives as full or none per block

_MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default}


def _attention_kernels() -> set[Any]:
    """The fused attention operators torchtitan's save list names (those this torch build has)."""
    names = (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    )
    return {getattr(torch.ops.aten, name).default for name in names if hasattr(torch.ops.aten, name)}


_FUSED_ATTENTION = _attention_kernels()


def op_selective_contexts() -> tuple[Any, Any]:
    """Fresh checkpoint contexts with torchtitan's op-level policy (a fresh matmul count per forward; the
    recompute replays the saved outputs by operator and order, without asking the policy again).

    What the policy saves is held in the contexts' shared storage, not as saved tensors, so a tracker's
    hooks would miss it: while one is active, each saved output is counted for as long as that storage
    lives (the checkpoint frame's, freed after the block's backward)."""
    matmuls = 0
    held: list[object] = []

    def save(ctx: Any) -> CheckpointPolicy:
        tracker = SavedTensorTracker.active
        if tracker is not None:
            outputs = ctx.op_output if isinstance(ctx.op_output, tuple) else (ctx.op_output,)
            held.extend(tracker.add(t) for t in outputs if isinstance(t, torch.Tensor))
        return CheckpointPolicy.MUST_SAVE

    def policy(ctx: Any, func: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        nonlocal matmuls
        if func in _FUSED_ATTENTION:
            return save(ctx)
        if func in _MATMULS:
            matmuls += 1
            if matmuls % 2 == 1:  # the 1st, 3rd, ... matmul saved; torchtitan recomputes every second
                return save(ctx)
        return CheckpointPolicy.PREFER_RECOMPUTE

    caching, cached = create_selective_checkpoint_contexts(policy)
    storage = getattr(cached, "storage", None)
    if isinstance(storage, dict):
        # A key no operator has: the handles live, and die, with the outputs they count.
        storage[("hetplan-saved-output-handles",)] = held
    return caching, cached


def apply_recompute(model: CausalLM, recompute_of: Callable[[int], str]) -> None:
    """Checkpoint each block as `recompute_of(block)` says: none, selective, op-selective or full."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    def wrap(module: nn.Module, **checkpoint_kwargs: Any) -> nn.Module:
        wrapper = checkpoint_wrapper(module, checkpoint_impl=CheckpointImpl.NO_REENTRANT, **checkpoint_kwargs)
        count_checkpoint_inputs(wrapper)
        return wrapper

    for name in list(model.blocks.keys()):
        mode = recompute_of(int(name))
        if mode == "full":
            model.blocks[name] = wrap(model.blocks[name])
        elif mode == "op-selective":
            model.blocks[name] = wrap(model.blocks[name], context_fn=op_selective_contexts)
        elif mode == "selective":
            attn = cast(Block, model.blocks[name]).attn
            # The wrapper stands in for the core and forwards to it (the annotation names the core alone).
            attn.core = wrap(attn.core)  # type: ignore[assignment]
