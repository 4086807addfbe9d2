"""The Report: one schema for predicted and measured runs, so the two compare field by field.

Times are seconds, memory bytes, throughput per second. `time_breakdown_s` decomposes the iteration
time along the critical path (its parts sum to `iteration_time_s`); `memory_bytes` is the breakdown of
the device with the largest peak. MFU and HFU are defined in `simulator.metrics`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from simulator.plan import Plan


class MemoryBreakdown(BaseModel):
    model_config = ConfigDict(frozen=True)

    weights: float = 0.0
    gradients: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    buffers: float = 0.0

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.buffers


class TimeBreakdown(BaseModel):
    model_config = ConfigDict(frozen=True)

    compute: float = 0.0
    recompute: float = 0.0
    exposed_communication: float = 0.0
    pipeline_bubble: float = 0.0
    offload_stall: float = 0.0
    optimizer: float = 0.0

    @property
    def total(self) -> float:
        return (
            self.compute
            + self.recompute
            + self.exposed_communication
            + self.pipeline_bubble
            + self.offload_stall
            + self.optimizer
        )


class StageReport(BaseModel):
    """One pipeline stage (one device group), as seen by its slowest device type."""

    model_config = ConfigDict(frozen=True)

    index: int
    first_layer: int
    last_layer: int
    num_devices: int
    device: str
    tp: int
    cp: int
    dp: int
    forward_s: float = Field(description="per micro-batch, including exposed tp/cp communication")
    backward_s: float = Field(description="per micro-batch, including recompute and exposed communication")
    peak_memory_bytes: float
    memory_bytes: MemoryBreakdown


# Who produced a Report: one of the simulator's engines, or a run on the hardware.
EngineName = Literal["analytic", "des", "measured"]


class Report(BaseModel):
    """What a plan does: predicted (engine 'analytic' or 'des') or measured (engine 'measured')."""

    model_config = ConfigDict(frozen=True)

    engine: EngineName
    workload: str
    cluster: str
    stack: str = Field("llm-foundry", description="the software stack the prediction assumed (specs/stacks/)")
    plan: Plan
    num_devices: int
    global_batch: int
    num_micro_batches: int
    seq_len: int
    iteration_time_s: float
    tokens_per_s: float
    samples_per_s: float
    mfu: float
    hfu: float
    mfu_causal_in_full: float | None = Field(
        None,
        description="MFU with causal score matrices counted in full, as Megatron-LM's, PaLM's and llm-foundry's "
        "formulas count them (simulator.metrics); for comparing with figures published that way",
    )
    model_flops_per_iteration: float
    hardware_flops_per_iteration: float
    peak_memory_bytes: float = Field(description="the largest over devices")
    peak_memory_device: int = Field(description="rank of a device with that peak")
    memory_capacity_bytes: float = Field(description="capacity of that device")
    fits_memory: bool = Field(description="every device's peak is within its capacity")
    memory_bytes: MemoryBreakdown
    time_breakdown_s: TimeBreakdown
    stages: list[StageReport] = Field(default_factory=list)
    link_utilization: dict[str, float] = Field(
        default_factory=dict, description="des: busy share of each port with traffic (bytes moved / capacity / time)"
    )
    peak_memory_time_s: float | None = Field(None, description="des: when the peak happens, from iteration start")
    host_memory_bytes: float | None = Field(
        None,
        description="host DRAM of the most loaded node filled with swapped activations (offload); None: not computed",
    )
    warnings: list[str] = Field(default_factory=list)
