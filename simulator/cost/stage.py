"""What one pipeline stage costs on one device type: the shared source of truth for both engines.

`stage_cost` turns a bound stage into per-layer figures for each run of identical layers (`RunCost`):
compute, recompute, blocking tensor-parallel communication, context-parallel and offload exposure,
ZeRO-3 gathers overlapped with compute, data-parallel gradient reduction, saved activations and model
states. The analytic model sums them with closed forms; the discrete-event engine turns the same
figures into tasks and flows on a timeline. Neither recomputes a cost on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from hwmodel.cluster import ClusterSpec, GroupSpan
from hwmodel.components import DeviceSpec, LinkSpec
from workloads.ops import Collective, LayerProfile, ShardShape
from workloads.transformer import layer_profile

from ..binding import BoundPlan, BoundStage, LayerRun
from .collectives import collective_time
from .compute import DTYPE_BYTES, LayerTimes, Roofline, layer_times, optimizer_time, roofline
from .memory import OPTIMIZER_TRAFFIC, micro_batches_in_flight, model_state_memory, state_bytes


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
    dp_groups = stage.dp_groups(tp)
    return {
        "tp": [cluster.span(stage.tp_group(tp))],
        "cp": [cluster.span(stage.cp_group(tp))],
        "dp": [cluster.span(g) for g in dp_groups],
        "ep": [cluster.span(g[:ep]) for g in dp_groups],
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
    dp: int
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
        fwd = overlapped(self.times.forward, self.gather, self.sigma)
        return fwd + self.tp_forward + self.cp_forward + max(0.0, self.offload_copy - self.times.forward)

    @property
    def backward(self) -> float:
        """Critical-path time of the layer's backward, recompute, communication and stalls included."""
        busy = self.times.backward + self.recompute
        bwd = overlapped(busy, self.gather + self.scatter, self.sigma)
        return bwd + self.tp_backward + self.cp_backward + max(0.0, self.offload_copy - self.times.backward)

    @property
    def stall(self) -> float:
        return max(0.0, self.offload_copy - self.times.forward) + max(0.0, self.offload_copy - self.times.backward)


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
    comm_buffer: float = 0.0  # unsharded gradients (ZeRO-2/3) and gathered weights (ZeRO-3) in flight
    extra: dict = field(default_factory=dict)

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
        return best


def _stage_key(bound: BoundPlan, stage: BoundStage, rank: int, span_sets: dict) -> tuple:
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
    )


def stage_cost(bound: BoundPlan, stage: BoundStage, rank: int, memo: dict | None = None) -> StageCost:
    """Per micro-batch costs and model-state memory of `stage` on the device at `rank`.

    Stages with the same layers, device, links and group shapes cost the same, so they are computed
    once per `memo`: a 1,000-GPU plan costs what its distinct stages cost.
    """
    plan, cfg, cluster = bound.plan, bound.workload, bound.cluster
    span_sets = {tp: _spans(cluster, stage, tp, plan.ep) for tp in {run.tp for run in stage.runs}}
    key = _stage_key(bound, stage, rank, span_sets)
    if memo is not None and key in memo:
        return memo[key]
    device = cluster.topology.devices[rank]
    node = cluster.node_of(rank)
    line: Roofline = roofline(device, plan.dtype)
    e = DTYPE_BYTES[plan.dtype]
    per_param = state_bytes(plan.dtype, plan.optimizer)
    reduce_bytes = DTYPE_BYTES[plan.grad_reduce_dtype or ("fp16" if plan.dtype == "fp16" else "fp32")]
    sigma = line.overlap_slowdown
    host_bw = node.host_link.effective_bandwidth
    multi_stage = len(bound.stages) > 1
    cost = StageCost(device=device, host_link=node.host_link)
    runs = []
    opt_params = 0.0
    for run in stage.runs:
        n = run.count
        dp = stage.dp_for(run.tp)
        shape = ShardShape(
            micro_batch=stage.micro_step_batch // dp,
            seq_len=cfg.seq_len,
            tp=run.tp,
            sequence_parallel=run.sequence_parallel,
            cp=stage.cp,
            ep=plan.ep,
            dtype_bytes=e,
            attention=plan.attention,
        )
        prof = layer_profile(cfg, run.kind, shape)
        times = layer_times(prof, line)
        spans = span_sets[run.tp]
        tp_fwd = comm_time(prof.fwd_comm, spans, cp=False)
        tp_bwd = comm_time(prof.bwd_comm, spans, cp=False)
        # Ring attention hides its k/v passes behind the attention core.
        cp_fwd = max(0.0, comm_time(prof.fwd_comm, spans, cp=True) - times.recompute_selective)
        cp_bwd = max(0.0, comm_time(prof.bwd_comm, spans, cp=True) - 2.5 * times.recompute_selective)
        if run.recompute == "full":
            recompute = times.recompute_full + tp_fwd + cp_fwd
        elif run.recompute == "selective":
            recompute = times.recompute_selective
        else:
            recompute = 0.0
        gather = scatter = gather_bytes = scatter_bytes = 0.0
        reduce = regather = grad_bytes = 0.0
        reduce_kind = "all_reduce" if run.dp_type == "ddp" else "reduce_scatter"
        if dp > 1:
            if run.dp_type == "zero3":
                gather_bytes = prof.params_local * per_param.weights
                scatter_bytes = prof.params_local * reduce_bytes
                gather = max(collective_time("all_gather", gather_bytes, s) for s in spans["dp"])
                scatter = max(collective_time("reduce_scatter", scatter_bytes, s) for s in spans["dp"])
            else:
                grad_bytes = prof.params_local * reduce_bytes
                reduce = max(collective_time(reduce_kind, grad_bytes, s) for s in spans["dp"])
                if run.dp_type != "ddp":
                    regather = max(
                        collective_time("all_gather", prof.params_local * per_param.weights, s) for s in spans["dp"]
                    )
            if run.dp_type in ("zero2", "zero3"):
                # A layer's gradients exist unsharded until reduce-scattered; ZeRO-3 also holds the gathered
                # weights of the layer it computes and of the one it prefetches.
                gathered = 2 * per_param.weights if run.dp_type == "zero3" else 0.0
                cost.comm_buffer = max(cost.comm_buffer, prof.params_local * (gathered + reduce_bytes))
        saved = prof.saved_bytes[run.recompute]
        copy = 0.0
        if run.offload > 0:
            copy = run.offload * saved / host_bw
            saved *= 1.0 - run.offload
        rc = RunCost(
            run=run, profile=prof, times=times, spans=spans, dp=dp, recompute=recompute,
            tp_forward=tp_fwd, tp_backward=tp_bwd, cp_forward=cp_fwd, cp_backward=cp_bwd,
            gather=gather, scatter=scatter, gather_bytes=gather_bytes, scatter_bytes=scatter_bytes,
            reduce=reduce, reduce_bytes=grad_bytes, reduce_kind=reduce_kind, regather=regather,
            offload_copy=copy, saved=saved,
            # Backward re-materializes, for one layer at a time, what its recompute mode dropped.
            transient=prof.saved_bytes["none"] - prof.saved_bytes[run.recompute], sigma=sigma,
        )
        runs.append(rc)
        cost.compute += n * (times.forward + times.backward)
        cost.backward_compute += n * times.backward
        cost.recompute += n * recompute
        cost.forward += n * rc.forward
        cost.backward += n * rc.backward
        cost.stall += n * rc.stall
        cost.saved_activations += n * saved
        cost.regather += n * regather
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
                cost.tied_reduce_bytes = prof.tied_params_local * reduce_bytes
                cost.tied_reduce = max(collective_time("all_reduce", cost.tied_reduce_bytes, s) for s in spans["dp"])
    cost.runs = tuple(runs)
    cost.comm = cost.forward + cost.backward - cost.compute - cost.recompute - cost.stall
    cost.optimizer = optimizer_time(opt_params, OPTIMIZER_TRAFFIC[(plan.optimizer, plan.dtype != "fp32")], line)
    if memo is not None:
        memo[key] = cost
    return cost


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
    k = micro_batches_in_flight(plan.schedule, stage.index, len(bound.stages), bound.num_micro_batches, plan.virtual_stages)
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
