"""Binding a plan to a workload and a cluster: checks and the resolved layout.

`bind` validates a plan against what it runs on and resolves it into stages (device groups with their
layers), so the analytic model, the event engine and the executor all read the same layout. Every
check that fails raises `InfeasiblePlan` naming the field, the value and what would be accepted.

Rank layout (as Megatron-LM): within a stage, tensor parallel is innermost (consecutive ranks, so a tp
group stays inside a node), then context parallel, then data parallel; stages take consecutive blocks
of ranks, pipeline parallel outermost.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from hwmodel.cluster import ClusterSpec
from hwmodel.stack import StackSpec
from simulator.errors import InfeasiblePlan, UnsupportedPlan
from simulator.plan import LayerStrategy, Plan, every_n
from simulator.stacks import bind_stack, check_recompute
from workloads.config import WorkloadConfig
from workloads.transformer import layer_kinds

EDGE_KINDS = ("embedding", "patch_embedding", "head")


@dataclass(frozen=True)
class LayerRun:
    """Consecutive layers of one kind and one strategy on one stage.

    `first` indexes `workloads.layer_kinds(workload)` (0 is the input layer, 1..num_layers the blocks,
    the last the output layer); the run covers `first` .. `first + count - 1`.
    """

    first: int
    count: int
    kind: str
    tp: int
    sequence_parallel: bool
    recompute: str
    dp_type: str
    offload: float

    def strategy_key(self) -> _Strategy:
        return (self.kind, self.tp, self.sequence_parallel, self.recompute, self.dp_type, self.offload)

    @property
    def indices(self) -> range:
        return range(self.first, self.first + self.count)


@dataclass(frozen=True)
class BoundStage:
    index: int
    ranks: Sequence[int]  # a range when the ranks are consecutive (cheap to slice and hash)
    cp: int
    runs: tuple[LayerRun, ...]
    micro_step_batch: int  # sequences per micro-step across all data-parallel replicas of the stage
    # Sequences each data-parallel replica takes per micro-step (plan.batch_split); None: an even share each.
    replica_batches: tuple[int, ...] | None = None

    @property
    def num_devices(self) -> int:
        return len(self.ranks)

    def replica_of(self, rank: int, tp: int) -> int:
        """The data-parallel replica (index) `rank` belongs to in a run of tensor-parallel degree `tp`."""
        return self.ranks.index(rank) // (tp * self.cp)

    def micro_batch_of(self, rank: int, tp: int) -> int:
        """Sequences the device at `rank` runs per micro-step in a run of tensor-parallel degree `tp`."""
        if self.replica_batches is None:
            return self.micro_step_batch // self.dp_for(tp)
        return self.replica_batches[self.replica_of(rank, tp)]

    def dp_for(self, tp: int) -> int:
        return self.num_devices // (tp * self.cp)

    def tp_group(self, tp: int) -> Sequence[int]:
        return self.ranks[:tp]

    def cp_group(self, tp: int) -> Sequence[int]:
        return self.ranks[: tp * self.cp : tp]

    def dp_groups(self, tp: int) -> list[Sequence[int]]:
        """The first and the last data-parallel group (enough to find the slowest on mixed hardware)."""
        return self._strided_groups(tp * self.cp)

    def grad_groups(self, tp: int) -> list[Sequence[int]]:
        """The first and the last group whose ranks hold the same weights: dp x cp of them (context-parallel
        ranks hold the whole layer too), over which gradients are averaged and ZeRO shards."""
        return self._strided_groups(tp)

    def _strided_groups(self, stride: int) -> list[Sequence[int]]:
        first = self.ranks[0::stride]
        last = self.ranks[stride - 1 :: stride]
        return [first] if first == last else [first, last]

    @property
    def block_range(self) -> tuple[int, int]:
        """First and last transformer block index (-1, -1 when the stage holds none)."""
        blocks = [i - 1 for run in self.runs if run.kind not in EDGE_KINDS for i in run.indices]
        return (min(blocks), max(blocks)) if blocks else (-1, -1)

    @property
    def tp(self) -> int:
        """The tensor-parallel degree of the stage's blocks (of its first run when it has none)."""
        blocks = [run for run in self.runs if run.kind not in EDGE_KINDS]
        return (blocks or list(self.runs))[0].tp


@dataclass(frozen=True)
class BoundPlan:
    plan: Plan  # with dp and global_batch filled in
    workload: WorkloadConfig
    cluster: ClusterSpec
    stages: tuple[BoundStage, ...]
    num_micro_batches: int
    warnings: tuple[str, ...]
    stack: str = "llm-foundry"  # the software stack whose figures `cluster` carries (simulator.stacks)
    stack_spec: StackSpec | None = None  # that stack (None: built without one, the default's figures)

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(r for stage in self.stages for r in stage.ranks)


def _parse_devices(spec: str | tuple[int, ...], cluster: ClusterSpec, where: str) -> tuple[int, ...]:
    if isinstance(spec, tuple):
        ranks = spec
    else:
        text = spec.strip()
        match = re.fullmatch(r"(\d+)\s*-\s*(\d+)", text)
        if match:
            lo, hi = int(match.group(1)), int(match.group(2))
            if hi < lo:
                raise InfeasiblePlan(f"{where}: device range {text!r} is empty")
            ranks = tuple(range(lo, hi + 1))
        elif text.isdigit():
            ranks = (int(text),)
        else:
            groups = {g.name: gi for gi, g in enumerate(cluster.node_groups)}
            if text not in groups:
                raise InfeasiblePlan(
                    f"{where}: {text!r} is neither a rank range like '0-15' nor a node group of cluster "
                    f"{cluster.name!r} ({', '.join(groups)})"
                )
            gi = groups[text]
            ranks = tuple(r for r in range(cluster.num_devices) if cluster.location(r).group == gi)
    for r in ranks:
        if not 0 <= r < cluster.num_devices:
            raise InfeasiblePlan(
                f"{where}: rank {r} is outside cluster {cluster.name!r} (ranks 0-{cluster.num_devices - 1})"
            )
    if len(set(ranks)) != len(ranks):
        raise InfeasiblePlan(f"{where}: a device is listed twice")
    return ranks


def _even_split(total: int, parts: int) -> list[int]:
    """Split `total` layers into `parts` chunks, earlier chunks taking the remainder."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _check_tp(tp: int, cfg: WorkloadConfig, plan: Plan, where: str) -> None:
    if cfg.num_heads % tp:
        raise InfeasiblePlan(f"{where}tp={tp} does not divide num_heads={cfg.num_heads}")
    if cfg.kv_heads % tp:
        raise InfeasiblePlan(f"{where}tp={tp} does not divide num_kv_heads={cfg.kv_heads}")
    if cfg.ffn % tp:
        raise InfeasiblePlan(f"{where}tp={tp} does not divide ffn_hidden_size={cfg.ffn}")
    if plan.sequence_parallel and (cfg.seq_len // plan.cp) % tp:
        raise InfeasiblePlan(
            f"{where}sequence_parallel with tp={tp} needs seq_len/cp={cfg.seq_len // plan.cp} divisible by {tp}"
        )


def _layer_overrides(plan: Plan, num_blocks: int) -> list[LayerStrategy | None]:
    per_block: list[LayerStrategy | None] = [None] * num_blocks
    for i, strategy in enumerate(plan.layers):
        first, last = strategy.layers
        if last >= num_blocks:
            raise InfeasiblePlan(
                f"layers[{i}].layers: [{first}, {last}] is beyond the model's {num_blocks} blocks (0-{num_blocks - 1})"
            )
        for b in range(first, last + 1):
            if per_block[b] is not None:
                raise InfeasiblePlan(f"layers[{i}].layers: block {b} already has a strategy; ranges must not overlap")
            per_block[b] = strategy
    return per_block


def _split_text(split: tuple[int, ...]) -> str:
    return "+".join(str(n) for n in split)


def _check_batch_split(
    plan: Plan, split: tuple[int, ...], dp: int, stage_ranks: list[Sequence[int]], stage_tps: list[int]
) -> None:
    """An uneven micro-batch split names one share per data-parallel replica, so every stage must have the
    same replicas: dp equal across stages (and, checked per layer, across layers)."""
    text = _split_text(split)
    if len(split) != dp:
        raise InfeasiblePlan(
            f"batch_split {text} lists {len(split)} replicas, but the plan has dp={dp}; "
            f"give one share per data-parallel replica ({dp} numbers joined by '+')"
        )
    if sum(split) != plan.micro_batch * dp:
        raise InfeasiblePlan(
            f"batch_split {text} sums to {sum(split)}, but a micro-step takes micro_batch*dp = "
            f"{plan.micro_batch}*{dp} = {plan.micro_batch * dp} sequences; the shares must sum to that"
        )
    for i, (ranks, tp) in enumerate(zip(stage_ranks, stage_tps)):
        stage_dp = len(ranks) // (tp * plan.cp)
        if stage_dp != dp:
            raise InfeasiblePlan(
                f"stages[{i}]: {len(ranks)} devices with tp={tp}, cp={plan.cp} make dp={stage_dp} replicas, but "
                f"batch_split {text} is for dp={dp}; with batch_split every stage needs the same dp"
            )
    if plan.ep > 1:
        raise UnsupportedPlan(
            f"batch_split {text} with ep={plan.ep}: expert parallelism over replicas of uneven "
            "batches is not simulated; use ep=1 or leave batch_split out"
        )


def bind(plan: Plan, workload: WorkloadConfig, cluster: ClusterSpec) -> BoundPlan:
    """Check `plan` against `workload` and `cluster` and resolve its stages.

    Raises:
        InfeasiblePlan: degrees that do not multiply to the device count or divide the model, a batch
            that does not split, too many stages, bad device groups.
        UnsupportedPlan: sections this release cannot simulate yet.
    """
    # The checks run in this order so that the first message is the most useful one: what the engine
    # cannot simulate, then what the model forbids, then what the cluster and the batch forbid.
    warnings: list[str] = []
    cluster, stack = bind_stack(cluster, plan.stack)
    if plan.stack is not None:  # the default stack stands in for any plan, so only a named one refuses
        check_recompute(stack, plan.recompute)
    _check_simulated_sections(plan, workload)
    _check_degrees_fit_model(plan, workload)
    if plan.stages:
        layout = _explicit_stage_layout(plan, workload, cluster, warnings)
    else:
        layout = _uniform_stage_layout(plan, cluster)
    batch = _split_batch(plan, workload, layout, warnings)
    strategies = _LayerStrategies(plan, workload, layout, batch.micro_step)
    stages = _bound_stages(plan, layout, batch, strategies)
    warnings.extend(_tensor_core_warnings(plan, cluster))
    bound_plan = plan.model_copy(update={"dp": layout.dp, "global_batch": batch.global_batch})
    return BoundPlan(bound_plan, workload, cluster, stages, batch.num_micro_batches, tuple(warnings), stack.name, stack)


@dataclass(frozen=True)
class _StageLayout:
    """The device groups of the pipeline stages, before their layers are placed."""

    ranks: list[Sequence[int]]
    tps: list[int]
    layer_counts: list[int]  # blocks per stage as the plan lists them; empty when they split evenly
    dp: int


@dataclass(frozen=True)
class _BatchSplit:
    """How the global batch splits: sequences per micro-step (all replicas), per iteration, micro-steps."""

    micro_step: int
    global_batch: int
    num_micro_batches: int


def _check_simulated_sections(plan: Plan, workload: WorkloadConfig) -> None:
    """Reject the plan sections this engine does not simulate (UnsupportedPlan)."""
    if plan.tasks:
        raise UnsupportedPlan("plan.tasks (multi-task wavefront schedules) is not simulated by this engine yet")
    if plan.federated is not None:
        raise UnsupportedPlan(
            "plan.federated (vertical federated parties) applies to two-party VFL workloads (e.g. vfl-wdl), not to "
            f"{workload.name!r}; `simulate run --workload vfl-wdl --plan ...` predicts it and `simulate search vfl` "
            "chooses its workset W and local updates R"
        )
    if plan.model_states is not None and plan.model_states.gpu < 1.0:
        raise UnsupportedPlan("plan.model_states with CPU/SSD pages is not simulated by this engine yet")


def _check_degrees_fit_model(plan: Plan, cfg: WorkloadConfig) -> None:
    """Check the parallel degrees against the model alone: experts, sequence length, heads and widths
    for every tp the plan names, and enough blocks for the pipeline's model chunks."""
    if plan.ep > 1 and cfg.family != "moe":
        raise InfeasiblePlan(f"ep={plan.ep} needs a mixture-of-experts workload; {cfg.name!r} is {cfg.family}")
    if cfg.seq_len % plan.cp:
        raise InfeasiblePlan(f"cp={plan.cp} does not divide seq_len={cfg.seq_len}")
    for tp in {plan.tp} | {s.tp for s in plan.stages if s.tp} | {s.tp for s in plan.layers if s.tp}:
        _check_tp(tp, cfg, plan, "")
    num_blocks = cfg.num_layers
    if plan.schedule == "interleaved" and plan.pp < 2:
        raise InfeasiblePlan("schedule=interleaved needs pp >= 2 (it interleaves model chunks across pipeline stages)")
    if plan.pp * plan.virtual_stages > num_blocks:
        raise InfeasiblePlan(
            f"pp={plan.pp} x virtual_stages={plan.virtual_stages} = {plan.pp * plan.virtual_stages} model chunks, "
            f"but the model has only num_layers={num_blocks}"
        )


def _explicit_stage_layout(plan: Plan, cfg: WorkloadConfig, cluster: ClusterSpec, warnings: list[str]) -> _StageLayout:
    """The device groups of the stages the plan lists (`plan.stages`), checked against the cluster and the
    model's block count; warns when devices are left idle."""
    n = cluster.num_devices
    num_blocks = cfg.num_layers
    stage_ranks: list[Sequence[int]] = []
    next_rank = 0
    for i, stage in enumerate(plan.stages):
        tp_s = stage.tp or plan.tp
        if stage.devices is None:
            count = tp_s * plan.cp * (plan.dp or 1)
            ranks = tuple(range(next_rank, next_rank + count))
            if ranks and ranks[-1] >= n:
                raise InfeasiblePlan(f"stages[{i}]: not enough devices left in cluster {cluster.name!r} ({n} devices)")
        else:
            ranks = _parse_devices(stage.devices, cluster, f"stages[{i}].devices")
        next_rank = max(ranks) + 1
        if len(ranks) % (tp_s * plan.cp):
            raise InfeasiblePlan(f"stages[{i}]: {len(ranks)} devices are not a multiple of tp*cp={tp_s * plan.cp}")
        stage_ranks.append(ranks)
    used = [r for ranks in stage_ranks for r in ranks]
    if len(set(used)) != len(used):
        raise InfeasiblePlan("stages: a device belongs to two stages")
    layers_held = sum(s.num_layers for s in plan.stages)
    if layers_held != num_blocks:
        raise InfeasiblePlan(f"stages hold {layers_held} layers in all, but the model has num_layers={num_blocks}")
    if plan.schedule == "interleaved":
        raise InfeasiblePlan(
            "explicit stages cannot be combined with schedule=interleaved; list the stages and use 1f1b"
        )
    dp = plan.dp or len(stage_ranks[0]) // ((plan.stages[0].tp or plan.tp) * plan.cp)
    if len(used) < n:
        warnings.append(f"the plan uses {len(used)} of the cluster's {n} devices")
    return _StageLayout(
        ranks=stage_ranks,
        tps=[s.tp or plan.tp for s in plan.stages],
        layer_counts=[s.num_layers for s in plan.stages],
        dp=dp,
    )


def _uniform_stage_layout(plan: Plan, cluster: ClusterSpec) -> _StageLayout:
    """pp equal stages of tp x cp x dp consecutive ranks; dp, left out, fills the cluster."""
    n = cluster.num_devices
    per_dp = plan.tp * plan.pp * plan.cp
    if plan.dp is None:
        if n % per_dp:
            raise InfeasiblePlan(
                f"tp*pp*cp = {plan.tp}*{plan.pp}*{plan.cp} = {per_dp} does not divide the cluster's {n} devices"
            )
        dp = n // per_dp
    else:
        dp = plan.dp
        if per_dp * dp != n:
            hint = f"; dp={n // per_dp} would fill it" if n % per_dp == 0 else ""
            raise InfeasiblePlan(
                f"tp*pp*dp*cp = {plan.tp}*{plan.pp}*{dp}*{plan.cp} = {per_dp * dp}, but cluster "
                f"{cluster.name!r} has {n} devices{hint}"
            )
    size = plan.tp * plan.cp * dp
    return _StageLayout(
        ranks=[range(i * size, (i + 1) * size) for i in range(plan.pp)],
        tps=[plan.tp] * plan.pp,
        layer_counts=[],  # the blocks split evenly over the model chunks (_bound_stages)
        dp=dp,
    )


def _split_batch(plan: Plan, cfg: WorkloadConfig, layout: _StageLayout, warnings: list[str]) -> _BatchSplit:
    """Check that experts and the batch split over the data-parallel replicas, and count the micro-steps;
    warns when there are fewer micro-batches than pipeline stages."""
    dp = layout.dp
    if plan.ep > 1:
        if dp % plan.ep:
            raise InfeasiblePlan(f"ep={plan.ep} does not divide dp={dp}")
        if cfg.num_experts % plan.ep:
            raise InfeasiblePlan(f"ep={plan.ep} does not divide num_experts={cfg.num_experts}")
    if plan.batch_split is not None:
        _check_batch_split(plan, plan.batch_split, dp, layout.ranks, layout.tps)
    micro_step = plan.micro_batch * dp
    global_batch = plan.global_batch if plan.global_batch is not None else micro_step
    if global_batch % micro_step:
        raise InfeasiblePlan(
            f"global_batch={global_batch} is not a multiple of micro_batch*dp = {plan.micro_batch}*{dp} = {micro_step}"
        )
    num_micro_batches = global_batch // micro_step
    if plan.schedule == "interleaved" and num_micro_batches % plan.pp:
        raise InfeasiblePlan(
            f"schedule=interleaved needs the number of micro-batches ({num_micro_batches} = global_batch / "
            f"(micro_batch*dp)) to be a multiple of pp={plan.pp}"
        )
    if num_micro_batches < plan.pp:
        warnings.append(
            f"only {num_micro_batches} micro-batches for {plan.pp} pipeline stages: most of the pipeline idles"
        )
    return _BatchSplit(micro_step, global_batch, num_micro_batches)


# (kind, tp, sequence_parallel, recompute, dp_type, offload) of one layer: the fields of a LayerRun after
# its position.
_Strategy = tuple[str, int, bool, str, str, float]


class _LayerStrategies:
    """The strategy of each layer on each stage (plan defaults, per-layer overrides), each (stage, tp)
    pair checked once against the model, the stage's devices and the batch."""

    def __init__(self, plan: Plan, cfg: WorkloadConfig, layout: _StageLayout, micro_step: int):
        self.plan = plan
        self.cfg = cfg
        self.layout = layout
        self.micro_step = micro_step
        self.kinds = layer_kinds(cfg)
        self.overrides = _layer_overrides(plan, cfg.num_layers)
        self.checked: set[tuple[int, int]] = set()

    def of(self, stage_index: int, idx: int) -> _Strategy:
        """(kind, tp, sequence_parallel, recompute, dp_type, offload) of one layer, checked."""
        plan = self.plan
        kind = self.kinds[idx]
        strategy = self.overrides[idx - 1] if 0 < idx <= self.cfg.num_layers else None
        tp_layer = (strategy.tp if strategy and strategy.tp else None) or self.layout.tps[stage_index]
        sp = (
            strategy.sequence_parallel
            if strategy and strategy.sequence_parallel is not None
            else plan.sequence_parallel
        )
        recompute = (
            "none"
            if kind in EDGE_KINDS
            else (strategy.recompute if strategy and strategy.recompute else plan.recompute)
        )
        dp_type = strategy.dp_type if strategy and strategy.dp_type else plan.dp_type
        offload = strategy.offload if strategy and strategy.offload is not None else plan.offload
        if (stage_index, tp_layer) not in self.checked:
            where = (
                f"layers (block {idx - 1}): "
                if strategy and strategy.tp
                else (f"stages[{stage_index}]: " if plan.stages else "")
            )
            self._check_layer_tp(stage_index, tp_layer, where)
            self.checked.add((stage_index, tp_layer))
        return (kind, tp_layer, sp and tp_layer > 1, recompute, dp_type, offload)

    def _check_layer_tp(self, stage_index: int, tp_layer: int, where: str) -> None:
        """A layer's tp must divide the model and the stage's devices into replicas the batch splits over."""
        plan, dp, micro_step = self.plan, self.layout.dp, self.micro_step
        _check_tp(tp_layer, self.cfg, plan, where)
        ranks = self.layout.ranks[stage_index]
        if len(ranks) % (tp_layer * plan.cp):
            raise InfeasiblePlan(
                f"{where}tp={tp_layer} x cp={plan.cp} does not divide the stage's {len(ranks)} devices"
            )
        dp_layer = len(ranks) // (tp_layer * plan.cp)
        if plan.batch_split is not None and dp_layer != dp:
            raise InfeasiblePlan(
                f"{where}tp={tp_layer} gives the stage's {len(ranks)} devices dp={dp_layer} replicas, but "
                f"batch_split {_split_text(plan.batch_split)} is for dp={dp}; with batch_split every layer of "
                "every stage needs the same dp (per-layer tp that changes dp is accepted only without batch_split)"
            )
        if micro_step % dp_layer:
            raise InfeasiblePlan(
                f"{where}a micro-step of {micro_step} sequences does not split over dp={dp_layer} replicas"
            )

    def runs(self, stage_index: int, spans: list[range]) -> tuple[LayerRun, ...]:
        """Runs of layers with one strategy, from consecutive, non-empty index ranges (chunks and edge layers)."""
        runs: list[LayerRun] = []
        if every_n(self.plan.recompute) is not None or any(
            every_n(layer.recompute or "") is not None for layer in self.plan.layers
        ):
            return self.every_n_runs(stage_index, spans)
        for span in spans:
            if not self.plan.layers:
                # Without per-layer strategies a chunk's blocks share one strategy; a run still ends where the
                # block kind changes (T5's encoder then decoder blocks).
                first = span.start
                for idx in range(span.start + 1, span.stop + 1):
                    if idx == span.stop or self.kinds[idx] != self.kinds[first]:
                        runs.append(LayerRun(first, idx - first, *self.of(stage_index, first)))
                        first = idx
                continue
            first, count, key = span.start, 1, self.of(stage_index, span.start)
            for idx in span[1:]:
                this = self.of(stage_index, idx)
                if this != key:
                    runs.append(LayerRun(first, count, *key))
                    first, count, key = idx, 0, this
                count += 1
            runs.append(LayerRun(first, count, *key))
        return tuple(runs)

    def every_n_runs(self, stage_index: int, spans: list[range]) -> tuple[LayerRun, ...]:
        """Runs of a stage with `every-N` recompute resolved per block: the N-th, 2N-th, ... such block of
        each model chunk (the stage's blocks; each virtual stage's under interleaving, as Megatron-LM counts
        per chunk) recomputes in full, the others none, so every chunk checkpoints the same share of its
        blocks and the number it checkpoints never grows with N."""
        runs: list[LayerRun] = []
        for span in spans:
            first, count, position = span.start, 0, 0
            key: _Strategy | None = None
            for idx in span:
                this = self.of(stage_index, idx)
                n = every_n(this[3])
                if n is not None:
                    position += 1
                    this = (this[0], this[1], this[2], "full" if position % n == 0 else "none", this[4], this[5])
                if key is not None and this != key:
                    runs.append(LayerRun(first, count, *key))
                    first, count = idx, 0
                key, count = this, count + 1
            if key is not None:
                runs.append(LayerRun(first, count, *key))
        return tuple(runs)


def _stage_chunks(plan: Plan, layer_counts: list[int], num_blocks: int) -> list[list[range]]:
    """The block index ranges (model chunks) of each stage: as the plan lists them, or the blocks split
    evenly over pp x virtual_stages chunks dealt round-robin to the stages (interleaved)."""
    if plan.stages:
        bounds = [sum(layer_counts[:i]) for i in range(plan.pp + 1)]
        return [[range(bounds[i] + 1, bounds[i + 1] + 1)] for i in range(plan.pp)]
    counts = _even_split(num_blocks, plan.pp * plan.virtual_stages)
    chunks_per_stage: list[list[range]] = [[] for _ in range(plan.pp)]
    start = 1
    for j, count in enumerate(counts):
        chunks_per_stage[j % plan.pp].append(range(start, start + count))
        start += count
    return chunks_per_stage


def _bound_stages(
    plan: Plan, layout: _StageLayout, batch: _BatchSplit, strategies: _LayerStrategies
) -> tuple[BoundStage, ...]:
    """Each stage with its ranks and runs of layers: its chunks, the input layer on the first stage and
    the output layer on the last."""
    chunks_per_stage = _stage_chunks(plan, layout.layer_counts, strategies.cfg.num_layers)
    num_kinds = len(strategies.kinds)
    stages = []
    for i in range(plan.pp):
        spans = [chunk for chunk in chunks_per_stage[i] if len(chunk)]
        if i == 0:
            spans = [range(0, 1)] + spans
        if i == plan.pp - 1:
            spans = spans + [range(num_kinds - 1, num_kinds)]
        runs = strategies.runs(i, spans)
        stages.append(BoundStage(i, layout.ranks[i], plan.cp, runs, batch.micro_step, plan.batch_split))
    return tuple(stages)


def _tensor_core_warnings(plan: Plan, cluster: ClusterSpec) -> list[str]:
    """A warning for each GPU type without tensor cores for the plan's dtype (its matmuls fall back)."""
    warnings = []
    for name in cluster.device_types():
        device = next(g.node.device for g in cluster.node_groups if g.node.device.name == name)
        if plan.dtype not in device.compute.matrix and device.kind == "gpu":
            warnings.append(
                f"{name} has no {plan.dtype} tensor cores; its {plan.dtype} matmuls run at the "
                f"{device.compute.peak(plan.dtype) / 1e12:.3g} TFLOPS fallback rate"
            )
    return warnings
