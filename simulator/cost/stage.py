"""What one pipeline stage costs on one device type: the shared source of truth for both engines.

`stage_cost` turns a bound stage into per-layer figures for each run of identical layers (`RunCost`):
compute, recompute, blocking tensor-parallel communication, context-parallel and offload exposure,
ZeRO-3 gathers overlapped with compute, data-parallel gradient reduction, saved activations and model
states. The analytic model sums them with closed forms; the discrete-event engine turns the same
figures into tasks and flows on a timeline. Neither recomputes a cost on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from hwmodel.cluster import ClusterSpec, GroupSpan, NodeSpec
from hwmodel.components import ComputeSpec, DeviceSpec, LinkSpec
from simulator.binding import BoundPlan, BoundStage, LayerRun
from simulator.cost.collectives import collective_time
from simulator.cost.compute import DTYPE_BYTES, LayerTimes, Roofline, layer_times, optimizer_time, roofline
from simulator.cost.memory import (
    OPTIMIZER_TRAFFIC,
    StateBytes,
    micro_batches_in_flight,
    model_state_memory,
    state_bytes,
)
from simulator.cost.relayout import NONE, Layout, Relayout, relayout
from simulator.errors import InfeasiblePlan, UnsupportedPlan
from workloads.activations import block_activations, supports_tokenwise
from workloads.ops import OP_SELECTIVE, Collective, LayerProfile, ShardShape, kernel_family
from workloads.transformer import layer_profile


def overlapped(compute: float, comm: float, sigma: float) -> float:
    """Time of `compute` and `comm` started together, compute slowed by 1 + `sigma` while comm runs.

    The transfer does not slow down; compute progresses at 1 / (1 + sigma) while it runs, so the pair
    takes max(comm, compute + sigma / (1 + sigma) * min(comm, compute * (1 + sigma))).
    """
    if comm <= 0.0:
        return compute
    if compute * (1.0 + sigma) <= comm:
        return comm
    return compute + comm * sigma / (1.0 + sigma)


def _spans(cluster: ClusterSpec, stage: BoundStage, tp: int, ep: int) -> dict[str, list[GroupSpan]]:
    # "dp": the ranks that hold the same weights (data- and context-parallel alike), whose gradients are
    # averaged and over which ZeRO shards; experts are split over the data-parallel ranks only.
    return {
        "tp": [cluster.span(stage.tp_group(tp))],
        "cp": [cluster.span(stage.cp_group(tp))],
        "dp": [cluster.span(g) for g in stage.grad_groups(tp)],
        "ep": [cluster.span(g[:ep]) for g in stage.dp_groups(tp)],
    }


def comm_time(collectives: Sequence[Collective], spans: dict[str, list[GroupSpan]], cp: bool) -> float:
    """Time of the collectives of one family: context parallel (`cp`) or all the others."""
    total = 0.0
    for c in collectives:
        if (c.group == "cp") == cp:
            total += max(collective_time(c.kind, c.nbytes, s) for s in spans[c.group])
    return total


@dataclass(frozen=True)
class RunCost:
    """Per layer and per micro-batch figures of a run of `count` identical layers on one device type."""

    run: LayerRun
    profile: LayerProfile
    times: LayerTimes
    spans: dict[str, list[GroupSpan]]
    dp: int  # ranks holding the same weights (dp x cp): gradients are averaged and ZeRO shards over them
    recompute: float  # extra forward work repeated in backward (seconds)
    tp_forward: float  # blocking collectives after the forward (tp, ep), seconds
    tp_backward: float
    cp_forward: float  # context-parallel ring time not hidden behind the attention core
    cp_backward: float
    gather: float  # ZeRO-3: gathering the layer's weights, before forward and again before backward
    scatter: float  # ZeRO-3: reduce-scattering the layer's gradients in backward
    gather_bytes: float
    scatter_bytes: float
    reduce: float  # ddp / ZeRO-1/2: reducing the layer's gradients once per iteration
    reduce_bytes: float
    reduce_kind: str  # all_reduce (ddp) or reduce_scatter (ZeRO-1/2)
    regather: float  # ZeRO-1/2: gathering the updated weights after the optimizer step
    offload_copy: float  # seconds to copy the offloaded share of saved activations, each way
    saved: float  # activation bytes kept per layer (after offload)
    transient: float  # what backward re-materializes for one layer (dropped by recompute)
    sigma: float
    host: float = 0.0  # activation bytes per layer swapped to host memory (offload, MEMO)
    # A CPU device has no copy engine: the swap is a copy on its own cores, and fetching back is free
    # (host memory is its memory).
    copy_on_compute: bool = False
    # The framework's data-parallel work on the compute cores (ComputeSpec.grad_pack_bandwidth, dp_layer_overhead):
    dp_copy_forward: float = 0.0  # ZeRO-3: copying the gathered weights out of the flat buffer
    dp_copy_backward: float = 0.0  # ZeRO-3: the same before backward, gradients into the flat buffer, hooks
    reduce_copy: float = 0.0  # ddp / ZeRO-1/2: gradients into the flat buffer and hooks, once per iteration
    blocking_dp: bool = False  # data-parallel collectives hold the compute stream (ComputeSpec.blocking_collectives)
    # Per-layer mixed layouts: moving the micro-batch's activations into this run's layout before its first
    # layer, and back to the stage's home layout after its last one (a chunk's end); once per run.
    relayout_in: Relayout = NONE
    relayout_out: Relayout = NONE

    @property
    def count(self) -> int:
        return self.run.count

    @property
    def dp_span(self) -> GroupSpan:
        """The widest data-parallel group of the run (mixed stages: the one that waits longest)."""
        return max(self.spans["dp"], key=lambda s: s.size)

    @property
    def forward(self) -> float:
        """Critical-path time of the layer's forward, communication and stalls included."""
        if self.blocking_dp:
            fwd = self.times.forward + self.dp_copy_forward + self.gather
        else:
            fwd = overlapped(self.times.forward + self.dp_copy_forward, self.gather, self.sigma)
        return fwd + self.tp_forward + self.cp_forward + self.forward_stall

    @property
    def backward(self) -> float:
        """Critical-path time of the layer's backward, recompute, communication and stalls included."""
        busy = self.times.backward + self.recompute + self.dp_copy_backward
        if self.blocking_dp:
            bwd = busy + self.gather + self.scatter
        else:
            bwd = overlapped(busy, self.gather + self.scatter, self.sigma)
        return bwd + self.tp_backward + self.cp_backward + self.backward_stall

    @property
    def forward_stall(self) -> float:
        """The device-to-host copy beyond the forward it hides behind (all of it on a CPU device)."""
        if self.copy_on_compute:
            return self.offload_copy
        return max(0.0, self.offload_copy - self.times.forward)

    @property
    def backward_stall(self) -> float:
        """The host-to-device prefetch beyond the backward it hides behind (none on a CPU device)."""
        if self.copy_on_compute:
            return 0.0
        return max(0.0, self.offload_copy - self.times.backward)

    @property
    def stall(self) -> float:
        return self.forward_stall + self.backward_stall


@dataclass
class StageCost:
    """Per micro-batch costs and model-state memory of one stage on one device type."""

    device: DeviceSpec
    host_link: LinkSpec
    runs: tuple[RunCost, ...] = ()
    compute: float = 0.0  # forward + backward operator time per micro-batch
    recompute: float = 0.0
    comm: float = 0.0  # blocking or unhidden communication per micro-batch
    stall: float = 0.0
    forward: float = 0.0  # critical-path forward per micro-batch
    backward: float = 0.0  # critical-path backward per micro-batch (recompute included)
    backward_compute: float = 0.0
    optimizer: float = 0.0
    regather: float = 0.0  # ZeRO-1/2 weight gathers after the optimizer step
    output_bytes: float = 0.0
    tied_reduce: float = 0.0  # a tied output layer's copy of the embedding: its gradient all-reduce
    tied_reduce_bytes: float = 0.0
    weights: float = 0.0
    gradients: float = 0.0
    optimizer_states: float = 0.0
    saved_activations: float = 0.0  # bytes one micro-batch keeps for backward on this stage
    host_activations: float = 0.0  # bytes one micro-batch swaps to host memory on this stage
    comm_buffer: float = 0.0  # unsharded gradients (ZeRO-2/3) and gathered weights (ZeRO-3) in flight
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def per_micro_batch(self) -> float:
        return self.forward + self.backward

    def reduce_tail(self, virtual_stages: int = 1) -> float:
        """How long gradient reduction runs past the end of the stage's last backward.

        Each layer's gradients are reduced once its last backward is done, in backward order, one after
        the other on the data-parallel links (a two-machine flow shop): the reductions end
        max_k(sum of reductions from layer k on - sum of backward after layer k) after that backward.
        With v interleaved model chunks, a device's last backwards are spread over v chunks, 1/v of them
        in the final stretch.
        """
        copies = sum(rc.count * rc.reduce_copy for rc in self.runs)
        if any(rc.blocking_dp for rc in self.runs):
            # Each reduction holds the compute stream: nothing hides, the last backward is longer by all of them.
            return copies + self.tied_reduce + sum(rc.count * rc.reduce for rc in self.runs)
        scale = 1.0 / virtual_stages
        reductions = [(rc.backward * scale, rc.reduce, rc.count) for rc in reversed(self.runs)]  # backward order
        if self.tied_reduce:
            # The output layer (one layer, first in backward) also reduces its copy of the embedding.
            c, f, n = reductions[0]
            reductions[0] = (c, f + self.tied_reduce / n, n)
        best = 0.0
        f_after = 0.0  # reductions of the runs after this one
        c_after = 0.0  # backward of the runs after this one
        for c, f, n in reversed(reductions):
            # k at the run's last layer, then at its first.
            best = max(best, f + f_after - c_after, n * f + f_after - (n - 1) * c - c_after)
            f_after += n * f
            c_after += n * c
        # The copies run on the compute stream during the last backward and push everything after them.
        return best + copies


# What makes two stages cost the same (see `_stage_key`); a `memo` maps it to the cost computed once.
StageKey = tuple[object, ...]


def _stage_key(
    bound: BoundPlan, stage: BoundStage, rank: int, span_sets: dict[int, dict[str, list[GroupSpan]]]
) -> StageKey:
    cluster = bound.cluster
    return (
        tuple((run.strategy_key(), run.count) for run in stage.runs),
        id(cluster.topology.devices[rank]),
        id(cluster.node_of(rank)),
        stage.micro_step_batch,
        stage.cp,
        # Spans are interned per cluster, so their identity names their shape.
        tuple((tp, tuple(id(x) for v in spans.values() for x in v)) for tp, spans in sorted(span_sets.items())),
        len(bound.stages) > 1,
        # An uneven batch split (plan.batch_split): the rank's own replica share, per tensor-parallel degree.
        None if stage.replica_batches is None else tuple(stage.micro_batch_of(rank, tp) for tp in sorted(span_sets)),
    )


def stage_cost(
    bound: BoundPlan, stage: BoundStage, rank: int, memo: dict[StageKey, StageCost] | None = None
) -> StageCost:
    """Per micro-batch costs and model-state memory of `stage` on the device at `rank`.

    Stages with the same layers, device, links and group shapes cost the same, so they are computed
    once per `memo`: a 1,000-GPU plan costs what its distinct stages cost.
    """
    span_sets = {tp: _spans(bound.cluster, stage, tp, bound.plan.ep) for tp in {run.tp for run in stage.runs}}
    key = _stage_key(bound, stage, rank, span_sets)
    if memo is not None and key in memo:
        return memo[key]
    ctx = _StageContext.of(bound, stage, rank, span_sets)
    cost = StageCost(device=ctx.device, host_link=ctx.node.host_link)
    runs = []
    opt_params = 0.0  # parameters this device's optimizer step updates
    for run in stage.runs:
        rc = _run_cost(ctx, run)
        runs.append(rc)
        opt_params = _add_run(cost, ctx, rc, opt_params)
    runs = _with_relayouts(bound, stage, rank, runs)
    for rc in runs:
        for move in (rc.relayout_in, rc.relayout_out):
            cost.forward += move.forward_s
            cost.backward += move.backward_s
    cost.runs = tuple(runs)
    if cost.host_activations:
        _check_host_memory(bound, stage, ctx.node, cost.host_activations)
    cost.comm = cost.forward + cost.backward - cost.compute - cost.recompute - cost.stall
    plan = bound.plan
    cost.optimizer = optimizer_time(opt_params, OPTIMIZER_TRAFFIC[(plan.optimizer, plan.dtype != "fp32")], ctx.line)
    if memo is not None:
        memo[key] = cost
    return cost


@dataclass(frozen=True)
class _StageContext:
    """What every run of a stage on one device shares: the plan, the device and its links, the dtype's
    byte sizes and the group spans per tensor-parallel degree."""

    bound: BoundPlan
    stage: BoundStage
    rank: int
    device: DeviceSpec
    node: NodeSpec
    line: Roofline
    span_sets: dict[int, dict[str, list[GroupSpan]]]
    per_param: StateBytes  # bytes per parameter of each model state
    reduce_bytes: int  # bytes per gradient element in data-parallel reductions

    @classmethod
    def of(
        cls, bound: BoundPlan, stage: BoundStage, rank: int, span_sets: dict[int, dict[str, list[GroupSpan]]]
    ) -> _StageContext:
        plan, cluster = bound.plan, bound.cluster
        device = cluster.topology.devices[rank]
        return cls(
            bound=bound,
            stage=stage,
            rank=rank,
            device=device,
            node=cluster.node_of(rank),
            line=roofline(device, plan.dtype, plan.attention),
            span_sets=span_sets,
            per_param=state_bytes(plan.dtype, plan.optimizer),
            reduce_bytes=DTYPE_BYTES[plan.grad_reduce_dtype or ("fp16" if plan.dtype == "fp16" else "fp32")],
        )

    @property
    def framework(self) -> ComputeSpec:
        """The device's compute figures, which also carry the training framework's overheads."""
        return self.device.compute

    def framework_copy(self, nbytes: float) -> float:
        """The framework copying a layer's data-parallel buffers on the compute cores."""
        bw = self.framework.grad_pack_bandwidth
        return nbytes / bw if bw else 0.0


def _run_cost(ctx: _StageContext, run: LayerRun) -> RunCost:
    """Per layer and per micro-batch figures of one run of identical layers: its profile and times, the
    collectives that block it, recompute, data-parallel traffic and where its saved activations live."""
    stage, framework = ctx.stage, ctx.framework
    # Context-parallel ranks hold the whole layer as data-parallel ones do: gradients are averaged, and
    # ZeRO shards, over dp x cp (Megatron-LM's data-parallel group with context parallelism; the
    # executor's flattened ("dp", "cp") mesh).
    dp = stage.dp_for(run.tp) * stage.cp
    shape = _shard_shape(ctx, run)
    prof = layer_profile(ctx.bound.workload, run.kind, shape)
    times = _framework_layer_times(ctx, run, prof, dp)
    spans = ctx.span_sets[run.tp]
    tp_fwd = comm_time(prof.fwd_comm, spans, cp=False)
    tp_bwd = comm_time(prof.bwd_comm, spans, cp=False)
    # Ring attention hides its k/v passes behind the attention core, where the device runs collectives
    # beside compute; a device whose collectives block it (a CPU, see ComputeSpec.blocking_collectives)
    # waits for them, as it waits for the executor's k/v all-gather (executor.parallel.context_parallel).
    hidden = 0.0 if framework.blocking_collectives else 1.0
    cp_fwd = max(0.0, comm_time(prof.fwd_comm, spans, cp=True) - hidden * times.recompute_selective)
    cp_bwd = max(0.0, comm_time(prof.bwd_comm, spans, cp=True) - hidden * 2.5 * times.recompute_selective)
    recompute = _recompute_time(ctx, run, times, tp_fwd, cp_fwd)
    dpc = _data_parallel_costs(ctx, run, prof, dp, spans)
    saved, host, copy = _activation_placement(ctx, run, prof, shape)
    return RunCost(
        run=run,
        profile=prof,
        times=times,
        spans=spans,
        dp=dp,
        recompute=recompute,
        tp_forward=tp_fwd,
        tp_backward=tp_bwd,
        cp_forward=cp_fwd,
        cp_backward=cp_bwd,
        gather=dpc.gather,
        scatter=dpc.scatter,
        gather_bytes=dpc.gather_bytes,
        scatter_bytes=dpc.scatter_bytes,
        reduce=dpc.reduce,
        reduce_bytes=dpc.reduce_bytes,
        reduce_kind=dpc.reduce_kind,
        regather=dpc.regather,
        offload_copy=copy,
        saved=saved,
        # Backward re-materializes, for one layer at a time, what its recompute mode dropped.
        transient=_transient(prof, run.recompute, host),
        sigma=ctx.line.overlap_slowdown,
        host=host,
        copy_on_compute=ctx.device.kind == "cpu",
        dp_copy_forward=dpc.copy_forward,
        dp_copy_backward=dpc.copy_backward,
        reduce_copy=dpc.reduce_copy,
        blocking_dp=framework.blocking_collectives,
    )


def _shard_shape(ctx: _StageContext, run: LayerRun) -> ShardShape:
    """How one micro-batch of the run's layers is laid onto the device at the context's rank."""
    plan = ctx.bound.plan
    return ShardShape(
        micro_batch=ctx.stage.micro_batch_of(ctx.rank, run.tp),  # the rank's replica's share (plan.batch_split)
        seq_len=ctx.bound.workload.seq_len,
        tp=run.tp,
        sequence_parallel=run.sequence_parallel,
        cp=ctx.stage.cp,
        ep=plan.ep,
        dtype_bytes=DTYPE_BYTES[plan.dtype],
        attention=kernel_family(plan.attention),
        # The loss kernel is the stack's: it sets what the head keeps for backward.
        cross_entropy=ctx.bound.stack_spec.cross_entropy if ctx.bound.stack_spec is not None else "pytorch",
    )


def _framework_layer_times(ctx: _StageContext, run: LayerRun, prof: LayerProfile, dp: int) -> LayerTimes:
    """The layer's operator times with what the framework adds: sharded-tensor dispatch, the per-layer
    call, and gradient accumulation over the micro-batches."""
    framework, num_micro_batches = ctx.framework, ctx.bound.num_micro_batches
    times = layer_times(prof, ctx.line)
    if run.tp > 1 and framework.sharded_kernel_overhead > 0:
        times = _with_sharded_dispatch(times, prof, framework.sharded_kernel_overhead)
    if framework.layer_call_overhead > 0:
        times = _with_layer_call(times, framework.layer_call_overhead)
    if num_micro_batches > 1 and prof.params_local > 0:
        # ZeRO-3 reduce-scatters every micro-batch's gradients (see `scatter`), so it accumulates its shard.
        accumulated = prof.params_local * ctx.per_param.gradients / (dp if run.dp_type == "zero3" else 1)
        times = _with_gradient_accumulation(times, accumulated, ctx.device, num_micro_batches)
    return times


def _recompute_time(ctx: _StageContext, run: LayerRun, times: LayerTimes, tp_fwd: float, cp_fwd: float) -> float:
    """Forward work the run's recompute mode repeats in backward, per layer and micro-batch."""
    if run.recompute == "full":
        return times.recompute_full + tp_fwd + cp_fwd
    if run.recompute == "selective":
        return times.recompute_selective
    if run.recompute == OP_SELECTIVE:
        # torchtitan saves reduce-scatter outputs, not all-gathers or all-reduces: with sequence parallelism
        # the two all-gathers re-run (half the forward's tp traffic), without it both all-reduces. The fused
        # attention output is saved, so the context-parallel exchange does not re-run.
        return times.recompute_op_selective + (0.5 if run.sequence_parallel else 1.0) * tp_fwd
    if run.recompute == "tokenwise":
        why = supports_tokenwise(ctx.bound.workload, run.kind)
        if why:
            raise UnsupportedPlan(f"recompute=tokenwise (MEMO): {why}")
        # MEMO: the (1 - alpha) share of tokens re-runs everything but the attention core, with the
        # tensor-parallel collectives of those tokens.
        return (1.0 - run.offload) * (times.forward - times.recompute_selective + tp_fwd)
    return 0.0


@dataclass(frozen=True)
class _DataParallelCosts:
    """One layer's data-parallel traffic: ZeRO-3 gathers and scatters per micro-batch, or the ddp / ZeRO-1/2
    reduction (and ZeRO-1/2 regather) once per iteration, with the framework's copies around them."""

    reduce_kind: str
    gather: float = 0.0
    scatter: float = 0.0
    gather_bytes: float = 0.0
    scatter_bytes: float = 0.0
    reduce: float = 0.0
    reduce_bytes: float = 0.0
    regather: float = 0.0
    copy_forward: float = 0.0
    copy_backward: float = 0.0
    reduce_copy: float = 0.0


def _data_parallel_costs(
    ctx: _StageContext, run: LayerRun, prof: LayerProfile, dp: int, spans: dict[str, list[GroupSpan]]
) -> _DataParallelCosts:
    """The run's data-parallel collectives over its widest-waiting group, per layer (nothing when dp is 1)."""
    reduce_kind = "all_reduce" if run.dp_type == "ddp" else "reduce_scatter"
    if dp <= 1:
        return _DataParallelCosts(reduce_kind)
    per_param, reduce_bytes = ctx.per_param, ctx.reduce_bytes
    overhead = ctx.framework.dp_layer_overhead
    if run.dp_type == "zero3":
        gather_bytes = prof.params_local * per_param.weights
        scatter_bytes = prof.params_local * reduce_bytes
        return _DataParallelCosts(
            reduce_kind,
            gather=max(collective_time("all_gather", gather_bytes, s) for s in spans["dp"]),
            scatter=max(collective_time("reduce_scatter", scatter_bytes, s) for s in spans["dp"]),
            gather_bytes=gather_bytes,
            scatter_bytes=scatter_bytes,
            # The framework copies gathered weights out of, and gradients into, flat buffers.
            copy_forward=ctx.framework_copy(gather_bytes),
            copy_backward=ctx.framework_copy(gather_bytes) + ctx.framework_copy(scatter_bytes) + overhead,
        )
    grad_bytes = prof.params_local * reduce_bytes
    regather = 0.0
    if run.dp_type != "ddp":
        regather = max(collective_time("all_gather", prof.params_local * per_param.weights, s) for s in spans["dp"])
    return _DataParallelCosts(
        reduce_kind,
        reduce=max(collective_time(reduce_kind, grad_bytes, s) for s in spans["dp"]),
        reduce_bytes=grad_bytes,
        regather=regather,
        reduce_copy=ctx.framework_copy(grad_bytes) + overhead,
    )


def _activation_placement(
    ctx: _StageContext, run: LayerRun, prof: LayerProfile, shape: ShardShape
) -> tuple[float, float, float]:
    """(bytes kept on the device, bytes swapped to host, seconds to copy them each way) per layer."""
    host_bw = ctx.node.host_link.effective_bandwidth
    if run.recompute == "tokenwise":
        # Nothing stays on the device between forward and backward: the attention core's tensors and the
        # alpha share of token-wise ones go to host, with the block input and attention output of the
        # tokens that backward recomputes (workloads.activations).
        host = block_activations(ctx.bound.workload, run.kind, shape).host_bytes(run.offload)
        return 0.0, host, host / host_bw
    saved = prof.saved_bytes[run.recompute]
    # Under a MEMO plan alpha is the blocks' token share; the input and output layers keep theirs.
    if run.offload > 0 and not (
        ctx.bound.plan.recompute == "tokenwise" and run.kind in ("embedding", "patch_embedding", "head")
    ):
        host = run.offload * saved
        return saved * (1.0 - run.offload), host, host / host_bw
    return saved, 0.0, 0.0


def _add_run(cost: StageCost, ctx: _StageContext, rc: RunCost, opt_params: float) -> float:
    """Add a run's `count` layers to the stage's per micro-batch times, activations, model states and
    buffers; returns `opt_params` with the parameters the run's optimizer step updates added."""
    plan, multi_stage = ctx.bound.plan, len(ctx.bound.stages) > 1
    run, prof, times, dp, n = rc.run, rc.profile, rc.times, rc.dp, rc.count
    if dp > 1 and run.dp_type in ("zero2", "zero3"):
        # A layer's gradients exist unsharded until reduce-scattered; ZeRO-3 also holds the gathered
        # weights of the layer it computes and of the one it prefetches.
        gathered = 2 * ctx.per_param.weights if run.dp_type == "zero3" else 0.0
        cost.comm_buffer = max(cost.comm_buffer, prof.params_local * (gathered + ctx.reduce_bytes))
    cost.compute += n * (times.forward + times.backward)
    cost.backward_compute += n * times.backward
    cost.recompute += n * rc.recompute
    cost.forward += n * rc.forward
    cost.backward += n * rc.backward
    cost.stall += n * rc.stall
    cost.saved_activations += n * rc.saved
    cost.host_activations += n * rc.host
    cost.regather += n * rc.regather
    states = model_state_memory(n * prof.params_local, plan.dtype, plan.optimizer, run.dp_type, dp)
    cost.weights += states.weights
    cost.gradients += states.gradients
    cost.optimizer_states += states.optimizer
    opt_params += n * prof.params_local / (dp if run.dp_type != "ddp" else 1)
    cost.output_bytes = prof.output_bytes
    if prof.tied_params_local and multi_stage:
        # The output layer keeps its own copy of the tied embedding, kept in sync with it.
        tied = model_state_memory(prof.tied_params_local, plan.dtype, plan.optimizer, run.dp_type, dp)
        cost.weights += tied.weights
        cost.gradients += tied.gradients
        cost.optimizer_states += tied.optimizer
        opt_params += prof.tied_params_local / (dp if run.dp_type != "ddp" else 1)
        if dp > 1:
            cost.tied_reduce_bytes = prof.tied_params_local * ctx.reduce_bytes
            cost.tied_reduce = max(collective_time("all_reduce", cost.tied_reduce_bytes, s) for s in rc.spans["dp"])
    return opt_params


def _with_relayouts(bound: BoundPlan, stage: BoundStage, rank: int, runs: list[RunCost]) -> list[RunCost]:
    """The runs with the activation moves between their layouts (`cost.relayout`), as the executor makes
    them: each model chunk starts and ends in the stage's home layout (the plan's tp, or the stage's, and
    the plan's sequence parallelism), the layout of its embedding and head. A stage whose layers all share
    one layout moves nothing."""
    if len({Layout.of(rc.run.tp, rc.run.sequence_parallel) for rc in runs}) < 2:
        return runs
    plan, cfg = bound.plan, bound.workload
    home_tp = (plan.stages[stage.index].tp or plan.tp) if plan.stages else plan.tp
    home = Layout.of(home_tp, plan.sequence_parallel)
    per_sequence = cfg.seq_len / stage.cp * cfg.hidden_size * DTYPE_BYTES[plan.dtype]
    out: list[RunCost] = []
    previous, end = home, None
    for i, rc in enumerate(runs):
        if end is not None and rc.run.first != end:  # a new model chunk (interleaved schedule): from home
            previous = home
        layout = Layout.of(rc.run.tp, rc.run.sequence_parallel)
        entry = relayout(bound.cluster, stage, rank, previous, layout, per_sequence)
        chunk_ends = i + 1 == len(runs) or runs[i + 1].run.first != rc.run.first + rc.run.count
        leave = relayout(bound.cluster, stage, rank, layout, home, per_sequence) if chunk_ends else NONE
        out.append(replace(rc, relayout_in=entry, relayout_out=leave) if entry or leave else rc)
        previous, end = layout, rc.run.first + rc.run.count
    return out


def _with_sharded_dispatch(times: LayerTimes, prof: LayerProfile, per_kernel: float) -> LayerTimes:
    """A tensor-parallel layer's times with the framework's per-kernel cost of sharded tensors added."""
    fwd = float(prof.fwd_kernels.sum()) * per_kernel
    return LayerTimes(
        forward=times.forward + fwd,
        backward=times.backward + float(prof.bwd_kernels.sum()) * per_kernel,
        recompute_selective=times.recompute_selective + float(prof.fwd_kernels[prof.selective].sum()) * per_kernel,
        recompute_full=times.recompute_full + fwd,
        recompute_op_selective=times.recompute_op_selective
        + float((prof.fwd_kernels * prof.op_selective).sum()) * per_kernel,
    )


def _with_layer_call(times: LayerTimes, per_call: float) -> LayerTimes:
    """A layer's times with the framework's fixed cost of calling it once per micro-batch (module call,
    autograd graph, hooks) in forward, in backward and in a full recompute's forward. Selective recompute
    re-runs only the attention core inside the layer's call, so it does not pay it again."""
    return LayerTimes(
        forward=times.forward + per_call,
        backward=times.backward + per_call,
        recompute_selective=times.recompute_selective,
        recompute_full=times.recompute_full + per_call,
        # op-selective re-runs the block's forward under a checkpoint, so it calls the layer again.
        recompute_op_selective=times.recompute_op_selective + per_call,
    )


def _with_gradient_accumulation(
    times: LayerTimes, grad_bytes: float, device: DeviceSpec, micro_batches: int
) -> LayerTimes:
    """A layer's backward with the gradient accumulation of a multi-micro-batch iteration: every micro-batch
    after the first adds its gradients into the layer's `.grad` (read both, write one: 3x its bytes, memory
    bound), spread evenly over the micro-batches as the engines cost every micro-batch alike. Data-parallel
    plans accumulate unsharded gradients, since the executor reduces once, after the last micro-batch."""
    nbytes = 3.0 * grad_bytes
    seconds = nbytes / (device.memory.bandwidth * device.memory.efficiency(nbytes))
    return LayerTimes(
        forward=times.forward,
        backward=times.backward + seconds * (micro_batches - 1) / micro_batches,
        recompute_selective=times.recompute_selective,
        recompute_full=times.recompute_full,
        recompute_op_selective=times.recompute_op_selective,
    )


def _transient(prof: LayerProfile, recompute: str, host: float) -> float:
    """What backward re-materializes for one layer: what its recompute mode dropped and what it fetches back
    from host, plus the next layer's swapped tensors prefetched beside it (under MEMO the whole layer), and
    the temporaries its backward makes."""
    if recompute == "tokenwise":
        return prof.saved_bytes["none"] + host + prof.backward_workspace
    return prof.saved_bytes["none"] - prof.saved_bytes[recompute] + 2 * host + prof.backward_workspace


def host_memory_per_device(bound: BoundPlan, stage: BoundStage, host_activations: float) -> float:
    """Host bytes one device of `stage` fills with swapped activations at the schedule's peak."""
    plan = bound.plan
    k = micro_batches_in_flight(
        plan.schedule, stage.index, len(bound.stages), bound.num_micro_batches, plan.virtual_stages
    )
    return k * host_activations


def _check_host_memory(bound: BoundPlan, stage: BoundStage, node: NodeSpec, host_activations: float) -> None:
    """Swapped activations share the node's DRAM with its other devices (taken to swap as much)."""
    per_device = host_memory_per_device(bound, stage, host_activations)
    need = per_device * node.num_devices
    if need > node.host.memory:
        raise InfeasiblePlan(
            f"host memory: stage {stage.index} swaps {per_device / 2**30:.1f} GiB of activations per device to host, "
            f"{need / 2**30:.1f} GiB for the node's {node.num_devices} devices, but the node has "
            f"{node.host.memory / 2**30:.1f} GiB of host memory; lower offload (alpha) or add devices"
        )


def static_memory(cost: StageCost, num_stages: int) -> float:
    """Bytes a stage's device holds for the whole iteration: model states and buffers."""
    return cost.weights + cost.gradients + cost.optimizer_states + buffer_memory(cost, num_stages)


def buffer_memory(cost: StageCost, num_stages: int) -> float:
    """Runtime reserve, sharded-data-parallel buffers and the two pipeline activation buffers."""
    return cost.device.memory.reserved + cost.comm_buffer + (2 * cost.output_bytes if num_stages > 1 else 0.0)


def peak_activations(cost: StageCost, bound: BoundPlan, stage: BoundStage) -> float:
    """The largest activation bytes a stage's device holds during the iteration.

    With k micro-batches in flight when the stage starts its first backward, backward frees each run's
    saved activations as it goes (last layer first) and re-materializes one layer's dropped tensors at
    a time: the peak is max over runs r of k * S - (saved by the runs backward already left) + transient(r).
    The interleaved schedule keeps partial chunks in flight; it is bounded by k * S + max transient.
    """
    plan = bound.plan
    k = micro_batches_in_flight(
        plan.schedule, stage.index, len(bound.stages), bound.num_micro_batches, plan.virtual_stages
    )
    total = cost.saved_activations
    if plan.schedule == "interleaved":
        return k * total + max((rc.transient for rc in cost.runs), default=0.0)
    peak = k * total
    freed = 0.0
    for rc in reversed(cost.runs):
        # Within a run the first layer backward reaches has freed the least.
        peak = max(peak, k * total - freed + rc.transient)
        freed += rc.count * rc.saved
    return peak
