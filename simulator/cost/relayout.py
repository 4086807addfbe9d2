"""Moving one micro-batch's activations between two blocks' layouts within a pipeline stage.

Per-layer mixed strategies (Galvatron-BMW) give adjacent blocks different tensor-parallel degrees or
sequence parallelism; every model chunk starts and ends in the plan's own ("home") layout. The executor
moves activations between layouts in three steps (`executor/mixed_layout.relayout`), and this module
costs exactly those steps, so the search, both engines and the executor agree on what a change costs:

1. leave sequence parallelism: all-gather the sequence over the old tp group (backward: keep a chunk);
2. to a larger tp, all-gather the batch slices that merge (backward: keep a part); to a smaller tp,
   keep a part (backward: all-gather the gradient over the ranks whose slices split);
3. enter sequence parallelism: keep a chunk (backward: all-gather the gradient chunks over the new tp group).

A layout (tp, sp) on a stage of n devices runs tp-wide groups of n / tp data-parallel replicas; a
device holds the sequences of its replica (`BoundStage.micro_batch_of`), all of their tokens, or 1/tp of
them under sequence parallelism. Collective sizes follow `collective_time`: bytes of the full output.
"""

from __future__ import annotations

from dataclasses import dataclass

from hwmodel.cluster import ClusterSpec, GroupSpan
from simulator.binding import BoundStage
from simulator.cost.collectives import collective_time


@dataclass(frozen=True)
class Layout:
    """How a block's activations lie over a stage's devices."""

    tp: int
    sp: bool

    @classmethod
    def of(cls, tp: int, sequence_parallel: bool) -> Layout:
        """Sequence parallelism means nothing without tensor parallelism: tp 1 is one layout either way."""
        return cls(tp, bool(sequence_parallel and tp > 1))


@dataclass(frozen=True)
class Relayout:
    """The collectives of one layout change for one micro-batch, on one device: (kind, bytes, group)."""

    forward: tuple[tuple[str, float, GroupSpan], ...] = ()
    backward: tuple[tuple[str, float, GroupSpan], ...] = ()

    @property
    def forward_s(self) -> float:
        return sum(collective_time(kind, nbytes, span) for kind, nbytes, span in self.forward)

    @property
    def backward_s(self) -> float:
        return sum(collective_time(kind, nbytes, span) for kind, nbytes, span in self.backward)

    def __bool__(self) -> bool:
        return bool(self.forward or self.backward)


NONE = Relayout()


def relayout(
    cluster: ClusterSpec, stage: BoundStage, rank: int, src: Layout, dst: Layout, bytes_per_sequence: float
) -> Relayout:
    """The collectives that move the activations of `rank` from layout `src` to `dst` (and their gradients
    back), with `bytes_per_sequence` the bytes of one whole sequence's activations (tokens x hidden x
    element; under context parallelism, this rank's tokens)."""
    if src == dst:
        return NONE
    local = list(stage.ranks).index(rank) if rank in stage.ranks else 0

    def group(width: int, stride: int = 1) -> GroupSpan:
        """The `width` ranks, `stride` apart, of `rank`'s block of width x stride consecutive ranks."""
        block = width * stride
        first = local - local % block + local % stride
        return cluster.span([stage.ranks[first + i * stride] for i in range(width)])

    def full(layout: Layout) -> float:
        return stage.micro_batch_of(rank, layout.tp) * bytes_per_sequence

    forward, backward = [], []  # backward runs the steps in reverse: 3, 2, 1
    if src.sp and src.tp > 1:  # 1. the whole sequence on every tp rank
        forward.append(("all_gather", full(src), group(src.tp)))
    if dst.tp > src.tp:  # 2. fewer replicas: their batch slices merge
        forward.append(("all_gather", full(dst), group(dst.tp // src.tp, src.tp)))
    elif dst.tp < src.tp:  # more replicas: the gradient of the split slices is gathered back
        backward.append(("all_gather", full(src), group(src.tp // dst.tp, dst.tp)))
    if dst.sp and dst.tp > 1:  # 3. the gradient chunks of the sequence, gathered back
        backward.insert(0, ("all_gather", full(dst), group(dst.tp)))
    return Relayout(tuple(forward), tuple(backward))
