"""Per-layer time and memory figures for the Galvatron search, from the simulator's own stage costs.

Evaluating a whole plan per layer choice would cost the full analytic model each time; instead every
(layer kind, device group, micro-step, strategy) is costed once by `simulator.cost.stage.stage_cost` on a
one-layer probe stage (the same function both engines use), and the search adds these figures up. The
final plans are then evaluated by the analytic model as a whole, so whatever the sum leaves out (the
pipeline's closed form, point-to-point sends, tails that overlap) is counted before a plan is ranked.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass

from hwmodel.cluster import ClusterSpec
from simulator.analytic import representative_ranks
from simulator.binding import BoundPlan, BoundStage, LayerRun
from simulator.cost.compute import DTYPE_BYTES
from simulator.cost.relayout import Layout, relayout
from simulator.cost.stage import stage_cost
from simulator.errors import InfeasiblePlan, UnsupportedPlan
from simulator.plan import Plan, PlanDtype
from simulator.search.galvatron.space import StageGroup, Strategy
from workloads.config import WorkloadConfig


@dataclass(frozen=True)
class LayerFigures:
    """One layer with one strategy on one device group, per micro-batch unless said otherwise.

    Mixed device groups take the slowest device's time and the largest memory.
    """

    time: float  # forward + backward on the critical path (communication and recompute included)
    backward: float
    reduce: float  # gradient reduction, once per iteration, overlapping backward
    regather: float  # ZeRO-1/2: gathering the updated weights after the optimizer step (not overlapped)
    optimizer: float  # optimizer step for the layer's parameters, once per iteration
    states: float  # bytes of weights, gradients and optimizer states
    saved: float  # activation bytes kept per micro-batch in flight
    transient: float  # bytes backward re-materializes for the layer (recompute)
    comm_buffer: float  # bytes of unsharded gradients / gathered weights in flight (ZeRO-2/3)
    output_bytes: float  # the activation handed to the next layer (or stage), per device

    def objective(self, num_micro_batches: int) -> float:
        """Seconds this layer adds per micro-batch: its work, plus the once-per-iteration tails (the
        gradient reduction its own backward does not hide, the optimizer step) spread over the
        micro-batches."""
        exposed = max(0.0, self.reduce - self.backward)
        return self.time + (exposed + self.regather + self.optimizer) / num_micro_batches


UNUSABLE = LayerFigures(*(float("inf"),) * 10)


class CostTables:
    """Memoized per-layer figures of one workload on one cluster with one dtype."""

    def __init__(self, workload: WorkloadConfig, cluster: ClusterSpec, dtype: PlanDtype):
        self.workload = workload
        self.cluster = cluster
        self.base_plan = Plan(dtype=dtype)
        self._stage_memo: dict = {}
        self._figures: dict = {}
        self._transitions: dict = {}
        self.probes = 0

    def figures(
        self, kind: str, group: StageGroup, micro_step: int, strategy: Strategy, multi_stage: bool, index: int = 1
    ) -> LayerFigures:
        """The figures of one layer of `kind` (layer index `index` in `layer_kinds`) with `strategy`."""
        key = (kind, group.first, group.size, micro_step, strategy, multi_stage)
        hit = self._figures.get(key)
        if hit is not None:
            return hit
        run = LayerRun(
            index, 1, kind, strategy.tp, strategy.sequence_parallel, strategy.recompute, strategy.dp_type, 0.0
        )
        stage = BoundStage(0, group.ranks, 1, (run,), micro_step)
        stages = (stage, stage) if multi_stage else (stage,)
        bound = BoundPlan(self.base_plan, self.workload, self.cluster, stages, 1, ())
        worst = None
        for rank in representative_ranks(self.cluster, stage):
            try:
                cost = stage_cost(bound, stage, rank, self._stage_memo)
            except (InfeasiblePlan, UnsupportedPlan):
                # The simulator refuses this layer with this strategy: the search never picks it.
                worst = UNUSABLE
                break
            self.probes += 1
            rc = cost.runs[0]
            fig = LayerFigures(
                time=rc.forward + rc.backward,
                backward=rc.backward,
                reduce=rc.reduce + cost.tied_reduce,
                regather=rc.regather,
                optimizer=cost.optimizer,
                states=cost.weights + cost.gradients + cost.optimizer_states,
                saved=rc.saved,
                transient=rc.transient,
                comm_buffer=cost.comm_buffer,
                output_bytes=cost.output_bytes,
            )
            worst = fig if worst is None else LayerFigures(*(max(a, b) for a, b in zip(astuple(worst), astuple(fig))))
        assert worst is not None
        self._figures[key] = worst
        return worst

    def transition(self, group: StageGroup, micro_step: int, a: Strategy, b: Strategy) -> float:
        """Seconds to move one micro-step's activations (and their gradients back) from layout `a` to `b`:
        the collectives the executor's redistribution runs (`cost.relayout`), as the engines cost them."""
        if a.layout == b.layout:
            return 0.0
        key = (group.first, group.size, micro_step, a.layout, b.layout)
        hit = self._transitions.get(key)
        if hit is None:
            stage = BoundStage(0, group.ranks, 1, (), micro_step)
            per_sequence = self.workload.seq_len * self.workload.hidden_size * DTYPE_BYTES[self.base_plan.dtype]
            move = relayout(
                self.cluster,
                stage,
                group.first,
                Layout.of(a.tp, a.sequence_parallel),
                Layout.of(b.tp, b.sequence_parallel),
                per_sequence,
            )
            hit = move.forward_s + move.backward_s
            self._transitions[key] = hit
        return hit
