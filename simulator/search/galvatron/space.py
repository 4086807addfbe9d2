"""Galvatron-BMW's strategy space as a decision tree, and its pruning.

The tree has four levels, outermost first (Galvatron-BMW, Miao et al. 2023, section 4):

1. pipeline: how many stages and which device group each stage gets. Degrees are powers of two; on a
   cluster of several node groups (e.g. A100 and V100 nodes) a stage never straddles two groups unless
   the stage size forces it, and each group may be cut into its own power-of-two number of stages, so
   stages of different GPU types (and sizes) follow each other.
2. tensor parallel degree of a layer: a power of two that stays inside one node (its collectives run on
   every layer, so they must use the fast intra-node fabric) and divides the heads and the FFN.
3. sequence parallel (only with tp > 1, and only where tp divides the sequence).
4. how the data-parallel replicas hold model states (ddp, zero2, zero3) and activation recompute
   (none, selective, full).

A data-parallel degree of 1 makes ddp/zero2/zero3 the same strategy, so only ddp is kept there.
Strategies dominated in both time and memory by another of the same layout are dropped after costing
(`prune_dominated`).

`SearchSpace` narrows the tree (no ZeRO-3, no recompute, tensor parallel up to a degree): what one
dimension of the space is worth is the difference it makes to the chosen plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hwmodel.cluster import ClusterSpec
from hwmodel.errors import UserError
from simulator.plan import DpType, Recompute
from workloads.config import WorkloadConfig

DP_TYPES: tuple[DpType, ...] = ("ddp", "zero2", "zero3")
RECOMPUTE: tuple[Recompute, ...] = ("none", "selective", "full")


@dataclass(frozen=True, order=True)
class Strategy:
    """What one transformer block does inside its stage."""

    tp: int
    sequence_parallel: bool
    dp_type: DpType
    recompute: Recompute

    @property
    def layout(self) -> tuple[int, bool]:
        """What the block's activations look like to its neighbours: changing it moves activations."""
        return (self.tp, self.sequence_parallel)

    def label(self) -> str:
        sp = "+sp" if self.sequence_parallel else ""
        return f"tp{self.tp}{sp}/{self.dp_type}/{self.recompute}"


@dataclass(frozen=True)
class StageGroup:
    """The devices of one pipeline stage: consecutive ranks [first, first + size)."""

    first: int
    size: int
    node_size: int  # devices per node in this group (bounds tp)

    @property
    def ranks(self) -> range:
        return range(self.first, self.first + self.size)

    @property
    def devices(self) -> str:
        return f"{self.first}-{self.first + self.size - 1}"


@dataclass(frozen=True)
class SearchSpace:
    """The part of the tree a search may use; the default is all of it.

    `dp_types`: how data-parallel replicas may hold model states (the embedding and output layers follow
    the plan-wide one of them); `recompute`: the recompute modes a block may use; `max_tp`: the largest
    tensor-parallel degree (None: a node).
    """

    dp_types: tuple[DpType, ...] = DP_TYPES
    recompute: tuple[Recompute, ...] = RECOMPUTE
    max_tp: int | None = None

    def __post_init__(self) -> None:
        for name, values, allowed in (("dp_types", self.dp_types, DP_TYPES), ("recompute", self.recompute, RECOMPUTE)):
            unknown = [v for v in values if v not in allowed]
            if not values or unknown:
                raise UserError(f"search space {name} takes some of {', '.join(allowed)}, got {list(values)}")
        if self.max_tp is not None and not is_power_of_two(self.max_tp):
            raise UserError(f"search space max_tp must be a power of two, got {self.max_tp}")

    def tp_limit(self, group: StageGroup) -> int:
        """The largest tensor-parallel degree on `group`: inside a node, and within `max_tp`."""
        limit = min(group.size, group.node_size)
        return limit if self.max_tp is None else min(limit, self.max_tp)


FULL_SPACE = SearchSpace()


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def powers_of_two(limit: int) -> list[int]:
    out, d = [], 1
    while d <= limit:
        out.append(d)
        d *= 2
    return out


def tp_allowed(workload: WorkloadConfig, tp: int) -> bool:
    """The model splits over `tp` devices (heads, kv heads and the FFN divide)."""
    return workload.num_heads % tp == 0 and workload.kv_heads % tp == 0 and workload.ffn % tp == 0


def sp_allowed(workload: WorkloadConfig, tp: int) -> bool:
    return tp > 1 and workload.seq_len % tp == 0


def layer_strategies(
    workload: WorkloadConfig, group: StageGroup, micro_step: int, space: SearchSpace = FULL_SPACE
) -> list[Strategy]:
    """The pruned strategies of one block on `group` when a micro-step carries `micro_step` sequences.

    Each data-parallel replica needs a whole number of sequences, so tp must leave a dp that divides the
    micro-step.
    """
    out = []
    for tp in powers_of_two(space.tp_limit(group)):
        if group.size % tp or not tp_allowed(workload, tp):
            continue
        dp = group.size // tp
        if micro_step % dp:
            continue
        for sp in (False, True) if sp_allowed(workload, tp) else (False,):
            dp_types: tuple[DpType, ...] = space.dp_types if dp > 1 else ("ddp",)
            for dp_type in dp_types:
                for recompute in space.recompute:
                    out.append(Strategy(tp, sp, dp_type, recompute))
    return out


def edge_strategies(
    workload: WorkloadConfig, group: StageGroup, micro_step: int, dp_type: DpType, space: SearchSpace = FULL_SPACE
) -> list[Strategy]:
    """Strategies of the embedding or output layer: the stage's tp, the plan's dp_type, no recompute."""
    out = []
    for tp in powers_of_two(space.tp_limit(group)):
        if group.size % tp or not tp_allowed(workload, tp) or micro_step % (group.size // tp):
            continue
        dp = group.size // tp
        out.append(Strategy(tp, sp_allowed(workload, tp), dp_type if dp > 1 else "ddp", "none"))
    return out


def prune_dominated(
    strategies: Sequence[Strategy], time: Sequence[float], memory: Sequence[float], reserve: Sequence[float]
) -> list[int]:
    """Indices of the strategies no other strategy of the same layout beats in time, memory and reserve.

    Same layout matters: two layouts differ in what it costs to switch to the neighbours, so a slower
    layout may still win inside a run of layers. Ties keep the first (deterministic).
    """
    keep = []
    by_layout: dict[tuple[int, bool], list[int]] = {}
    for i, s in enumerate(strategies):
        by_layout.setdefault(s.layout, []).append(i)
    for members in by_layout.values():
        for i in members:
            ti, mi, ri = time[i], memory[i], reserve[i]
            dominated = False
            for j in members:
                if j == i:
                    continue
                tj, mj, rj = time[j], memory[j], reserve[j]
                if tj <= ti and mj <= mi and rj <= ri and (j < i or tj < ti or mj < mi or rj < ri):
                    dominated = True
                    break
            if not dominated:
                keep.append(i)
    return sorted(keep)


def _group_ranges(cluster: ClusterSpec) -> list[tuple[int, int, int]]:
    """(first rank, devices, devices per node) of each node group, in rank order."""
    out, first = [], 0
    for group in cluster.node_groups:
        n = group.count * group.node.num_devices
        out.append((first, n, group.node.num_devices))
        first += n
    return out


def stage_layouts(cluster: ClusterSpec, num_layers: int, max_pp: int | None = None) -> list[tuple[StageGroup, ...]]:
    """The pipeline level of the tree: every way the cluster is cut into stages.

    Equal stages of a power-of-two size in rank order, and, on a cluster of several node groups, each
    group cut into its own power-of-two number of equal stages (stages of different device types and
    sizes). At most `num_layers` stages (each holds a block).
    """
    n = cluster.num_devices
    groups = _group_ranges(cluster)
    node_size_at = {}
    for first, count, node_size in groups:
        for r in range(first, first + count):
            node_size_at[r] = node_size
    limit = min(num_layers, max_pp or num_layers)
    layouts: list[tuple[StageGroup, ...]] = []
    seen = set()

    def add(layout: tuple[StageGroup, ...]) -> None:
        key = tuple((g.first, g.size) for g in layout)
        if key not in seen and 1 <= len(layout) <= limit:
            seen.add(key)
            layouts.append(layout)

    for pp in powers_of_two(limit):
        if n % pp:
            continue
        size = n // pp
        add(
            tuple(
                StageGroup(i * size, size, min(node_size_at[r] for r in range(i * size, (i + 1) * size)))
                for i in range(pp)
            )
        )
    if len(groups) > 1:
        # Each group cut into its own number of stages: every combination of powers of two.
        options = []
        for first, count, node_size in groups:
            options.append([(first, count // k, node_size, k) for k in powers_of_two(count) if count % k == 0])
        combos: list[list[tuple[int, int, int, int]]] = [[]]
        for opts in options:
            combos = [c + [o] for c in combos for o in opts]
        for combo in combos:
            counts = [k for *_, k in combo]
            # Stage counts per group within a factor of 4 of each other, at most 16 stages in all: finer
            # cuts of one group against a coarse other only add bubble (and search time).
            if max(counts) > 4 * min(counts) or sum(counts) > 16:
                continue
            layout = tuple(
                StageGroup(first + i * size, size, node_size) for first, size, node_size, k in combo for i in range(k)
            )
            add(layout)
    return layouts


def micro_step_options(global_batch: int, layout: Sequence[StageGroup]) -> list[int]:
    """Sequences per micro-step: divisors of the global batch that at least one tp per stage can split."""
    out = []
    for b in range(1, global_batch + 1):
        if global_batch % b:
            continue
        # The largest tp a stage can use leaves dp = size / tp replicas; they must divide b.
        if all(b % max(1, g.size // min(g.size, g.node_size)) == 0 for g in layout):
            out.append(b)
    return out
