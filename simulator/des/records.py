"""What the event engine records: the representative devices it simulates (`Rep`), the trace events, and
the result of a simulation (`DesResult`). Apart from the engine so that what reads results (the steady-state
shortcut, the report, the trace and plot writers) needs not import the engine."""

from __future__ import annotations

from dataclasses import dataclass, field

import simpy

from hwmodel.cluster import Tier
from simulator.binding import BoundPlan, BoundStage
from simulator.cost.stage import StageCost
from simulator.des.fluid import Port

# The port of each tier on a representative device: "intra.tx", "nic.rx", ...
TIER_PORT = {Tier.NODE: "intra", Tier.SITE: "nic", Tier.WAN: "wan"}


@dataclass
class TraceEvent:
    name: str
    category: str  # forward, backward, recompute, comm, optimizer, p2p, reduce, offload
    track: str  # "compute" or a port name
    rep: int
    start: float
    end: float
    args: dict = field(default_factory=dict)


@dataclass(eq=False)
class Rep:
    """A representative device of one stage and one device type."""

    index: int
    stage: BoundStage
    rank: int
    cost: StageCost
    num_ranks: int  # ranks of the stage it stands for
    grad_stream: simpy.Resource  # gradient reductions queue on one communicator stream
    ports: dict[str, Port] = field(default_factory=dict)
    memory_base: float = 0.0
    memory_now: float = 0.0
    memory_peak: float = 0.0
    memory_peak_time: float = 0.0
    memory_events: list[tuple[float, float]] = field(default_factory=list)
    busy: dict[str, float] = field(default_factory=dict)
    finish: float = 0.0
    op_ends: list[float] = field(default_factory=list)  # when each forward or backward operation ended
    ended: bool = False  # its stream ran to the end of the iteration

    def label(self) -> str:
        return f"stage {self.stage.index} {self.cost.device.name} (x{self.num_ranks})"

    def port(self, tier: Tier, direction: str) -> Port:
        return self.ports[f"{TIER_PORT[tier]}.{direction}"]


@dataclass
class DesResult:
    bound: BoundPlan
    iteration_time: float
    reps: list[Rep]
    stage_reps: list[list[Rep]]
    trace: list[TraceEvent]
    ports: dict[str, Port]
    num_tasks: int
    compute_tasks: list[tuple[int, str, float, float]]  # of the longer run when extrapolated
    # Micro-batches whose operations ran as events: all of them, or, when the steady state was costed once
    # (`simulator.des.steady`), those of the shorter runs the result was extrapolated from.
    simulated_micro_batches: tuple[int, ...] = ()
    events: int = 0  # SimPy events processed
