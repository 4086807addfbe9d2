"""Context parallelism: the cp ranks of a replica each hold a share of every sequence's tokens, and
attention gathers the keys and values of all of them.

The split is load-balanced, as Megatron-LM splits causal sequences for context parallelism: the sequence
is cut into 2*cp chunks and rank r holds chunks r and 2*cp-1-r, so every rank holds the same share of the
causal score matrix. Everything outside attention is token-wise and runs on the rank's own tokens; the
positions (learned embeddings, rotary angles) are the tokens' places in the whole sequence.

Attention all-gathers the rank's keys and values over the cp group (in backward their gradients are
reduce-scattered back) and lets each query attend to every gathered key at or before its own position.
This moves the bytes ring attention moves (each rank receives the other ranks' keys and values once in
forward and returns their gradients once in backward) without overlapping them with the attention
compute, as the simulator's blocking-collective CPU model assumes. One difference to know at long
sequences: the attention's backward reads the gathered keys and values, so every layer holds all cp
ranks' keys and values from its forward to its backward (unless recompute drops them), where ring
attention holds its own and passes the others around again in backward; the simulator counts the ring's
memory, so a long-sequence cp plan without recompute needs more memory here than predicted.

Gradients of the weights are averaged over the data-parallel and context-parallel ranks together (the
flattened ("dp", "cp") mesh, see `executor.parallelize`): every rank's loss is the mean over its own
tokens and every rank holds as many tokens, so that average is the gradient of the mean over all tokens.

It composes with MEMO (`executor.offload`: the rank's tokens are split again by alpha; the gathered keys
and values are saved tensors of the attention core and go to host whole), with tensor parallelism (the attention sees this rank's heads as plain tensors, so the
gather runs on them unchanged; sequence parallelism gathers the rank's tokens back before attention) and
with pipelining (stages pass hidden states of the rank's tokens; the schedules infer their shape).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from workloads.torch_models import CausalLM


def local_positions(seq_len: int, cp: int, cp_rank: int) -> torch.Tensor:
    """Positions in the whole sequence of the tokens cp rank `cp_rank` holds: chunks r and 2*cp-1-r of 2*cp."""
    if seq_len % (2 * cp):
        raise ValueError(f"seq_len={seq_len} is not divisible by 2*cp={2 * cp}")
    chunk = seq_len // (2 * cp)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk)
    second = torch.arange((2 * cp - 1 - cp_rank) * chunk, (2 * cp - cp_rank) * chunk)
    return torch.cat((first, second))


class _GatherSequence(torch.autograd.Function):
    """All-gather along the sequence dimension (dim 2 of (batch, heads, seq, head_dim)), in cp-rank order;
    backward reduce-scatters the gradient, since every rank's queries read every rank's keys."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, size: int) -> torch.Tensor:
        ctx.group = group
        local = x.permute(2, 0, 1, 3).contiguous()  # the sequence first: all-gather concatenates dim 0
        out = local.new_empty((size * local.shape[0], *local.shape[1:]))
        dist.all_gather_into_tensor(out, local, group=group)
        return out.permute(1, 2, 0, 3)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        full = grad.permute(2, 0, 1, 3).contiguous()
        out = full.new_empty((full.shape[0] // dist.get_world_size(ctx.group), *full.shape[1:]))
        dist.reduce_scatter_single(out, full, op=dist.ReduceOp.SUM, group=ctx.group)
        return out.permute(1, 2, 0, 3), None, None


class SequenceContext:
    """What a context-parallel attention core needs: the cp group and which key each query may see."""

    def __init__(self, group, size: int, rank_positions: list[torch.Tensor], cp_rank: int, causal: bool):
        self.group, self.size = group, size
        keys = torch.cat(rank_positions)  # the gathered keys' positions, in cp-rank order
        queries = rank_positions[cp_rank]
        # True where the query may attend to the key (scaled_dot_product_attention's boolean mask).
        self.mask = (keys[None, :] <= queries[:, None]) if causal else None

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Keys or values of all cp ranks, (batch, heads, seq, head_dim)."""
        return _GatherSequence.apply(t, self.group, self.size)


def apply_context_parallel(model: CausalLM, group, cp: int, cp_rank: int, device: torch.device) -> torch.Tensor:
    """Make `model`'s embedding, rotary angles and attention work on this rank's share of the tokens.
    Returns the positions of those tokens (the trainer takes the same columns of every batch)."""
    cfg = model.cfg
    rank_positions = [local_positions(cfg.seq_len, cp, r).to(device) for r in range(cp)]
    mine = rank_positions[cp_rank]
    context = SequenceContext(group, cp, rank_positions, cp_rank, bool(cfg.causal))
    if model.embed is not None:
        model.embed.positions = mine
    for block in model.blocks.values():
        block.attn.positions, block.attn.num_positions = mine, cfg.seq_len
        block.attn.core.context = context
    return mine.cpu()
