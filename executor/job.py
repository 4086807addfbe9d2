"""A job: what `execute` runs, as plain data every rank receives, and what a run gives back.

A `Job` names the workload, the cluster (reloaded by each rank from the catalog or the file), the plan
and the run's options; `Job.bind()` gives every rank the same bound layout. A `RunResult` is what rank
0 gathers from all ranks after the last step.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import asdict, dataclass, field
from functools import cached_property

from hwmodel.catalog import load_cluster
from hwmodel.cluster import ClusterSpec
from simulator.binding import BoundPlan, bind
from simulator.plan import Plan
from workloads.config import WorkloadConfig

# Fault injection for tests and drills (documented in `execute --help`): at the start of step
# HETPLAN_FAIL_AT_STEP, rank HETPLAN_FAIL_RANK (default 0) is killed with SIGKILL
# (HETPLAN_FAIL_MODE=kill, the default) or raises an exception (HETPLAN_FAIL_MODE=raise), or sets its first
# parameter to NaN (HETPLAN_FAIL_MODE=nan: the drill of the non-finite stop).
FAIL_AT_STEP_ENV = "HETPLAN_FAIL_AT_STEP"
FAIL_RANK_ENV = "HETPLAN_FAIL_RANK"
FAIL_MODE_ENV = "HETPLAN_FAIL_MODE"


def wall_clock(seconds: float) -> str:
    """`time.time()` as failure reports print it: "2026-01-31 14:05:09.123 UTC" (milliseconds, so the
    moment a rank died and the moment the launcher stopped the run can be compared)."""
    stamp = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return stamp.strftime("%Y-%m-%d %H:%M:%S.") + f"{stamp.microsecond // 1000:03d} UTC"


@dataclass(frozen=True)
class Job:
    """Everything a rank needs to run its part of a plan (picklable: sent to spawned processes)."""

    workload: WorkloadConfig
    cluster_ref: str
    nodes: int | None
    devices_per_node: int | None
    plan: Plan
    steps: int
    warmup: int = 1
    seed: int = 0
    device_type: str = "cpu"  # "cpu" (gloo) or "cuda" (nccl)
    checkpoint_dir: str | None = None
    checkpoint_every: int | None = None
    resume: bool = False
    trace: str | None = None
    keep_last: int | None = None  # checkpoint retention: keep the newest N steps (None: all)
    skip_nonfinite: bool = False  # skip (and count) an iteration whose loss or gradient norm is not finite

    @cached_property
    def cluster(self) -> ClusterSpec:
        return load_cluster(self.cluster_ref, self.nodes, self.devices_per_node)

    @cached_property
    def bound(self) -> BoundPlan:
        return bind(self.plan, self.workload, self.cluster)

    @property
    def world_size(self) -> int:
        return len(self.bound.ranks)

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps

    def fingerprint(self) -> dict:
        """What must match for a checkpoint of this job to be resumed (JSON-serializable)."""
        return {
            "workload": self.workload.model_dump(mode="json"),
            "plan": self.bound.plan.model_dump(mode="json"),
            "world_size": self.world_size,
            "seed": self.seed,
        }

    def __getstate__(self) -> dict:
        # Cached cluster/bound objects are rebuilt by each rank rather than pickled.
        return {k: v for k, v in self.__dict__.items() if k not in ("cluster", "bound")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


@dataclass
class RunResult:
    """What a run measured, gathered on rank 0.

    Attributes:
        first_step: index of the first iteration this run executed (> 0 after --resume).
        losses: global mean training loss of each executed iteration.
        step_times_s: wall time of each executed iteration, the slowest rank's.
        cpu_times_s: process CPU time of each executed iteration on rank 0.
        timed: indices (into the lists above) of the iterations the median is taken over.
        memory: per rank: weights, gradients, optimizer, activations, buffers and peak bytes.
        device_name: what ran it ("cpu" or the CUDA device name).
        warnings: what the user should know about this measurement.
    """

    first_step: int
    losses: list[float]
    step_times_s: list[float]
    cpu_times_s: list[float]
    timed: list[int]
    memory: list[dict[str, float]]
    device_name: str
    warnings: list[str] = field(default_factory=list)
    skipped_steps: list[int] = field(default_factory=list)  # iterations skipped as non-finite (--skip-nonfinite)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_dict(cls, data: dict) -> RunResult:
        return cls(**data)
