"""The software stack: what a training framework achieves on the silicon, as the fourth input of a prediction.

A device spec describes the silicon (datasheet peaks and kernel-microbenchmark efficiency curves). A stack
(`specs/stacks/*.yaml`) says how one framework uses it: its GEMM and attention kernels as factors relative to
the device's curves, how much of a collective's time slows the compute beside it, the recompute policies it
offers, and what its allocator holds back. `apply_stack` folds a stack into a device, so the cost model reads
one effective device and needs no second code path.

Factors are relative: 1.0 means "the framework reaches the kernel microbenchmark"; 0.8 means its kernels,
launches and framework glue leave 20% of that on the table. A stack may give factors per device name
(`devices:`), because a framework fitted on A100 runs need not behave the same way on H100.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from hwmodel.cluster import ClusterSpec
from hwmodel.components import ComputeCurve, DeviceSpec, DimensionCurve, Frozen
from hwmodel.curves import EfficiencyCurve
from hwmodel.units import NonNegativeBytes, NonNegativeSeconds

# every-n: a plan's `recompute=every-N`, any N (simulator.plan); op-selective: torchtitan's op-level policy.
RecomputePolicy = Literal["none", "selective", "op-selective", "full", "every-n", "tokenwise"]
CrossEntropy = Literal["pytorch", "vocab_parallel", "fused"]


def _one() -> EfficiencyCurve:
    return EfficiencyCurve.flat(1.0)


class KernelFactors(Frozen):
    """A framework's kernels relative to the device's microbenchmarked curves (1.0: as fast)."""

    matrix_efficiency: ComputeCurve = Field(
        default_factory=_one, description="factor on the device's GEMM curve, keyed by the GEMM's FLOPs"
    )
    matrix_dim_efficiency: DimensionCurve = Field(
        default_factory=_one, description="factor on the device's thin-GEMM curve, keyed by the smallest dimension"
    )
    attention_efficiency: ComputeCurve = Field(
        default_factory=_one, description="factor on the device's fused (FlashAttention-2-class) attention curve"
    )
    triton_attention_efficiency: float | None = Field(
        None,
        gt=0,
        le=1,
        description="the FlashAttention-1-era Triton kernel (plans with attention=flash_triton) as a factor on the "
        "device's attention_efficiency; left out, the device's own triton figure or its attention curve",
    )
    comm_overlap_slowdown: float | None = Field(
        None,
        ge=0,
        le=1,
        description="fraction by which compute slows while this framework's collectives run beside it (streams, "
        "SM share of its NCCL kernels); left out, the device's microbenchmarked figure",
    )


class StackSpec(Frozen):
    """One training framework as run on some hardware (see the module docstring)."""

    name: str
    description: str = ""
    kernels: KernelFactors = Field(default_factory=KernelFactors, description="factors for any device")
    devices: dict[str, KernelFactors] = Field(
        default_factory=dict, description="device name -> factors that replace `kernels` on that device"
    )
    recompute_policies: tuple[RecomputePolicy, ...] = Field(
        ("none", "selective", "full"), description="the activation recompute policies the framework offers"
    )
    cross_entropy: CrossEntropy = Field(
        "pytorch",
        description="the loss kernel, which sets the head's saved tensors and backward workspace: pytorch "
        "(F.cross_entropy on fp32 logits), vocab_parallel (Megatron's, gradient written into the softmax), "
        "fused (flash-attn's cross-entropy kernel: bf16 logits and the log-sum-exp kept)",
    )
    layer_call_overhead: NonNegativeSeconds = Field(
        0.0, description="framework cost per layer per micro-batch on top of the device's, forward and backward"
    )
    allocator_reserved: NonNegativeBytes = Field(
        0.0, description="memory the framework's allocator holds beyond what tensors need (cache, fragmentation)"
    )
    sources: dict[str, str] = Field(default_factory=dict, description="field -> where the figure comes from")

    def factors(self, device_name: str) -> KernelFactors:
        return self.devices.get(device_name, self.kernels)


def multiply(a: EfficiencyCurve, b: EfficiencyCurve) -> EfficiencyCurve:
    """The pointwise product of two curves on the union of their points (exact at every point of either)."""
    sizes = sorted(set(a.sizes) | set(b.sizes))
    return EfficiencyCurve(sizes=tuple(sizes), efficiencies=tuple(min(1.0, a(s) * b(s)) for s in sizes))


def apply_stack(device: DeviceSpec, stack: StackSpec) -> DeviceSpec:
    """The device as `stack` uses it: its kernel curves times the stack's factors."""
    f = stack.factors(device.name)
    c = device.compute
    triton = c.triton_attention_efficiency
    if f.triton_attention_efficiency is not None:
        triton = c.attention_efficiency.scaled(f.triton_attention_efficiency)
    compute = c.model_copy(
        update={
            "matrix_efficiency": multiply(c.matrix_efficiency, f.matrix_efficiency),
            "matrix_dim_efficiency": multiply(c.matrix_dim_efficiency, f.matrix_dim_efficiency),
            "attention_efficiency": multiply(c.attention_efficiency, f.attention_efficiency),
            "triton_attention_efficiency": triton,
            "comm_overlap_slowdown": c.comm_overlap_slowdown
            if f.comm_overlap_slowdown is None
            else f.comm_overlap_slowdown,
            "layer_call_overhead": c.layer_call_overhead + stack.layer_call_overhead,
        }
    )
    memory = device.memory.model_copy(update={"reserved": device.memory.reserved + stack.allocator_reserved})
    return device.model_copy(update={"compute": compute, "memory": memory})


def apply_stack_to_cluster(cluster: ClusterSpec, stack: StackSpec) -> ClusterSpec:
    """Every device of `cluster` as `stack` uses it."""
    devices = {g.node.device.name: g.node.device for g in cluster.node_groups}
    for name, device in devices.items():
        cluster = cluster.with_device(name, apply_stack(device, stack))
    return cluster
