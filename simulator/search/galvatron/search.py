"""Galvatron-BMW: per-layer hybrid-parallelism search under a memory budget, on uniform and mixed clusters.

The method (Miao et al., "Galvatron-BMW", 2023), as implemented here:

1. Decision tree (`galvatron_space`): pipeline outermost (the cluster cut into stages; on a cluster of
   several node groups each group may get its own number of stages, so stages differ in GPU type and
   size), then per layer tensor parallel inside a node in powers of two, sequence parallel, how
   data-parallel replicas hold model states, recompute. Strategies dominated in time and memory by one
   of the same layout are dropped.
2. Dynamic programming over layers (`galvatron_dp.chain_dp`): per stage, the cheapest strategy per layer
   under the stage's memory budget (the budget, or the device's capacity if smaller), with a transition
   cost where adjacent layers change layout (the executor's activation redistribution, costed as the
   engines cost it: `simulator.cost.relayout`). Memory counts model states,
   the activations of the micro-batches a 1F1B stage keeps in flight, buffers and the largest transient.
3. Stage partition: layers are split unevenly by what each stage can do in time and memory (the best
   bottleneck, then the least sum), and then the bi-objective balancing loop moves one layer at a time
   from the slowest stage to a neighbour that has the memory for it, re-running the per-layer choice,
   while the analytic model says throughput improves.
4. Ranking: every plan is evaluated by the analytic model as a whole (`simulator.analytic`), and must
   fit the budget there; the top K are re-ranked with the discrete-event engine (`simulator.des`).

Speed: configurations (batch, stage cut, micro-step, dp_type of the embedding/output layers) are visited
best lower bound first and skipped once their bound cannot beat the best plan found (branch and bound);
per-layer figures are costed once per (kind, device group shape, micro-step, strategy).

Memory grid: the per-stage program counts memory in buckets of 1/2048 of what the stage could ever hold
(capped at the device's capacity), independent of the budget, so a larger budget only adds solutions.
Layer memory is rounded up, so the program never accepts a plan it thinks fits but does not.

The baselines (`baselines.py`) are evaluated under the same budget and their plans join the pool, so the
chosen plan is never slower than a baseline that fits; `baselines_in_pool=False` keeps them apart, so the
search's own plan can be held against them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np

from hwmodel.cluster import ClusterSpec
from hwmodel.errors import UserError
from hwmodel.units import format_bytes
from simulator.analytic import evaluate_bound
from simulator.binding import bind
from simulator.errors import InfeasiblePlan, UnsupportedPlan
from simulator.plan import DpType, LayerStrategy, Plan, PlanDtype, StageSpec
from simulator.report import Report
from simulator.search.baselines import BaselineOutcome, evaluate_baselines
from simulator.search.galvatron.costs import CostTables
from simulator.search.galvatron.dp import INF, ChainElement, ChainResult, chain_dp, partition
from simulator.search.galvatron.space import (
    FULL_SPACE,
    SearchSpace,
    StageGroup,
    Strategy,
    edge_strategies,
    layer_strategies,
    micro_step_options,
    prune_dominated,
    stage_layouts,
)
from simulator.search.galvatron.split import split_candidates
from simulator.search.result import Baseline, Candidate, SearchResult
from simulator.stacks import carrying_stack
from workloads.config import WorkloadConfig
from workloads.transformer import layer_kinds

Progress = Callable[[int, int, str], None]  # (done, total, what is being searched)

MEMORY_BUCKETS = 2048  # grid of the per-stage memory program over min(device capacity, what the stage could hold)
BALANCE_CONFIGS = 4  # configurations the balancing loop refines with the analytic model
EDGE_DP_TYPES = ("ddp", "zero3")
FRONTIER_FRACTIONS = (1.0, 0.95, 0.9)  # memory shares at which each configuration's plans are rebuilt
RESERVE_LEVELS = 3  # levels of the largest transient + ZeRO buffer the per-stage program tries


def default_dtype(cluster: ClusterSpec) -> PlanDtype:
    """bf16 where every GPU has bf16 tensor cores, else fp16 (a V100 runs bf16 matmuls on its vector units)."""
    devices = {g.node.device.name: g.node.device for g in cluster.node_groups}
    if all("bf16" in d.compute.matrix for d in devices.values() if d.kind == "gpu"):
        return "bf16"
    return "fp16"


def uniform_view(cluster: ClusterSpec, group: int = 0) -> ClusterSpec:
    """The cluster as a planner that assumes uniform hardware sees it: every node like node group `group`.

    Ranks keep their positions (the node groups of the mixed clusters have equally many devices per
    node), so a plan found on the view runs unchanged on the real cluster.
    """
    g = cluster.node_groups[group]
    nodes = sum(x.count for x in cluster.node_groups)
    same_shape = all(x.node.num_devices == g.node.num_devices for x in cluster.node_groups)
    if not same_shape:
        raise UserError(f"cluster {cluster.name!r} mixes node sizes; a uniform view would move ranks")
    return cluster.replaced(
        name=f"{cluster.name} (as {g.name} only)", node_groups=(g.model_copy(update={"count": nodes}),)
    )


@dataclass
class _Pool:
    """Every plan the analytic model ranked, best samples/s first."""

    budget: float
    entries: dict[str, tuple[Plan, Report]] = field(default_factory=dict)
    least_memory: tuple[float, Plan] | None = None
    evaluated: int = 0
    search_best: float = 0.0  # samples/s of the best plan the search itself produced (baselines aside)

    def fits(self, report: Report) -> bool:
        return report.fits_memory and report.peak_memory_bytes <= self.budget

    def add(self, plan: Plan, report: Report, from_search: bool = True) -> bool:
        self.evaluated += 1
        if self.least_memory is None or report.peak_memory_bytes < self.least_memory[0]:
            self.least_memory = (report.peak_memory_bytes, plan)
        if not self.fits(report):
            return False
        if from_search:
            self.search_best = max(self.search_best, report.samples_per_s)
        key = report.plan.model_dump_json()  # dp and global batch filled in: one key per plan
        if key not in self.entries:
            self.entries[key] = (report.plan, report)
        return True

    def ranked(self) -> list[tuple[Plan, Report]]:
        return sorted(self.entries.values(), key=lambda pr: (-pr[1].samples_per_s, pr[0].model_dump_json()))


@dataclass
class _StageSolution:
    """How one stage holds `count` layers from `start`: strategies of its blocks and of its edge layers."""

    time: float
    blocks: list[Strategy]  # in block order
    edge: Strategy | None  # the embedding's (first stage) or the output layer's (last stage) strategy
    edge_out: Strategy | None = None  # the output layer's strategy when one stage holds both edges


class _Rebuild(Protocol):
    """Rebuilds a stage's solution for n layers within `fraction` of its memory (None: none fits)."""

    def __call__(self, n: int, fraction: float = 1.0) -> _StageSolution | None: ...


def _no_solution(n: int, fraction: float = 1.0) -> _StageSolution | None:
    return None


class _Options(NamedTuple):
    """The strategies one layer may take on a stage, after pruning, with their figures."""

    strategies: list[Strategy]
    time: np.ndarray  # seconds per micro-batch (`LayerFigures.objective`)
    memory: np.ndarray  # bytes: model states + saved activations of the micro-batches in flight
    reserve: np.ndarray  # bytes: ZeRO buffer + the largest transient
    output: np.ndarray  # bytes handed to the next layer


_StageKey = tuple[tuple, int, bool, bool, tuple | None, bool]
_Solved = tuple[np.ndarray, _Rebuild]


class _StageProgram:
    """The per-layer program of one stage: the chain of layers it walks, its memory grid, the chain DP at a
    few reserve levels, and the best time for every layer count with a way to rebuild the choice."""

    def __init__(self, search: _ConfigSearch, j: int, start: int, blocks: list[Strategy], edges: list[Strategy]):
        self.search = search
        self.ctx = search.ctx
        self.group = search.layout[j]
        self.first, self.last = j == 0, j == search.p - 1
        self.k = search.in_flight(j)
        self.num_layers = search.num_layers
        self.max_count = search.max_count
        self.order = self._chain_order(start)
        self.elems = self._block_options(blocks)
        self.edge_first = self._options(self.ctx.edge_kinds[0], 0, edges) if self.first else None
        self.edge_last = self._options(self.ctx.edge_kinds[1], self.num_layers + 1, edges) if self.last else None
        self.results: list[tuple[ChainResult, list[list[Strategy]], float]] = []
        # Set by run(): the memory grid, the layouts' indices, and the best time and result per layer count.
        self.capacity, self.delta = 0.0, 1.0
        self.reserves: list[float] = []
        self.lay_index: dict[tuple[int, bool], int] = {}
        self.best = np.full(self.max_count + 1, INF)
        self.who = np.full(self.max_count + 1, -1)

    def _chain_order(self, start: int) -> list[int]:
        """The blocks this stage's program walks: the last stage walks backwards from the output layer, so
        one pass answers every count for it too."""
        n, count = self.num_layers, self.max_count
        if self.first and self.last:
            return list(range(n))
        if self.first:
            return list(range(min(count, n)))
        if self.last:
            return list(range(n - 1, n - 1 - count, -1))
        return list(range(start, min(start + count, n)))

    def _options(self, kind: str, index: int, strategies: list[Strategy]) -> _Options:
        search = self.search
        m, k = search.m, self.k
        multi = search.p > 1
        figs = [self.ctx.tables.figures(kind, self.group, search.micro_step, s, multi, index) for s in strategies]
        usable = [i for i, f in enumerate(figs) if np.isfinite(f.time)]
        figs = [figs[i] for i in usable]
        strategies = [strategies[i] for i in usable]
        time = [f.objective(m) for f in figs]
        memory = [f.states + k * f.saved for f in figs]
        reserve = [f.comm_buffer + f.transient for f in figs]
        keep = prune_dominated(strategies, time, memory, reserve)
        return _Options(
            [strategies[i] for i in keep],
            np.array([figs[i].objective(m) for i in keep]),
            np.array([figs[i].states + k * figs[i].saved for i in keep]),
            np.array([figs[i].comm_buffer + figs[i].transient for i in keep]),
            np.array([figs[i].output_bytes for i in keep]),
        )

    def _block_options(self, blocks: list[Strategy]) -> list[_Options]:
        kinds = self.ctx.block_kinds
        by_kind: dict[str, _Options] = {}
        elems = []
        for b in self.order:
            if kinds[b] not in by_kind:
                by_kind[kinds[b]] = self._options(kinds[b], b + 1, blocks)
            elems.append(by_kind[kinds[b]])
        return elems

    @property
    def edges(self) -> list[_Options]:
        return [x for x in (self.edge_first, self.edge_last) if x is not None]

    def feasible(self) -> bool:
        """Every layer of the chain keeps at least one strategy."""
        return not any(len(e.strategies) == 0 for e in self.elems + self.edges)

    def _grid(self) -> None:
        """The memory the stage's layers may use and the grid the program counts it on."""
        search, group = self.search, self.group
        # Fixed memory: the two pipeline activation buffers between stages.
        out_bytes = max(float(e.output.max()) for e in self.elems)
        fixed = 2.0 * out_bytes if search.p > 1 else 0.0
        self.capacity = search.capacity_bytes(group) - fixed
        # The memory grid spans what this stage could ever hold (its hungriest strategies, or the device),
        # not the budget: more budget then only ever adds solutions.
        hungriest = sum(float(e.memory.max()) for e in self.elems) + max(float(e.reserve.max()) for e in self.elems)
        for edge in (self.edge_first, self.edge_last):
            if edge is not None:
                hungriest += float(edge.memory.max()) + float(edge.reserve.max())
        devices = self.ctx.cluster.topology.devices
        device_capacity = min(devices[r].memory.capacity for r in (group.first, group.first + group.size - 1))
        self.delta = max(min(device_capacity, hungriest), 1.0) / MEMORY_BUCKETS
        reserves = sorted({float(x) for e in self.elems + self.edges for x in e.reserve})
        if len(reserves) > RESERVE_LEVELS:
            picks = np.linspace(0, len(reserves) - 1, RESERVE_LEVELS).round().astype(int)
            reserves = [reserves[i] for i in sorted(set(picks))]
        self.reserves = reserves

    def _transition_matrix(self) -> np.ndarray:
        """Seconds to move activations between every two layouts the chain uses."""
        layouts = sorted({s.layout for e in self.elems + self.edges for s in e.strategies})
        self.lay_index = {lay: i for i, lay in enumerate(layouts)}
        mat = np.zeros((len(layouts), len(layouts)))
        for a, la in enumerate(layouts):
            for b, lb in enumerate(layouts):
                sa = Strategy(la[0], la[1], "ddp", "none")
                sb = Strategy(lb[0], lb[1], "ddp", "none")
                mat[a, b] = self.ctx.tables.transition(self.group, self.search.micro_step, sa, sb)
        return mat

    def _chain_for(self, level: float, edge_tp: int | None) -> tuple[list[ChainElement], list[list[Strategy]]] | None:
        """(ChainElements, the strategies they index) with strategies whose reserve is <= level."""
        chain: list[ChainElement] = []
        strategies: list[list[Strategy]] = []
        made: dict[tuple[int, int | None], tuple[ChainElement, list[Strategy]]] = {}

        def add(opt: _Options, restrict_tp: int | None = None) -> bool:
            hit = made.get((id(opt), restrict_tp))
            if hit is not None:
                chain.append(hit[0])
                strategies.append(hit[1])
                return True
            strat, t, w, r = opt.strategies, opt.time, opt.memory, opt.reserve
            idx = [i for i, s in enumerate(strat) if r[i] <= level and (restrict_tp is None or s.tp == restrict_tp)]
            if not idx:
                return False
            element = ChainElement(
                time=t[idx],
                weight=np.ceil(w[idx] / self.delta).astype(np.int64),
                layout=np.array([self.lay_index[strat[i].layout] for i in idx]),
            )
            made[(id(opt), restrict_tp)] = (element, [strat[i] for i in idx])
            chain.append(element)
            strategies.append(made[(id(opt), restrict_tp)][1])
            return True

        first, last = self.first, self.last
        if self.edge_first is not None and not add(self.edge_first, edge_tp):
            return None
        if last and not first and self.edge_last is not None and not add(self.edge_last):
            return None
        for e in self.elems:
            if not add(e):
                return None
        if first and last and self.edge_last is not None and not add(self.edge_last, edge_tp):
            return None
        return chain, strategies

    def run(self) -> np.ndarray:
        """Run the chain DP at each reserve level (and, where one stage holds both edges, for each tp of
        theirs); the best time for every layer count."""
        self._grid()
        trans = self._transition_matrix()
        if self.first and self.last:
            assert self.edge_first is not None
            edge_tps: Sequence[int | None] = sorted({s.tp for s in self.edge_first.strategies})
        else:
            edge_tps = [None]
        for level in self.reserves:
            cap = min(int(np.floor((self.capacity - level) / self.delta)), MEMORY_BUCKETS)
            if cap < 0:
                continue
            for edge_tp in edge_tps:
                built = self._chain_for(level, edge_tp)
                if built is None:
                    continue
                chain, strategies = built
                self.results.append((chain_dp(chain, trans, cap), strategies, level))
        self.ctx.dp_runs += len(self.results)
        return self._best_per_count()

    @property
    def offset(self) -> int:
        """Chain elements before the blocks: the embedding on the first stage, the output layer on the last."""
        first, last = self.first, self.last
        return 1 if (first or last) and not (first and last) else (1 if first else 0)

    def _best_per_count(self) -> np.ndarray:
        best = np.full(self.max_count + 1, INF)
        who = np.full(self.max_count + 1, -1)
        for ri, (res, _, _) in enumerate(self.results):
            if self.first and self.last:
                value = res.best[self.num_layers + 2]
                if value < best[self.num_layers]:
                    best[self.num_layers], who[self.num_layers] = value, ri
                continue
            for n in range(1, min(self.max_count, len(self.order)) + 1):
                value = res.best[n + self.offset]
                if value < best[n]:
                    best[n], who[n] = value, ri
        self.best, self.who = best, who
        return best

    def rebuild(self, n: int, fraction: float = 1.0) -> _StageSolution | None:
        """The stage's solution for n layers, within `fraction` of its memory (a point further down the
        memory/time frontier: the analytic model sometimes prefers it)."""
        who, best = self.who, self.best
        if n >= len(who) or who[n] < 0:
            return None
        length = self.num_layers + 2 if (self.first and self.last) else n + self.offset
        if fraction >= 1.0:
            res, strategies, _ = self.results[int(who[n])]
            picks = res.choices(length)
        else:
            best_value, pick = INF, None
            for res, strategies, level in self.results:
                cap = min(int(np.floor((fraction * self.capacity - level) / self.delta)), MEMORY_BUCKETS)
                value = res.best_within(length, cap) if length < len(res.best) else INF
                if value < best_value:
                    best_value, pick = value, (res, strategies, cap)
            if pick is None:
                return None
            res, strategies, cap = pick
            picks = res.choices(length, cap)
        chosen = [strategies[i][s] for i, s in enumerate(picks)]
        if self.first and self.last:
            return _StageSolution(float(best[n]), chosen[1:-1], chosen[0], chosen[-1])
        if self.first:
            return _StageSolution(float(best[n]), chosen[1:], chosen[0])
        if self.last:
            return _StageSolution(float(best[n]), chosen[1:][::-1], chosen[0])
        return _StageSolution(float(best[n]), chosen, None)


class _ConfigSearch:
    """One node of the pipeline level: a global batch, a cut into stages, a micro-step and the plan-wide
    dp_type of the embedding and output layers."""

    def __init__(
        self, ctx: _Context, global_batch: int, layout: tuple[StageGroup, ...], micro_step: int, edge_dp_type: DpType
    ):
        self.ctx = ctx
        self.global_batch = global_batch
        self.layout = layout
        self.micro_step = micro_step
        self.edge_dp_type: DpType = edge_dp_type
        self.p = len(layout)
        self.m = global_batch // micro_step
        self.num_layers = ctx.num_layers
        self.max_count = self.num_layers - (self.p - 1)
        self._solvers: dict[_StageKey, _Solved] = {}
        self.tables: list[np.ndarray] = []

    # ---- per stage ---------------------------------------------------------------------------------
    def in_flight(self, j: int) -> int:
        return min(self.m, self.p - j)

    def capacity_bytes(self, group: StageGroup) -> float:
        devices = {id(d): d for d in (self.ctx.cluster.topology.devices[r] for r in group.ranks)}.values()
        capacity = min(d.memory.capacity for d in devices)
        reserved = max(d.memory.reserved for d in devices)
        return min(self.ctx.budget, capacity) - reserved

    def _stage_key(self, j: int, start: int) -> _StageKey:
        """Stages with the same devices, micro-batches in flight, edges and block kinds solve the same program."""
        ctx = self.ctx
        first, last = j == 0, j == self.p - 1
        shape_key: tuple | None = None
        if not first and not last:
            span = tuple(ctx.block_kinds[start : start + self.max_count])
            shape_key = span if not ctx.homogeneous else ("same", len(span))
        return (ctx.group_signature(self.layout[j]), self.in_flight(j), first, last, shape_key, self.p > 1)

    def solve_stage(self, j: int, start: int) -> _Solved:
        """Best time of stage j for every layer count (index n), with a way to rebuild a solution.

        The first stage always starts at layer 0, the last always ends at the last layer; `start` only
        matters for the stages between them on models whose blocks differ (t5's encoder and decoder).
        """
        ctx = self.ctx
        if j == 0:
            start = 0
        key = self._stage_key(j, start)
        hit = self._solvers.get(key)
        if hit is not None:
            return hit
        group = self.layout[j]
        blocks = layer_strategies(ctx.workload, group, self.micro_step, ctx.space)
        edges = edge_strategies(ctx.workload, group, self.micro_step, self.edge_dp_type, ctx.space)
        result: _Solved = (np.full(self.max_count + 1, INF), _no_solution)
        if blocks and edges:
            program = _StageProgram(self, j, start, blocks, edges)
            if program.feasible():
                result = (program.run(), program.rebuild)
        self._solvers[key] = result
        return result

    # ---- across stages --------------------------------------------------------------------------------
    def stage_table(self, j: int) -> np.ndarray:
        """times[a, n] of stage j holding n layers from layer a (inf where not allowed)."""
        L, N = self.num_layers, self.max_count
        table = np.full((L + 1, N + 1), INF)
        first, last = j == 0, j == self.p - 1
        if first:
            best, _ = self.solve_stage(j, 0)
            if last:
                table[0, L] = best[L] if L <= N else INF
            else:
                table[0, : len(best)] = best[: N + 1]
            return table
        if last:
            best, _ = self.solve_stage(j, 0)
            for n in range(1, N + 1):
                table[L - n, n] = best[n]
            return table
        if self.ctx.homogeneous:
            best, _ = self.solve_stage(j, j)
            table[:, :] = best[None, : N + 1]
            return table
        for a in range(j, L - (self.p - 1 - j)):
            best, _ = self.solve_stage(j, a)
            table[a, : len(best)] = best[: N + 1]
        return table

    def lower_bound(self) -> float:
        """An estimate from below of the analytic iteration time of any plan of this configuration.

        With S_j the time of every block at its fastest (memory ignored) on stage j's devices, a stage
        holding the share f_j of the blocks takes f_j * S_j; the slowest stage takes at least
        1 / sum_j(1 / S_j) (shares in inverse proportion to speed), all together at least min_j S_j,
        and a 1F1B pipeline takes the sum plus (m - 1) times the slowest. Exact as a bound when all
        blocks are alike; on encoder-decoder models a close estimate.
        """
        ctx = self.ctx
        multi = self.p > 1
        whole: dict[tuple, float] = {}
        edge_best = [INF, INF]
        for g in self.layout:
            sig = ctx.group_signature(g)
            if sig in whole:
                continue
            blocks = layer_strategies(ctx.workload, g, self.micro_step, ctx.space)
            edges = edge_strategies(ctx.workload, g, self.micro_step, self.edge_dp_type, ctx.space)
            per_kind = {}
            for kind in dict.fromkeys(ctx.block_kinds):
                per_kind[kind] = min(
                    (ctx.tables.figures(kind, g, self.micro_step, s, multi).time for s in blocks), default=INF
                )
            whole[sig] = sum(per_kind[k] for k in ctx.block_kinds)
            for side, kind in enumerate(ctx.edge_kinds):
                index = 0 if side == 0 else self.num_layers + 1
                t = min(
                    (ctx.tables.figures(kind, g, self.micro_step, s, multi, index).time for s in edges), default=INF
                )
                edge_best[side] = min(edge_best[side], t)
        per_stage = [whole[ctx.group_signature(g)] for g in self.layout]
        if not all(np.isfinite(per_stage)):
            return INF
        slowest = 1.0 / sum(1.0 / x for x in per_stage)
        return min(per_stage) + sum(edge_best) + (self.m - 1) * slowest

    def partitions(self) -> list[tuple[float, list[int]]]:
        self.tables = [self.stage_table(j) for j in range(self.p)]
        return partition(self.tables, self.num_layers, self.m)

    def plan_for(self, counts: list[int], fraction: float = 1.0) -> Plan | None:
        """The plan of one partition, with each stage's per-layer strategies (within `fraction` of each
        stage's memory)."""
        ctx = self.ctx
        starts = [sum(counts[:j]) for j in range(self.p)]
        solutions = []
        for j, (a, n) in enumerate(zip(starts, counts)):
            _, rebuild = self.solve_stage(j, a)
            sol = rebuild(n, fraction)
            if sol is None:
                return None
            solutions.append(sol)
        per_block: list[Strategy] = []
        for sol, a in zip(solutions, starts):
            per_block.extend(_grouped(sol.blocks, ctx.block_kinds[a : a + len(sol.blocks)]))
        assert len(per_block) == self.num_layers
        first_edge = solutions[0].edge
        last_edge = solutions[-1].edge_out or solutions[-1].edge
        assert first_edge is not None and last_edge is not None
        stage_tps = []
        for j, sol in enumerate(solutions):
            if j == 0:
                stage_tps.append(first_edge.tp)
            elif j == self.p - 1:
                stage_tps.append(last_edge.tp)
            else:
                stage_tps.append(sol.blocks[0].tp)
        used_tps = {s.tp for s in per_block} | set(stage_tps)
        sp_everywhere = all(ctx.workload.seq_len % t == 0 for t in used_tps)
        dp0 = self.layout[0].size // stage_tps[0]
        return build_plan(
            per_block,
            self.layout,
            counts,
            stage_tps,
            self.edge_dp_type,
            sp_everywhere,
            dp0,
            self.micro_step,
            self.global_batch,
            ctx.dtype,
            not ctx.homogeneous,
        )


ORDER = {"ddp": 0, "zero2": 1, "zero3": 2, "none": 0, "selective": 1, "full": 2}


def _grouped(blocks: list[Strategy], kinds: Sequence[str]) -> list[Strategy]:
    """The same strategies with alike layers gathered: within a stretch of blocks of one kind and one
    layout the order is free (no transition between them), so equal strategies are made contiguous
    (fewer `layers` entries, the same memory and nearly the same time; the plan is re-evaluated anyway)."""
    out: list[Strategy] = []
    i = 0
    while i < len(blocks):
        j = i
        while j < len(blocks) and blocks[j].layout == blocks[i].layout and kinds[j] == kinds[i]:
            j += 1
        out.extend(sorted(blocks[i:j], key=lambda s: (ORDER[s.dp_type], ORDER[s.recompute])))
        i = j
    return out


def build_plan(
    per_block: list[Strategy],
    layout: tuple[StageGroup, ...],
    counts: list[int],
    stage_tps: list[int],
    dp_type: DpType,
    sequence_parallel: bool,
    dp0: int,
    micro_step: int,
    global_batch: int,
    dtype: PlanDtype,
    mixed_kinds: bool = False,
) -> Plan:
    """A plan in the shared contract: uniform fields where everything agrees, `stages` and `layers` where not.

    `mixed_kinds` (blocks of different kinds, e.g. t5's encoder and decoder) keeps the `layers` section even
    when every block has the same strategy: the binding of a plan without it costs a stage's blocks as one
    run of the first block's kind.
    """
    p = len(layout)
    uniform_layers = len(set(per_block)) == 1
    sizes = {g.size for g in layout}
    even = counts == _even(sum(counts), p) and len(sizes) == 1 and layout[0].first == 0
    same_tp = len(set(stage_tps)) == 1 and uniform_layers and per_block[0].tp == stage_tps[0]
    if uniform_layers and same_tp and per_block[0].dp_type == dp_type and not mixed_kinds:
        # One strategy everywhere: plan-wide fields, and explicit stages only where the split is uneven.
        s = per_block[0]
        stages = (
            ()
            if even
            else tuple(StageSpec(num_layers=n, devices=g.devices, tp=t) for n, g, t in zip(counts, layout, stage_tps))
        )
        return Plan(
            tp=s.tp,
            pp=p,
            dp=dp0,
            dp_type=s.dp_type,
            sequence_parallel=s.sequence_parallel,
            recompute=s.recompute,
            micro_batch=micro_step // dp0,
            global_batch=global_batch,
            schedule="1f1b",
            dtype=dtype,
            stages=stages,
        )
    layers = []
    start = 0
    for i in range(1, len(per_block) + 1):
        if i == len(per_block) or per_block[i] != per_block[start]:
            s = per_block[start]
            layers.append(
                LayerStrategy(
                    layers=(start, i - 1),
                    tp=s.tp,
                    dp_type=s.dp_type,
                    sequence_parallel=s.sequence_parallel,
                    recompute=s.recompute,
                )
            )
            start = i
    stages = tuple(StageSpec(num_layers=n, devices=g.devices, tp=t) for n, g, t in zip(counts, layout, stage_tps))
    return Plan(
        tp=stage_tps[0],
        pp=p,
        dp=dp0,
        dp_type=dp_type,
        sequence_parallel=sequence_parallel,
        micro_batch=micro_step // dp0,
        global_batch=global_batch,
        schedule="1f1b",
        dtype=dtype,
        layers=tuple(layers),
        stages=stages,
    )


def _even(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


class _Context:
    """What every configuration of one search shares."""

    def __init__(
        self, workload: WorkloadConfig, cluster: ClusterSpec, budget: float, dtype: PlanDtype, space: SearchSpace
    ):
        self.workload = workload
        self.cluster = cluster
        self.budget = budget
        self.dtype: PlanDtype = dtype
        self.space = space
        self.tables = CostTables(workload, cluster, dtype)
        kinds = layer_kinds(workload)
        self.block_kinds = kinds[1:-1]
        self.edge_kinds = (kinds[0], kinds[-1])
        self.num_layers = len(self.block_kinds)
        self.homogeneous = len(set(self.block_kinds)) == 1
        self.dp_runs = 0
        self._signatures: dict[tuple[int, int], tuple] = {}

    def group_signature(self, group: StageGroup) -> tuple:
        """Groups with the same device types and the same group shapes cost the same."""
        key = (group.first, group.size)
        sig = self._signatures.get(key)
        if sig is None:
            cluster = self.cluster
            ranks = group.ranks
            shapes = []
            t = 1
            while t <= group.size:
                shapes.append(
                    (id(cluster.span(ranks[:t])), id(cluster.span(ranks[0::t])), id(cluster.span(ranks[t - 1 :: t])))
                )
                t *= 2
            devices = tuple(sorted({id(cluster.topology.devices[r]) for r in ranks}))
            sig = (group.size, group.node_size, devices, tuple(shapes))
            self._signatures[key] = sig
        return sig


def _evaluate(plan: Plan, workload: WorkloadConfig, cluster: ClusterSpec) -> Report | None:
    try:
        return evaluate_bound(bind(plan, workload, cluster))
    except (InfeasiblePlan, UnsupportedPlan):
        return None


def _batch_options(cluster: ClusterSpec, global_batch: int | None, max_global_batch: int | None) -> list[int]:
    if global_batch is not None and max_global_batch is not None:
        raise UserError("give --global-batch or --max-global-batch, not both")
    for name, value in (("global batch", global_batch), ("max global batch", max_global_batch)):
        if value is not None and value <= 0:
            raise UserError(f"the {name} must be a positive number of sequences, got {value}")
    if global_batch is not None:
        return [global_batch]
    top = max_global_batch if max_global_batch is not None else 8 * cluster.num_devices
    # The largest batch usually wins (less bubble, reduction amortized); a few smaller ones cover
    # the cases where a smaller micro-step fits better.
    options = [top]
    b = 1
    while b * 2 <= top:
        b *= 2
    while len(options) < 3 and b >= 1:
        if b not in options:
            options.append(b)
        b //= 2
    return sorted(options, reverse=True)


def _no_split_error(
    workload: WorkloadConfig, cluster: ClusterSpec, batches: list[int], space: SearchSpace = FULL_SPACE
) -> UserError:
    """Why no configuration exists: name the batch sizes (and cluster sizes) that would work."""
    n = cluster.num_devices
    works = []
    for b in range(1, 8 * n + 1):
        if any(
            layer_strategies(workload, g, ms, space)
            for layout in stage_layouts(cluster, workload.num_layers)
            for ms in micro_step_options(b, layout)
            for g in layout[:1]
        ):
            works.append(b)
        if len(works) >= 4:
            break
    batch_text = ", ".join(str(b) for b in batches)
    pow2 = 1 << (n.bit_length() - 1)
    sizes = f"{pow2}" if pow2 == n else f"{pow2} or {2 * pow2}"
    return UserError(
        f"a global batch of {batch_text} sequences does not split over the {n} devices of cluster {cluster.name!r} "
        f"with power-of-two tensor/pipeline degrees (every data-parallel replica needs whole sequences): global "
        f"batches that work here: {', '.join(map(str, works))}, ...; or use a cluster of {sizes} devices"
    )


def _configurations(ctx: _Context, batches: list[int]) -> list[tuple[int, tuple[StageGroup, ...], int, DpType]]:
    """The pipeline level of the tree: (global batch, stage layout, micro-step, dp_type of the edge layers)."""
    workload, space = ctx.workload, ctx.space
    # The embedding and output layers follow the plan's dp_type; ZeRO-2 rarely beats both ddp (time) and
    # ZeRO-3 (memory) for them, so the tree keeps those two (or the first the space allows).
    edge_dp_types = tuple(t for t in EDGE_DP_TYPES if t in space.dp_types) or space.dp_types[:1]
    layouts = stage_layouts(ctx.cluster, ctx.num_layers)
    configs = []
    for g in batches:
        for layout in layouts:
            for ms in micro_step_options(g, layout):
                if any(not layer_strategies(workload, grp, ms, space) for grp in layout):
                    continue
                dp_max = max(grp.size for grp in layout)
                edge_types: tuple[DpType, ...] = edge_dp_types if dp_max > 1 else ("ddp",)
                for e in edge_types:
                    configs.append((g, layout, ms, e))
    return configs


def _branch_and_bound(
    ctx: _Context,
    configs: list[tuple[int, tuple[StageGroup, ...], int, DpType]],
    pool: _Pool,
    progress: Progress | None,
    total: int,
) -> tuple[list[tuple[float, _ConfigSearch, list[int]]], int]:
    """Search the configurations, the most promising first; one whose bound cannot beat the best plan found
    so far is skipped without running its programs. Returns (the plans added: speed, configuration, layer
    counts; the configurations skipped)."""
    bounded = []
    for g, layout, ms, e in configs:
        search = _ConfigSearch(ctx, g, layout, ms, e)
        bound = search.lower_bound()
        if np.isfinite(bound):
            bounded.append((g / bound, search))
    bounded.sort(key=lambda x: -x[0])
    searched: list[tuple[float, _ConfigSearch, list[int]]] = []
    skipped = 0
    for i, (bound_speed, search) in enumerate(bounded):
        if progress is not None:
            progress(i, total, f"pp={search.p} micro-step={search.micro_step} batch={search.global_batch}")
        ranked_now = pool.ranked()
        if ranked_now and bound_speed <= ranked_now[0][1].samples_per_s:
            skipped += 1
            continue
        for _, counts in search.partitions()[:2]:
            # The per-layer program minimizes a per-layer estimate; a few points further down each
            # stage's memory/time frontier give the analytic model alternatives to rank.
            seen_plans = set()
            for fraction in FRONTIER_FRACTIONS:
                plan = search.plan_for(counts, fraction)
                if plan is None or plan in seen_plans:
                    continue
                seen_plans.add(plan)
                report = _evaluate(plan, ctx.workload, ctx.cluster)
                if report is None:
                    continue
                if pool.add(plan, report):
                    searched.append((report.samples_per_s, search, counts))
    return searched, skipped


def _balance_best(
    ctx: _Context,
    searched: list[tuple[float, _ConfigSearch, list[int]]],
    pool: _Pool,
    progress: Progress | None,
    done: int,
    total: int,
) -> None:
    """Bi-objective balancing of the best configurations: move a layer off the slowest stage while the
    neighbour has the memory and the analytic model says throughput improves."""
    searched.sort(key=lambda x: -x[0])
    refined_configs = set()
    balanced = 0
    for speed, search, counts in searched:
        if balanced >= BALANCE_CONFIGS:
            break
        key = id(search)
        if key in refined_configs or search.p < 2:
            continue
        refined_configs.add(key)
        balanced += 1
        if progress is not None:
            progress(done + balanced - 1, total, f"balancing pp={search.p} stages")
        _balance(search, counts, speed, pool, ctx.workload, ctx.cluster)


def _nothing_fits(pool: _Pool, workload: WorkloadConfig, cluster: ClusterSpec) -> UserError:
    least = pool.least_memory
    need = f"{format_bytes(least[0])} (plan {least[1].shorthand()})" if least else "more than the device memory"
    return UserError(
        f"no plan of {workload.name} on {cluster.name} fits a memory budget of {format_bytes(pool.budget)} "
        f"per device; the smallest budget that works is about {need}"
    )


def _check_arguments(memory_budget_bytes: float, top_k: int) -> None:
    if not memory_budget_bytes > 0:
        raise UserError(f"the memory budget must be positive, got {memory_budget_bytes}")
    if top_k < 1:
        raise UserError(f"--top must be at least 1, got {top_k}")


def _pool_with_baselines(
    ctx: _Context, batches: list[int], baselines_in_pool: bool
) -> tuple[_Pool, list[BaselineOutcome]]:
    """The pool, and the baselines evaluated under the same budget (cheap): by default their plans join it."""
    pool = _Pool(ctx.budget)
    outcomes = evaluate_baselines(ctx.workload, ctx.cluster, ctx.budget, batches, ctx.dtype, not ctx.homogeneous)
    if baselines_in_pool:
        for outcome in outcomes:
            for plan, report in outcome.evaluated:
                pool.add(plan, report, from_search=False)
    return pool, outcomes


def search_galvatron(
    workload: WorkloadConfig,
    cluster: ClusterSpec,
    memory_budget_bytes: float,
    global_batch: int | None = None,
    max_global_batch: int | None = None,
    top_k: int = 3,
    rerank_with_des: bool = True,
    progress: Progress | None = None,
    *,
    dtype: PlanDtype | None = None,
    space: SearchSpace = FULL_SPACE,
    baselines_in_pool: bool = True,
) -> SearchResult:
    """The highest-throughput plan whose per-device peak memory stays within `memory_budget_bytes`.

    Args:
        workload, cluster: what to train and on what (`workloads.catalog.load_workload`,
            `hwmodel.catalog.load_cluster`).
        memory_budget_bytes: per-device budget; a device with less memory is held to its capacity.
        global_batch: sequences per iteration; or `max_global_batch` to search the batch too (a few
            sizes up to it). Neither: up to 8 sequences per device.
        top_k: runners-up to return.
        rerank_with_des: re-rank the analytic top K (and the baselines) with the discrete-event engine.
        progress: called as progress(done, total, label) while configurations are searched.
        dtype: training precision; default bf16, or fp16 when a GPU lacks bf16 tensor cores.
        space: the part of the strategy tree to search (default: all of it).
        baselines_in_pool: the baselines' plans join the candidates (so the chosen plan is never slower
            than a baseline that fits); False keeps them apart: they are still evaluated and reported, and
            the chosen plan is the search's own.

    Raises:
        UserError: a budget below what any plan needs (naming the smallest that works), or a batch that
            cannot be split over the cluster (naming batch sizes that can).
    """
    cluster = carrying_stack(cluster)  # the planner's own costs read the devices the engines see
    started = time.perf_counter()
    _check_arguments(memory_budget_bytes, top_k)
    dtype = dtype or default_dtype(cluster)
    batches = _batch_options(cluster, global_batch, max_global_batch)
    ctx = _Context(workload, cluster, memory_budget_bytes, dtype, space)
    configs = _configurations(ctx, batches)
    if not configs:
        raise _no_split_error(workload, cluster, batches, space)
    pool, baseline_outcomes = _pool_with_baselines(ctx, batches, baselines_in_pool)

    total = len(configs) + BALANCE_CONFIGS
    searched, skipped = _branch_and_bound(ctx, configs, pool, progress, total)
    _balance_best(ctx, searched, pool, progress, len(configs), total)
    num_split = _add_split_plans(ctx, pool)
    if progress is not None:
        progress(total, total, "ranking")

    ranked = pool.ranked()
    if not ranked:
        raise _nothing_fits(pool, workload, cluster)

    baselines = [Baseline(name=o.name, plan=o.plan, report=o.report, reason=o.reason) for o in baseline_outcomes]
    engine = "analytic"
    if rerank_with_des:
        engine = "des"
        ranked, baselines = _rerank_des(ranked, baselines, top_k, pool, workload, cluster, baselines_in_pool)
    candidates = [Candidate(plan=p, report=r) for p, r in ranked[:top_k]]
    return SearchResult(
        planner="galvatron",
        best=candidates[0],
        candidates=candidates,
        baselines=baselines,
        search_time_s=time.perf_counter() - started,
        details=_details(ctx, pool, engine, batches, (len(configs), skipped, num_split), baseline_outcomes),
    )


def _details(
    ctx: _Context,
    pool: _Pool,
    engine: str,
    batches: list[int],
    counts: tuple[int, int, int],
    baseline_outcomes: list[BaselineOutcome],
) -> dict[str, Any]:
    """What the search did: `counts` is (configurations, configurations pruned by the bound, split plans)."""
    configurations, skipped, num_split = counts
    return {
        "engine": engine,
        "memory_budget_bytes": ctx.budget,
        "dtype": ctx.dtype,
        "global_batches": batches,
        "configurations": configurations,
        "configurations_pruned_by_bound": skipped,
        "plans_evaluated": pool.evaluated,
        "plans_feasible": len(pool.entries),
        "layer_cost_probes": ctx.tables.probes,
        "stage_programs": ctx.dp_runs,
        "batch_split_plans": num_split,
        # Analytic samples/s of the search's own best plan and of the best baseline configuration.
        "search_best_samples_per_s": pool.search_best,
        "baseline_best_samples_per_s": max(
            (o.report.samples_per_s for o in baseline_outcomes if o.report is not None), default=0.0
        ),
    }


def _add_split_plans(ctx: _Context, pool: _Pool) -> int:
    """Mixed clusters: replicas of different GPU types take micro-batch shares by speed (kept when faster).
    Returns how many split plans were evaluated."""
    split_plans = split_candidates(pool.ranked(), ctx.workload, ctx.cluster, ctx.budget)
    for plan, report in split_plans:
        pool.add(plan, report)
    return len(split_plans)


def _balance(
    search: _ConfigSearch,
    counts: list[int],
    speed: float,
    pool: _Pool,
    workload: WorkloadConfig,
    cluster: ClusterSpec,
    max_moves: int = 64,
) -> None:
    """Move layers from the slowest stage to a neighbour until throughput stops improving."""
    best_counts, best_speed = list(counts), speed
    report = None
    for _ in range(max_moves):
        plan = search.plan_for(best_counts)
        report = _evaluate(plan, workload, cluster) if plan else None
        if report is None:
            return
        times = [s.forward_s + s.backward_s for s in report.stages]
        slow = max(range(len(times)), key=lambda j: times[j])
        improved = False
        for nb in sorted((slow - 1, slow + 1), key=lambda j: times[j] if 0 <= j < len(times) else INF):
            if not 0 <= nb < len(times) or best_counts[slow] <= 1:
                continue
            trial = list(best_counts)
            trial[slow] -= 1
            trial[nb] += 1
            plan = search.plan_for(trial)
            if plan is None:
                continue
            rep = _evaluate(plan, workload, cluster)
            if rep is None:
                continue
            if pool.add(plan, rep) and rep.samples_per_s > best_speed * (1 + 1e-9):
                best_counts, best_speed = trial, rep.samples_per_s
                improved = True
                break
        if not improved:
            return


def _rerank_des(
    ranked: list[tuple[Plan, Report]],
    baselines: list[Baseline],
    top_k: int,
    pool: _Pool,
    workload: WorkloadConfig,
    cluster: ClusterSpec,
    baselines_in_pool: bool = True,
) -> tuple[list[tuple[Plan, Report]], list[Baseline]]:
    """Re-rank the analytic top K, and the feasible baselines, with the discrete-event engine (the
    baselines join the ranking only where they joined the pool)."""
    from simulator.des import evaluate_des

    def des(plan: Plan) -> Report | None:
        try:
            return evaluate_des(plan, workload, cluster)
        except (InfeasiblePlan, UnsupportedPlan):
            return None

    rescored: dict[str, tuple[Plan, Report]] = {}
    for plan, _ in ranked[: max(top_k, 3)]:
        rep = des(plan)
        if rep is not None and pool.fits(rep):
            rescored[rep.plan.model_dump_json()] = (rep.plan, rep)
    new_baselines = []
    for b in baselines:
        if b.plan is None or b.report is None:
            new_baselines.append(b)
            continue
        rep = des(b.plan)
        if rep is None:
            new_baselines.append(b.model_copy(update={"report": None, "reason": "infeasible"}))
        elif not pool.fits(rep):
            new_baselines.append(
                b.model_copy(
                    update={
                        "report": None,
                        "reason": f"out of memory: needs {format_bytes(rep.peak_memory_bytes)} > budget "
                        f"{format_bytes(pool.budget)} (event engine)",
                    }
                )
            )
        else:
            new_baselines.append(b.model_copy(update={"report": rep}))
            if baselines_in_pool:
                rescored.setdefault(rep.plan.model_dump_json(), (rep.plan, rep))
    if not rescored:  # nothing survived the event engine's memory timeline: keep the analytic ranking
        return ranked, baselines
    order = sorted(rescored.values(), key=lambda pr: (-pr[1].samples_per_s, pr[0].model_dump_json()))
    return order, new_baselines


__all__ = ["BaselineOutcome", "build_plan", "default_dtype", "search_galvatron", "uniform_view"]
