"""Context parallelism: the cp ranks of a replica each hold a share of every sequence's tokens, and
attention gathers the keys and values of all of them.

The split is load-balanced, as Megatron-LM splits causal sequences for context parallelism: the sequence
is cut into 2*cp chunks and rank r holds chunks r and 2*cp-1-r, so every rank holds the same share of the
causal score matrix. Everything outside attention is token-wise and runs on the rank's own tokens; the
positions (learned embeddings, rotary angles) are the tokens' places in the whole sequence.

Attention all-gathers the rank's keys and values over the cp group (in backward their gradients are
reduce-scattered back), puts them in sequence order, and runs each of the rank's two query chunks over
the keys up to its own end with a causal mask aligned there: every query sees exactly the keys at or
before its position, and key chunks after a query chunk are never computed.

This moves the bytes ring attention moves (each rank receives the other ranks' keys and values once in
forward and returns their gradients once in backward) without overlapping them with the attention
compute, as the simulator's blocking-collective CPU model assumes. One difference to know at long
sequences: the attention's backward reads the gathered keys and values, so every layer holds all cp
ranks' keys and values from its forward to its backward (unless recompute drops them), where ring
attention holds its own and passes the others around again in backward; the simulator counts the ring's
memory, so a long-sequence cp plan without recompute needs more memory here than predicted.

Gradients of the weights are averaged over the data-parallel and context-parallel ranks together (the
flattened ("dp", "cp") mesh, see `executor.parallel.parallelize`): every rank's loss is the mean over its own
tokens and every rank holds as many tokens, so that average is the gradient of the mean over all tokens.

It composes with MEMO (`executor.offload.memo`: the rank's tokens are split again by alpha; the gathered keys
and values are saved tensors of the attention core and go to host whole), with tensor parallelism (the
attention sees this rank's heads as plain tensors, so the gather runs on them unchanged; sequence
parallelism gathers the rank's tokens back before attention) and with pipelining (stages pass hidden
states of the rank's tokens; the schedules infer their shape).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from executor.parallel.blocks import block_items
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
    """What a context-parallel attention core needs: the cp group, and for each of the rank's two chunks of
    queries the keys it may see. Keys are put back in sequence order after the gather, so chunk g's queries
    attend to the prefix of (g + 1) chunks with a causal mask aligned to its end: the chunks after g are
    never computed, and every rank computes the same (2 * cp + 1) chunk pairs."""

    def __init__(self, group, size: int, rank_positions: list[torch.Tensor], cp_rank: int, causal: bool):
        self.group, self.size = group, size
        keys = torch.cat(rank_positions)  # the gathered keys' positions, in cp-rank order
        self.order = torch.argsort(keys)  # gathered index of each position, in sequence order
        queries = rank_positions[cp_rank]
        seq = len(keys)
        chunk = seq // (2 * size)
        self.blocks: list[tuple[slice, int, torch.Tensor | None]] = []  # (query rows, keys seen, mask)
        if not causal:
            self.blocks.append((slice(0, len(queries)), seq, None))
            return
        for start in range(0, len(queries), chunk):
            first = int(queries[start])  # a chunk's positions are consecutive
            end = first + chunk
            # True where the query at position first + i may see the key at position j: j <= first + i.
            mask = torch.ones(chunk, end, dtype=torch.bool, device=queries.device).tril(diagonal=first)
            self.blocks.append((slice(start, start + chunk), end, mask))

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Keys or values of all cp ranks, (batch, heads, seq, head_dim), in sequence order."""
        return _GatherSequence.apply(t, self.group, self.size)[:, :, self.order]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention) -> torch.Tensor:
        """`attention(q, k, v, mask)` of the rank's queries, block by block, over the gathered keys."""
        k, v = self.gather(k), self.gather(v)  # before the GQA repeat: fewer bytes
        outs = [attention(q[:, :, rows], k[:, :, :end], v[:, :, :end], mask) for rows, end, mask in self.blocks]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def apply_context_parallel(model: CausalLM, group, cp: int, cp_rank: int, device: torch.device) -> torch.Tensor:
    """Make `model`'s embedding, rotary angles and attention work on this rank's share of the tokens.
    Returns the positions of those tokens (the trainer takes the same columns of every batch)."""
    cfg = model.cfg
    rank_positions = [local_positions(cfg.seq_len, cp, r).to(device) for r in range(cp)]
    mine = rank_positions[cp_rank]
    context = SequenceContext(group, cp, rank_positions, cp_rank, bool(cfg.causal))
    if model.embed is not None:
        model.embed.positions = mine
    for _, block in block_items(model):
        block.attn.positions, block.attn.num_positions = mine, cfg.seq_len
        # workloads.torch_models.AttentionCore declares `context = None` without a type; it takes this one.
        block.attn.core.context = context  # type: ignore[assignment]
    return mine.cpu()
