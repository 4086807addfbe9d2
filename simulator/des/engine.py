"""The discrete-event engine: one training iteration of a plan as a SimPy timeline.

Model. Ranks that do identical work on identical hardware behave identically, so each pipeline stage
is simulated by one representative device per device type it contains (a 1,024-GPU uniform plan with
16 stages simulates 16 devices; a stage mixing A100s and V100s keeps both; replicas of an uneven batch
split keep one per distinct share). Each representative has a compute stream and ports: intra-node
fabric, its share of the NICs, PCIe to the host (the device-to-host and host-to-device copy engines) and
the WAN, each in two directions, and its share of the node's SSD bandwidth (read and write). All
transfers are flows sharing those ports (`fluid.py`), so a gradient reduction and a pipeline send on one
NIC slow each other, and a ZeRO-3 gather slows the compute beside it.

Lowering. The plan's schedule (`simulator.schedules`) gives each stage its order of forward and
backward operations; each operation runs the stage's runs of identical layers as compute tasks whose
durations, bytes and collectives come from `simulator.cost.stage` (the analytic model's source too):
blocking tensor-parallel collectives after compute, ZeRO-3 gathers and reduce-scatters and activation
offload copies beside it, pipeline sends between stages, and, in the last micro-batch, each layer's
gradient reduction as soon as its backward ends; then the optimizer step and ZeRO-1/2 weight gathers.
A collective becomes the flows its hierarchical algorithm sends, one per tier it crosses.

Memory. Each representative's memory is a timeline: model states and buffers for the whole iteration,
a run's saved activations from the end of its forward to the end of its backward, and the tensors a
recompute re-materializes while that backward runs.

Speed (exact shortcuts, `fast=True`). A flow that can meet no other flow on its ports has a fixed rate,
so such collectives, and a run's compute plus the blocking collectives after it where nothing can slow
the compute, are plain timers (`_exclusive_ports`); a long 1F1B or interleaved pipeline is costed once
per steady state from two shorter runs (`simulator.des.steady`). `fast=False` runs every flow through
the fluid network and every micro-batch as events; tests compare the two.

Termination. Every timer moves time (`fluid.resolution`), and `run_bounded` stops a run past the event
bound derived from the plan's task count (`event_bound`) with `EventBoundExceeded`, a UserError (exit 2
from the CLI); a plan whose bound passes MAX_EVENTS is refused before it runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import simpy

from hwmodel.cluster import GroupSpan, Tier
from hwmodel.errors import UserError
from simulator.binding import BoundPlan, BoundStage, bind
from simulator.cost.collectives import latency_steps
from simulator.cost.stage import RunCost, StageCost, buffer_memory, stage_cost
from simulator.des.fluid import FluidNetwork, Port
from simulator.des.records import TIER_PORT, DesResult, Rep, TraceEvent
from simulator.schedules import Op, stage_order
from workloads.ops import Collective

# The event bound (`Simulation.event_bound`): phases of one collective at most (the tiers of a span,
# twice for an all-reduce), SimPy events per task, and the most events a simulation may take.
MAX_PHASES = 6
EVENTS_PER_TASK = 8
MAX_EVENTS = 100_000_000


class EventBoundExceeded(UserError):
    """The event engine would take, or took, more events than the plan's task count allows."""


def coalesce(phases: list[list[tuple[Tier, float, float]]]) -> list[list[tuple[Tier, float, float]]]:
    """Consecutive one-flow phases on the same tier at the same cap as one flow of their bytes (an
    all-reduce's reduce-scatter and all-gather inside a node): the two would hold the same ports at the
    same rate one after the other, so the flow takes the same time under any contention, for one event
    instead of two."""
    out: list[list[tuple[Tier, float, float]]] = []
    for phase in phases:
        if out and len(phase) == 1 and len(out[-1]) == 1 and out[-1][0][::2] == phase[0][::2]:
            tier, nbytes, cap = out[-1][0]
            out[-1] = [(tier, nbytes + phase[0][1], cap)]
        else:
            out.append(list(phase))
    return out


class Simulation:
    """One iteration of a bound plan on the representatives of its stages."""

    def __init__(
        self,
        bound: BoundPlan,
        record_trace: bool = False,
        progress: Callable[[int], None] | None = None,
        background: tuple[tuple[int, str, float, float], ...] = (),
        fast: bool = True,
        micro_batches: int | None = None,
    ):
        """
        Args:
            bound: the plan, bound to its workload and cluster.
            record_trace: keep every task and flow for `trace.py` and `plot.py`.
            progress: called with 1 after each forward or backward operation.
            background: extra flows that compete with the plan: (rep index, port name such as
                "nic.tx", start time in seconds, bytes). For what-if studies and tests.
            fast: take the exact shortcuts (`_exclusive_ports`); False runs every flow through the fluid
                network, and every micro-batch as events (what tests compare the shortcuts with).
            micro_batches: run the schedule with this many micro-batches instead of the plan's (the
                costs stay the plan's); what `simulator.des.steady` extrapolates from.
        """
        self.fast = fast
        self.bound = bound
        self.background = background
        self.env = simpy.Environment()
        self.net = FluidNetwork(self.env)
        self.record_trace = record_trace
        self.trace: list[TraceEvent] = []
        # (rep index, name, start, end) of every compute task, traced or not: the task graph's compute nodes
        self.compute_tasks: list[tuple[int, str, float, float]] = []
        self.progress = progress
        self.num_tasks = 0
        self.plan = bound.plan
        self.m = micro_batches or bound.num_micro_batches
        self.p = len(bound.stages)
        self.v = self.plan.virtual_stages
        memo: dict = {}
        self._route_memo: dict[tuple[int, int], list] = {}
        self._fused_memo: dict[tuple[int, int, int, int], tuple | None] = {}
        self._phase_memo: dict[tuple, tuple] = {}  # (kind, bytes, id(span)) -> (phases, latency, span kept alive)
        from simulator.analytic import representatives  # the same collapse as the analytic model

        self.stage_reps: list[list[Rep]] = []
        self.reps: list[Rep] = []
        cluster = bound.cluster
        for stage in bound.stages:
            reps = []
            for rank, same in representatives(cluster, stage).items():
                cost = stage_cost(bound, stage, rank, memo)
                rep = Rep(len(self.reps), stage, rank, cost, same, simpy.Resource(self.env, capacity=1))
                self._make_ports(rep)
                rep.memory_base = cost.weights + cost.gradients + cost.optimizer_states + buffer_memory(cost, self.p)
                rep.memory_now = rep.memory_peak = rep.memory_base
                rep.memory_events.append((0.0, rep.memory_base))
                reps.append(rep)
                self.reps.append(rep)
            self.stage_reps.append(reps)
        # Only a ZeRO-3 gather beside compute slows compute (`_zero3(slows_compute=True)`); without one every
        # compute task runs at full speed, a plain timer.
        self.net.compute_slowed = any(rc.gather and not rc.blocking_dp for rep in self.reps for rc in rep.cost.runs)
        # Ports on which a rep's flows never meet another flow: their collectives are timers (`_collective`).
        self.exclusive = self._exclusive_ports() if fast else [set() for _ in self.reps]
        # Layer runs of each model chunk of each representative (its own device's costs), in forward order.
        self.chunk_runs = [self._chunks(rep.cost, rep.stage) for rep in self.reps]
        # done[(kind, micro_batch, global_chunk)] -> event fired when every rep of that stage finished it
        self.done: dict[tuple[str, int, int], simpy.Event] = {}
        self.arrived: dict[tuple[str, int, int], simpy.Event] = {}

    # ---- setup -------------------------------------------------------------------------------------
    def _make_ports(self, rep: Rep) -> None:
        cluster = self.bound.cluster
        node = cluster.node_of(rep.rank)
        # A port's capacity is the best any transfer achieves through it; each collective kind's own
        # (measured) bandwidth caps its flows below that.
        capacities = {
            "intra": node.intra_node.peak_bandwidth,
            "pcie": node.host_link.peak_bandwidth,
            "nic": (node.network.peak_bandwidth * node.network.ports / node.num_devices)
            if node.network
            else float("inf"),
            "wan": max((w.link.peak_bandwidth for w in cluster.wan), default=float("inf")),
        }
        for name, capacity in capacities.items():
            for direction in ("tx", "rx"):
                rep.ports[f"{name}.{direction}"] = Port(f"{rep.label()} {name}.{direction}", capacity)
        if node.storage is not None:
            # The node's SSDs, shared by its devices (model states and activations spilled to disk).
            share = node.num_devices
            rep.ports["ssd.write"] = Port(f"{rep.label()} ssd.write", node.storage.write_bandwidth / share)
            rep.ports["ssd.read"] = Port(f"{rep.label()} ssd.read", node.storage.read_bandwidth / share)

    def _exclusive_ports(self) -> list[set[str]]:
        """Per rep, the link ports that only its compute stream's own collectives use, one at a time.

        Flows that run beside the stream or come from another rep make a port shared: pipeline sends
        (the sender's tx, the receiver's rx), ZeRO-3 gathers and scatters beside compute, gradient
        reductions behind the backward, background flows. On the other ports at most one flow runs at a
        time, so its rate is fixed by its own cap and the port's capacity, and the fluid network would
        compute the same end time as a plain timer."""
        shared: list[set[str]] = [set() for _ in self.reps]

        def share(rep: Rep, span: GroupSpan) -> None:
            for level in span.levels:
                shared[rep.index].update(f"{TIER_PORT[level.tier]}.{d}" for d in ("tx", "rx"))

        for rep in self.reps:
            if self.p > 1:
                for dst_stage in {(rep.stage.index + 1) % self.p, (rep.stage.index - 1) % self.p}:
                    for dst, path in self._routes(rep, dst_stage):
                        shared[rep.index].add(f"{TIER_PORT[path.tier]}.tx")
                        shared[dst.index].add(f"{TIER_PORT[path.tier]}.rx")
            for rc in rep.cost.runs:
                if not rc.blocking_dp and (rc.gather or rc.reduce or self._tied(rc)):
                    share(rep, rc.dp_span)
        for rep_index, port, _, _ in self.background:
            shared[rep_index].add(port)
        return [{name for name in rep.ports if name not in shared[rep.index]} for rep in self.reps]

    def _chunks(self, cost: StageCost, stage: BoundStage) -> list[list[RunCost]]:
        """Split the stage's runs into its model chunks: binding gives each chunk a contiguous range of
        layers (the input layer joins the first, the output layer the last), and with two or more
        stages the chunks of one stage are never contiguous with each other."""
        chunks: list[list[RunCost]] = []
        end = None
        for rc in cost.runs:
            if end is None or rc.run.first != end:
                chunks.append([])
            chunks[-1].append(rc)
            end = rc.run.first + rc.run.count
        assert len(chunks) == self.v, (len(chunks), self.v)
        return chunks

    # ---- memory --------------------------------------------------------------------------------------
    def _memory(self, rep: Rep, delta: float) -> None:
        rep.memory_now += delta
        rep.memory_events.append((self.env.now, rep.memory_now))
        if rep.memory_now > rep.memory_peak + 1e-6:
            rep.memory_peak = rep.memory_now
            rep.memory_peak_time = self.env.now

    # ---- communication ---------------------------------------------------------------------------------
    def _phases(self, kind: str, nbytes: float, span: GroupSpan) -> tuple[list[list[tuple[Tier, float, float]]], float]:
        """The flows of a hierarchical collective: sequential phases of concurrent (tier, bytes, cap)
        flows, and its latency (mirrors `cost.collectives.collective_time`), memoized: the same run's
        collective recurs in every micro-batch."""
        key = (kind, nbytes, id(span))
        if key not in self._phase_memo:
            phases, latency = self._phases_of(kind, nbytes, span)
            self._phase_memo[key] = (coalesce(phases), latency, span)
        phases, latency, _ = self._phase_memo[key]
        return phases, latency

    @staticmethod
    def _phases_of(kind: str, nbytes: float, span: GroupSpan) -> tuple[list[list[tuple[Tier, float, float]]], float]:
        if span.size <= 1 or nbytes <= 0 or not span.levels:
            return [], 0.0
        latency = latency_steps(span.size) * max(level.latency_for(kind) for level in span.levels)
        if kind in ("all_gather", "reduce_scatter", "all_reduce"):
            phases = []
            share = nbytes
            for level in span.levels:
                k = level.fanout
                phases.append([(level.tier, (k - 1) / k * share, level.bandwidth_for(kind))])
                share /= k
            if kind == "all_reduce":
                return phases + phases[::-1], 2 * latency
            return phases, latency
        if kind == "all_to_all":
            flows, inner = [], 1
            for level in span.levels:
                flows.append((level.tier, inner * (level.fanout - 1) / span.size * nbytes, level.bandwidth_for(kind)))
                inner *= level.fanout
            return [flows], latency
        if kind == "send_recv":
            level = max(span.levels, key=lambda lvl: lvl.tier)
            return [[(level.tier, nbytes, level.bandwidth_for(kind))]], max(1, span.size - 1) * level.latency_for(kind)
        raise AssertionError(kind)

    def _collective(
        self,
        rep: Rep,
        kind: str,
        nbytes: float,
        span: GroupSpan,
        *,
        count: int = 1,
        slows_compute: bool = False,
        name: str = "",
        category: str = "comm",
    ):
        """Process: `count` back-to-back collectives of `kind` as flows on `rep`'s ports."""
        phases, latency = self._phases(kind, nbytes, span)
        if not phases:
            return
        start = self.env.now
        alone = self._alone(rep, phases)
        if alone is not None:
            # Every flow alone on its ports (`_exclusive_ports`): one timer for the whole collective.
            self._count_bytes(rep, phases, count)
            yield self.env.timeout(count * (latency + alone))
            phases = []
        elif latency:
            yield self.env.timeout(count * latency)
        for phase in phases:
            events = []
            for tier, phase_bytes, cap in phase:
                ports = (rep.port(tier, "tx"), rep.port(tier, "rx"))
                events.append(self.net.transfer(count * phase_bytes, ports, cap, rep, slows_compute))
                self.num_tasks += 1
            yield events[0] if len(events) == 1 else simpy.AllOf(self.env, events)
        if self.record_trace:
            track = TIER_PORT[max(t for ph in self._phases(kind, nbytes, span)[0] for t, _, _ in ph)]
            self._record(rep, name or kind, category, track, start)

    def _alone(self, rep: Rep, phases: list[list[tuple[Tier, float, float]]]) -> float | None:
        """Seconds the phases take when every flow has its ports to itself, with their bytes counted
        on the ports; None when a port may be shared (the fluid network decides)."""
        exclusive = self.exclusive[rep.index]
        seconds = 0.0
        for phase in phases:
            longest = 0.0
            for tier, _, _ in phase:
                name = TIER_PORT[tier]
                if f"{name}.tx" not in exclusive or f"{name}.rx" not in exclusive:
                    return None
            for tier, nbytes, cap in phase:
                tx, rx = rep.port(tier, "tx"), rep.port(tier, "rx")
                longest = max(longest, nbytes / min(cap, tx.capacity, rx.capacity))
            seconds += longest
        return seconds

    def _blocking(self, rep: Rep, collectives: tuple[Collective, ...], rc: RunCost, count: int, name: str):
        """Process: a run's blocking (tensor/expert-parallel) collectives, one after the other."""
        calls = self._blocking_calls(collectives, rc)
        if not self.record_trace and len(calls) > 1:
            seconds = self._alone_calls(rep, calls, count)
            if seconds is not None:
                # All of them alone on their ports: one timer for the sequence (same end, fewer events).
                yield self.env.timeout(seconds)
                return
        for kind, nbytes, span in calls:
            yield from self._collective(rep, kind, nbytes, span, count=count, name=f"{kind} {name}")

    @staticmethod
    def _blocking_calls(collectives: tuple[Collective, ...], rc: RunCost) -> list[tuple[str, float, GroupSpan]]:
        """(kind, bytes, span) of a run's blocking collectives (context parallelism's ring is costed apart)."""
        return [
            (c.kind, c.nbytes, max(rc.spans[c.group], key=lambda s: s.size)) for c in collectives if c.group != "cp"
        ]

    def _alone_calls(self, rep: Rep, calls: Sequence[tuple[str, float, GroupSpan]], count: int) -> float | None:
        """Seconds of back-to-back collectives whose flows all have their ports to themselves (their
        bytes counted on the ports), or None (and nothing counted) if any may share a port."""
        fused = self._alone_bytes(rep, calls, count)
        if fused is None:
            return None
        return self._moved(fused)

    def _count_bytes(self, rep: Rep, phases: list[list[tuple[Tier, float, float]]], count: int) -> None:
        for phase in phases:
            for tier, phase_bytes, _ in phase:
                rep.port(tier, "tx").bytes_moved += count * phase_bytes
                rep.port(tier, "rx").bytes_moved += count * phase_bytes
                self.num_tasks += 1

    # ---- tasks -----------------------------------------------------------------------------------------
    def _record(
        self, rep: Rep, name: str, category: str, track: str, start: float, end: float | None = None, **args
    ) -> None:
        end = self.env.now if end is None else end
        if track == "compute":
            self.compute_tasks.append((rep.index, name, start, end))
        if self.record_trace and end > start:
            self.trace.append(TraceEvent(name, category, track, rep.index, start, end, args))

    def _run_forward(self, rep: Rep, rc: RunCost, mb: int, count: int):
        """Process: `count` layers of a run forward for one micro-batch."""
        start = self.env.now
        side: list[simpy.Event] = []  # transfers that run beside the compute
        dp_span = rc.dp_span
        if rc.gather and rc.blocking_dp:
            # The framework waits for the gather before computing (ComputeSpec.blocking_collectives).
            yield from self._zero3(rep, rc, "all_gather", dp_span, count)
        elif rc.gather:
            side.append(self.env.process(self._zero3(rep, rc, "all_gather", dp_span, count, slows_compute=True)))
        if rc.offload_copy and not rc.copy_on_compute:
            side.append(
                self.net.transfer(
                    count * rc.offload_copy * rep.cost.host_link.effective_bandwidth, (rep.ports["pcie.tx"],)
                )
            )
        busy = count * (rc.times.forward + rc.dp_copy_forward)
        comm = None if side or rc.gather or rc.offload_copy else self._fused(rep, rc, count, rc.profile.fwd_comm)
        if comm is not None:
            # Compute and the communication after it as one timer (`_fused`): the same ends, one event.
            yield self.env.timeout(busy + comm + count * rc.cp_forward)
            self._account(rep, "compute", count * rc.times.forward)
            self._account(rep, "overlap", busy - count * rc.times.forward, rc)
            self._record(rep, f"F mb{mb} {self._layers(rc, count)}", "forward", "compute", start, end=start + busy)
            self._account(rep, "comm", comm + count * rc.cp_forward)
            self._memory(rep, count * rc.saved)
            self.num_tasks += 1
            return
        work = self.net.compute(rep, busy, rc.sigma)
        yield simpy.AllOf(self.env, [work, *side]) if side else work
        if rc.offload_copy and rc.copy_on_compute:
            # A CPU device copies the swapped share on its own cores after computing it (RunCost.copy_on_compute).
            yield self.env.timeout(count * rc.offload_copy)
        self._account(rep, "compute", count * rc.times.forward)
        self._account(rep, "overlap", self.env.now - start - count * rc.times.forward, rc)
        self._record(rep, f"F mb{mb} {self._layers(rc, count)}", "forward", "compute", start)
        yield from self._communicate(rep, rc.profile.fwd_comm, rc, count, f"fwd mb{mb}", rc.cp_forward)
        self._memory(rep, count * rc.saved)
        self.num_tasks += 1

    def _run_backward(self, rep: Rep, rc: RunCost, mb: int, count: int):
        """Process: `count` layers of a run backward (recompute included) for one micro-batch."""
        start = self.env.now
        self._memory(rep, rc.transient)
        side: list[simpy.Event] = []  # transfers that run beside the compute
        dp_span = rc.dp_span
        if rc.gather and rc.blocking_dp:
            yield from self._zero3(rep, rc, "all_gather", dp_span, count)
        elif rc.gather:
            side.append(self.env.process(self._zero3_backward(rep, rc, dp_span, count)))
        if rc.offload_copy and not rc.copy_on_compute:
            side.append(
                self.net.transfer(
                    count * rc.offload_copy * rep.cost.host_link.effective_bandwidth, (rep.ports["pcie.rx"],)
                )
            )
        busy = count * (rc.times.backward + rc.recompute + rc.dp_copy_backward)
        comm = None if side or rc.gather or rc.offload_copy else self._fused(rep, rc, count, rc.profile.bwd_comm)
        if comm is not None:
            yield self.env.timeout(busy + comm + count * rc.cp_backward)
            self._account(rep, "compute", count * rc.times.backward)
            self._account(rep, "recompute", count * rc.recompute)
            self._account(rep, "overlap", busy - count * (rc.times.backward + rc.recompute), rc)
            self._record(rep, f"B mb{mb} {self._layers(rc, count)}", "backward", "compute", start, end=start + busy)
            self._account(rep, "comm", comm + count * rc.cp_backward)
            self._memory(rep, -rc.transient - count * rc.saved)
            self.num_tasks += 1
            return
        work = self.net.compute(rep, busy, rc.sigma)
        yield simpy.AllOf(self.env, [work, *side]) if side else work
        if rc.gather and rc.blocking_dp:
            yield from self._zero3(rep, rc, "reduce_scatter", dp_span, count)
        compute = count * (rc.times.backward + rc.recompute)
        self._account(rep, "compute", count * rc.times.backward)
        self._account(rep, "recompute", count * rc.recompute)
        self._account(rep, "overlap", self.env.now - start - compute, rc)
        self._record(rep, f"B mb{mb} {self._layers(rc, count)}", "backward", "compute", start)
        yield from self._communicate(rep, rc.profile.bwd_comm, rc, count, f"bwd mb{mb}", rc.cp_backward)
        self._memory(rep, -rc.transient - count * rc.saved)
        self.num_tasks += 1

    def _fused(self, rep: Rep, rc: RunCost, count: int, collectives) -> float | None:
        """Seconds of a run's blocking collectives when the compute before them is a plain timer (full
        speed throughout: nothing slows it) and each of their flows is alone on its ports: then compute
        and communication are one timer of their sum (bytes counted on the ports). None otherwise, or
        when tracing (the trace shows each collective)."""
        if self.record_trace or (self.net.compute_slowed and rc.sigma):
            return None
        key = (rep.index, id(rc), id(collectives), count)  # runs and their profiles live as long as the simulation
        if key not in self._fused_memo:
            self._fused_memo[key] = self._alone_bytes(rep, self._blocking_calls(collectives, rc), count)
        fused = self._fused_memo[key]
        return None if fused is None else self._moved(fused)

    def _moved(self, fused: tuple[float, list[tuple[Port, float]], int]) -> float:
        """Count the bytes and flows of collectives run as one timer; their seconds."""
        seconds, moved, flows = fused
        for port, nbytes in moved:
            port.bytes_moved += nbytes
        self.num_tasks += flows
        return seconds

    def _alone_bytes(
        self, rep: Rep, calls: Sequence[tuple[str, float, GroupSpan]], count: int
    ) -> tuple[float, list[tuple[Port, float]], int] | None:
        """Seconds of back-to-back collectives alone on their ports, the bytes each port moves and the
        number of flows; None if any may share a port."""
        seconds = 0.0
        moved: list[tuple[Port, float]] = []
        flows = 0
        for kind, nbytes, span in calls:
            phases, latency = self._phases(kind, nbytes, span)
            alone = self._alone(rep, phases)
            if alone is None:
                return None
            seconds += count * (latency + alone)
            for phase in phases:
                for tier, phase_bytes, _ in phase:
                    moved += [(rep.port(tier, "tx"), count * phase_bytes), (rep.port(tier, "rx"), count * phase_bytes)]
                    flows += 1
        return seconds, moved, flows

    def _communicate(self, rep: Rep, collectives, rc: RunCost, count: int, name: str, cp_exposed: float):
        """Process: the blocking communication after a run's compute (tp/ep collectives, then the
        context-parallel ring time the attention did not hide)."""
        t = self.env.now
        yield from self._blocking(rep, collectives, rc, count, name)
        if cp_exposed:
            yield self.env.timeout(count * cp_exposed)
        self._account(rep, "comm", self.env.now - t)

    def _relayout(self, rep: Rep, moves, name: str):
        """Process: a per-layer layout change's collectives (`cost.relayout`), one after the other, on the
        critical path (the next layer needs the moved activations)."""
        if not moves:
            return
        t = self.env.now
        for kind, nbytes, span in moves:
            yield from self._collective(rep, kind, nbytes, span, name=f"{name} {kind}")
        self._account(rep, "comm", self.env.now - t)

    def _zero3(self, rep: Rep, rc: RunCost, kind: str, span: GroupSpan, count: int, slows_compute: bool = False):
        """Process: a run's ZeRO-3 weight gather (all_gather) or gradient reduce-scatter."""
        gather = kind == "all_gather"
        nbytes = rc.gather_bytes if gather else rc.scatter_bytes
        yield from self._collective(
            rep,
            kind,
            nbytes,
            span,
            count=count,
            slows_compute=slows_compute,
            name=f"{'gather' if gather else 'scatter'} L{rc.run.first}",
            category="zero3",
        )

    def _zero3_backward(self, rep: Rep, rc: RunCost, span: GroupSpan, count: int):
        gather = self.env.process(self._zero3(rep, rc, "all_gather", span, count, slows_compute=True))
        scatter = self.env.process(self._zero3(rep, rc, "reduce_scatter", span, count, slows_compute=True))
        yield simpy.AllOf(self.env, [gather, scatter])

    @staticmethod
    def _layers(rc: RunCost, count: int) -> str:
        if rc.run.kind in ("embedding", "patch_embedding", "head"):
            return rc.run.kind
        first = rc.run.first - 1
        return f"layer {first}" if count == 1 else f"layers {first}-{first + count - 1}"

    def _account(self, rep: Rep, key: str, seconds: float, rc: RunCost | None = None) -> None:
        if key == "overlap":
            # Time beyond the compute: offload copies or communication that did not hide behind it.
            if seconds <= 0:
                return
            key = "stall" if rc is not None and rc.offload_copy and not rc.gather else "comm"
        rep.busy[key] = rep.busy.get(key, 0.0) + seconds

    # ---- the schedule ----------------------------------------------------------------------------------
    def _event(self, table: dict, key: tuple) -> simpy.Event:
        if key not in table:
            table[key] = self.env.event()
        return table[key]

    def _global_chunk(self, stage: int, chunk: int) -> int:
        return chunk * self.p + stage

    def _where(self, global_chunk: int) -> tuple[int, int]:
        return global_chunk % self.p, global_chunk // self.p

    def _send(self, src: Rep, dst_stage: int, nbytes: float, key: tuple) -> None:
        """The activation (or its gradient) of one micro-batch to every rep of `dst_stage`: after each
        path's latency a flow, and `arrived` once all are in. Event callbacks rather than a process:
        sends are the most frequent tasks of a deep pipeline, and a process costs a start, a resume per
        step and an end event on top."""
        start = self.env.now
        routes = self._routes(src, dst_stage)
        arrived = self._event(self.arrived, key)
        pending = [len(routes)]

        def delivered(_event=None) -> None:
            pending[0] -= 1
            if pending[0] <= 0:
                kind = "activation" if key[0] == "F" else "gradient"
                self._record(src, f"send {kind} mb{key[1]}", "p2p", "p2p", start)
                arrived.succeed()

        if not routes:
            delivered()
        for dst, path in routes:
            ports = (src.port(path.tier, "tx"), dst.port(path.tier, "rx"))

            def begin(_event, ports=ports, cap=path.bandwidth) -> None:
                self.num_tasks += 1
                self.net.transfer(nbytes, ports, cap).callbacks.append(delivered)

            self.env.timeout(path.latency).callbacks.append(begin)

    def _routes(self, src: Rep, dst_stage: int) -> list:
        """The (receiver, path) pairs of a send from `src` to the reps of `dst_stage` (memoized)."""
        key = (src.index, dst_stage)
        if key not in self._route_memo:
            routes = []
            for dst in self.stage_reps[dst_stage]:
                path = self.bound.cluster.path(src.stage.ranks[0], dst.stage.ranks[0])
                if path.tier != Tier.DEVICE:
                    routes.append((dst, path))
            self._route_memo[key] = routes
        return self._route_memo[key]

    def _stream(self, rep: Rep):
        """Process: a representative's compute stream running its stage's operations in order."""
        stage = rep.stage.index
        order: list[Op] = stage_order(self.plan.schedule, stage, self.p, self.m, self.v)
        last_chunks = self.p * self.v - 1
        reductions = []
        siblings = self.stage_reps[stage]
        for op in order:
            g = self._global_chunk(stage, op.chunk)
            runs = self.chunk_runs[rep.index][op.chunk]
            wait_start = self.env.now
            if op.kind == "F":
                if g > 0:
                    yield self._event(self.arrived, ("F", op.micro_batch, g - 1))
                self._account(rep, "idle", self.env.now - wait_start)
                for rc in runs:
                    yield from self._relayout(rep, rc.relayout_in.forward, f"relayout in F mb{op.micro_batch}")
                    yield from self._run_forward(rep, rc, op.micro_batch, rc.count)
                    yield from self._relayout(rep, rc.relayout_out.forward, f"relayout out F mb{op.micro_batch}")
            else:
                if g < last_chunks:
                    yield self._event(self.arrived, ("B", op.micro_batch, g + 1))
                self._account(rep, "idle", self.env.now - wait_start)
                last = op.micro_batch == self._last_backward_micro_batch()
                for rc in reversed(runs):
                    yield from self._relayout(rep, rc.relayout_out.backward, f"relayout out B mb{op.micro_batch}")
                    if last and (rc.reduce or self._tied(rc)):
                        # The last backward of the iteration: reduce each layer's gradients as soon as
                        # that layer is done, behind the backward of the layers before it.
                        for _ in range(rc.count):
                            yield from self._run_backward(rep, rc, op.micro_batch, 1)
                            yield from self._reduce_copy(rep, rc)
                            if rc.blocking_dp:
                                t = self.env.now
                                yield from self._reduce_now(rep, rc, rc.dp_span)
                                self._account(rep, "comm", self.env.now - t)
                            else:
                                reductions.append(self.env.process(self._reduce(rep, rc)))
                    else:
                        yield from self._run_backward(rep, rc, op.micro_batch, rc.count)
                    yield from self._relayout(rep, rc.relayout_in.backward, f"relayout in B mb{op.micro_batch}")
            yield from self._sync(siblings, rep, (op.kind, op.micro_batch, g))
            if rep is siblings[0]:
                self._after_op(rep, op, g)
            rep.op_ends.append(self.env.now)
            if self.progress is not None:
                self.progress(1)
        if reductions:
            t = self.env.now
            yield simpy.AllOf(self.env, reductions)
            self._account(rep, "tail", self.env.now - t)
        t = self.env.now
        yield self.net.compute(rep, rep.cost.optimizer)
        self._account(rep, "optimizer", self.env.now - t)
        self._record(rep, "optimizer step", "optimizer", "compute", t)
        t = self.env.now
        for rc in rep.cost.runs:
            if rc.regather:
                span = rc.dp_span
                yield from self._collective(
                    rep,
                    "all_gather",
                    rc.profile.params_local * self._weight_bytes(),
                    span,
                    count=rc.count,
                    name="gather updated weights",
                    category="reduce",
                )
        self._account(rep, "tail", self.env.now - t)
        rep.finish = self.env.now
        rep.ended = True

    def _weight_bytes(self) -> float:
        from simulator.cost.memory import state_bytes

        return state_bytes(self.plan.dtype, self.plan.optimizer).weights

    def _tied(self, rc: RunCost) -> bool:
        return rc.run.kind == "head" and bool(rc.profile.tied_params_local) and self.p > 1 and rc.dp > 1

    def _last_backward_micro_batch(self) -> int:
        return self.m - 1

    def _reduce_copy(self, rep: Rep, rc: RunCost):
        """Process: the framework packing one layer's gradients for reduction on the compute stream."""
        if rc.reduce_copy:
            t = self.env.now
            yield self.net.compute(rep, rc.reduce_copy)
            self._account(rep, "comm", self.env.now - t)
            self._record(rep, f"pack grads L{rc.run.first}", "reduce", "compute", t)

    def _reduce(self, rep: Rep, rc: RunCost):
        """Process: one layer's gradient reduction (ddp all-reduce, ZeRO-1/2 reduce-scatter), queued
        behind the earlier layers' on the data-parallel communicator (NCCL runs them in order)."""
        span = rc.dp_span
        with rep.grad_stream.request() as turn:
            yield turn
            yield from self._reduce_now(rep, rc, span)

    def _reduce_now(self, rep: Rep, rc: RunCost, span: GroupSpan):
        if rc.reduce:
            yield from self._collective(
                rep, rc.reduce_kind, rc.reduce_bytes, span, name=f"reduce grads L{rc.run.first}", category="reduce"
            )
        if self._tied(rc):
            yield from self._collective(
                rep, "all_reduce", rep.cost.tied_reduce_bytes, span, name="reduce tied embedding", category="reduce"
            )

    def _sync(self, siblings: list[Rep], rep: Rep, key: tuple):
        """Reps of one stage (different device types) finish each operation together: their data
        parallel and tensor parallel peers wait for each other."""
        if len(siblings) == 1:
            return
        event = self._event(self.done, (rep.index,) + key)
        event.succeed()
        t = self.env.now
        yield simpy.AllOf(self.env, [self._event(self.done, (s.index,) + key) for s in siblings])
        self._account(rep, "idle", self.env.now - t)

    def _after_op(self, rep: Rep, op: Op, g: int) -> None:
        """Send the operation's output on to the neighbouring model chunk."""
        if op.kind == "F" and g < self.p * self.v - 1:
            dst, _ = self._where(g + 1)
            self._send(rep, dst, self._output_of(g), ("F", op.micro_batch, g))
        elif op.kind == "B" and g > 0:
            dst, _ = self._where(g - 1)
            self._send(rep, dst, self._output_of(g - 1), ("B", op.micro_batch, g))

    def _output_of(self, g: int) -> float:
        stage, _ = self._where(g)
        # The largest of the stage's (replicas of an uneven batch split hand on different sizes).
        return max(rep.cost.output_bytes for rep in self.stage_reps[stage])

    # ---- run -----------------------------------------------------------------------------------------
    def total_operations(self) -> int:
        """Forward and backward operations all representatives run (for progress reporting): every
        schedule runs each micro-batch forward and backward through each model chunk once."""
        return len(self.reps) * 2 * self.m * self.v

    def task_count(self) -> int:
        """An upper estimate of the tasks and flows the plan's iteration makes, from its shape alone
        (before anything runs): per operation, each layer run's compute, its collectives' phases,
        layout changes and side transfers, and the pipeline send; per layer in the last backward, its
        gradient reduction; then the optimizer and weight gathers."""
        total = 0
        for rep in self.reps:
            per_pass = 0  # tasks of one forward plus one backward through all the rep's chunks
            last = 0  # extra tasks of the last backward's per-layer reductions
            for rc in rep.cost.runs:
                comm = len(rc.profile.fwd_comm) + len(rc.profile.bwd_comm)
                moves = sum(len(m) for r in (rc.relayout_in, rc.relayout_out) for m in (r.forward, r.backward))
                per_pass += 2 + MAX_PHASES * (comm + moves + 3) + 2
                last += rc.count * (4 + 2 * MAX_PHASES)
            total += self.m * (per_pass + 2 * self.v * len(self.stage_reps[rep.stage.index])) + last
            total += len(rep.cost.runs) * MAX_PHASES + 1
        return total + len(self.background)

    def event_bound(self) -> int:
        """The most SimPy events the iteration may take: a fixed number per task (its timer, completion,
        the process it resumes, and re-ratings). More means a runaway, not a big plan."""
        return EVENTS_PER_TASK * self.task_count() + 1000

    def _background(self, rep: Rep, port: str, start: float, nbytes: float):
        yield self.env.timeout(start)
        yield self.net.transfer(nbytes, (rep.ports[port],))

    def run(self) -> DesResult:
        """Simulate the iteration; with `fast`, the steady state of a long pipeline is costed once
        (`simulator.des.steady`) where two shorter runs show it."""
        if self.fast:
            from simulator.des.steady import extrapolated

            result = extrapolated(self)
            if result is not None:
                return result
        return self.run_all()

    def run_all(self) -> DesResult:
        """Simulate every micro-batch as events (refused up front, or stopped, past `event_bound`)."""
        bound = self.event_bound()
        if bound > MAX_EVENTS:
            raise EventBoundExceeded(
                f"the event engine would need up to {bound:,} events for this plan ({self.m:,} micro-batches, "
                f"{self.bound.workload.num_layers:,} layers, {len(self.reps)} representative devices); at most "
                f"{MAX_EVENTS:,} are simulated: use --engine analytic, or fewer micro-batches or layers"
            )
        for rep in self.reps:
            self.env.process(self._stream(rep))
        for rep_index, port, start, nbytes in self.background:
            self.env.process(self._background(self.reps[rep_index], port, start, nbytes))
        events = run_bounded(self.env, bound)
        stuck = [rep.label() for rep in self.reps if not rep.ended]
        if stuck:
            # Nothing left to happen, yet a stream did not end: a job whose end time no float can hold.
            raise EventBoundExceeded(
                f"the event engine cannot finish this iteration: {stuck[0]} waits on a transfer or task that "
                f"would end beyond any representable time (a rate of almost zero?); use --engine analytic"
            )
        iteration = max(rep.finish for rep in self.reps)
        ports = {port.name: port for rep in self.reps for port in rep.ports.values()}
        return DesResult(
            self.bound,
            iteration,
            self.reps,
            self.stage_reps,
            self.trace,
            ports,
            self.num_tasks,
            self.compute_tasks,
            simulated_micro_batches=(self.m,),
            events=events,
        )


def run_bounded(env: simpy.Environment, bound: int) -> int:
    """Run `env` until no event is left; the number of events it took. Past `bound` events time has
    stopped or work keeps multiplying: raise EventBoundExceeded instead of running on."""
    step = env.step
    events = 0
    try:
        while events < bound:
            step()
            events += 1
    except simpy.core.EmptySchedule:
        return events
    raise EventBoundExceeded(
        f"the event engine stopped after {bound:,} events, the bound derived from the plan's task count, at "
        f"simulated time {env.now:.6g} s: the simulation does not converge (a figure too large or too small "
        "to simulate?); use --engine analytic"
    )


def simulate(plan, workload, cluster, record_trace: bool = False) -> DesResult:
    """Simulate one iteration of `plan` (raises InfeasiblePlan like the analytic model)."""
    return Simulation(bind(plan, workload, cluster), record_trace=record_trace).run()
