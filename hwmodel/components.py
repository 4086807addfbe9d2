"""Pydantic models of hardware parts: devices, host memory, storage and links.

Every quantity is stored in SI units (FLOP/s, bytes, bytes/s, seconds). YAML gives human units; see
`hwmodel.units`. Figures come with a `sources` map (field -> where the number comes from) so a user can
tell a datasheet value from an estimate or a calibration.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, ValidationInfo, model_validator

from hwmodel.curves import EfficiencyCurve
from hwmodel.fields import Bool, Float, Int, Name, OptionalFloat, Text
from hwmodel.units import Bandwidth, Bytes, FlopRate, NonNegativeBytes, NonNegativeSeconds, format_bytes

# Counts no real machine reaches (the largest hosts have a few hundred cores and a few dozen NICs).
MAX_CORES = 2**16
MAX_PORTS = 1024

DTYPES = ("fp32", "tf32", "fp16", "bf16", "fp8")
Dtype = Literal["fp32", "tf32", "fp16", "bf16", "fp8"]


def _curve_validator(dimension: str) -> BeforeValidator:
    def validate(value: Any, info: ValidationInfo) -> EfficiencyCurve:
        strict = bool(info.context and info.context.get("strict_units"))
        return EfficiencyCurve.parse(value, dimension, strict)

    return BeforeValidator(validate)


def _serialize_curve(curve: EfficiencyCurve) -> Any:
    # A flat curve is written back as the single number a spec file gives for it.
    if len(curve.sizes) == 1:
        return curve.efficiencies[0]
    return [[s, e] for s, e in zip(curve.sizes, curve.efficiencies)]


_CURVE_SERIALIZER = PlainSerializer(_serialize_curve)

# Curves keyed by FLOPs, bytes or a plain count. Spelled out as `Annotated[...]` (not built by a function) so
# that type checkers see them as aliases of EfficiencyCurve.
ComputeCurve = Annotated[EfficiencyCurve, _curve_validator("flops"), _CURVE_SERIALIZER]
TransferCurve = Annotated[EfficiencyCurve, _curve_validator("bytes"), _CURVE_SERIALIZER]
DimensionCurve = Annotated[EfficiencyCurve, _curve_validator("count"), _CURVE_SERIALIZER]


class Frozen(BaseModel):
    """Base for spec models: immutable, unknown keys rejected (a typo is an error, not ignored)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class DtypeEfficiency(Frozen):
    """Efficiencies that differ for one dtype (a CPU whose attention runs as fast in fp32 as in bf16,
    say); what is left out falls back to the shared curves."""

    matrix_efficiency: ComputeCurve | None = None
    matrix_dim_efficiency: DimensionCurve | None = None
    attention_efficiency: ComputeCurve | None = None
    vector_efficiency: OptionalFloat = Field(None, gt=0, le=1)


class ComputeSpec(Frozen):
    """Peak dense FLOP/s per dtype for matrix (tensor-core) and vector units, with efficiency curves.

    `matrix` and `vector` map dtype names (fp32, tf32, fp16, bf16, fp8) to peak FLOP/s. A dtype a unit
    lacks is simply absent: a GPU without bf16 tensor cores has no `bf16` key under `matrix`, and bf16
    matmuls then fall back to the vector peak.
    """

    matrix: dict[Dtype, FlopRate]
    vector: dict[Dtype, FlopRate]
    matrix_efficiency: ComputeCurve = Field(
        default_factory=lambda: EfficiencyCurve.flat(0.7),
        description="fraction of the matrix peak reached by a GEMM, keyed by its FLOPs",
    )
    matrix_dim_efficiency: DimensionCurve = Field(
        default_factory=lambda: EfficiencyCurve.flat(1.0),
        description="further factor keyed by a GEMM's smallest dimension (thin GEMMs reuse data poorly)",
    )
    attention_efficiency: ComputeCurve = Field(
        default_factory=lambda: EfficiencyCurve.flat(0.5),
        description="fraction of the matrix peak reached by fused FlashAttention-2-class attention (plans with "
        "attention=flash: flash-attn 2, PyTorch's flash SDPA backend), keyed by its FLOPs",
    )
    attention_seq_efficiency: DimensionCurve = Field(
        default_factory=lambda: EfficiencyCurve.flat(1.0),
        description="further factor on fused attention keyed by the key/value length one kernel runs over: "
        "flash attention's efficiency keeps rising with that length well past the point its FLOPs "
        "alone say (its inner loop over keys amortizes each query block's start and end)",
    )
    triton_attention_efficiency: ComputeCurve | None = Field(
        None,
        description="fraction of the matrix peak reached by the FlashAttention-1-era Triton kernel (MPT's "
        "attn_impl: triton, as llm-foundry's published benchmarks ran), for plans with "
        "attention=flash_triton; no attention_seq_efficiency factor applies to it. Left out: "
        "attention_efficiency",
    )
    vector_efficiency: Float = Field(0.5, gt=0, le=1, description="fraction of the vector peak reached")
    kernel_overhead: NonNegativeSeconds = Field(5e-6, description="launch and tail cost per kernel")
    comm_overlap_slowdown: Float = Field(
        0.0,
        ge=0,
        le=1,
        description="fraction by which compute slows while a collective runs beside it (shared SMs and memory)",
    )
    per_dtype: dict[Dtype, DtypeEfficiency] = Field(
        default_factory=dict, description="efficiency curves that differ for a dtype (measured by calibration)"
    )
    # What the training framework adds around the kernels of a parallel plan. On GPUs it runs on the host
    # ahead of the device and hides; on a CPU device it runs on the same cores as the kernels, so
    # `execute calibrate` measures it there (executor/calibrate/framework.py).
    sharded_kernel_overhead: NonNegativeSeconds = Field(
        0.0,
        description="extra cost per kernel of a tensor-parallel layer (sharded-tensor dispatch), on top of "
        "kernel_overhead",
    )
    grad_pack_bandwidth: Bandwidth | None = Field(
        None,
        description="data-parallel gradient bytes (and ZeRO-3 gathered weight bytes) per second that the framework "
        "copies into and out of communication buffers on the compute cores; left out, the copies are not costed",
    )
    dp_layer_overhead: NonNegativeSeconds = Field(
        0.0, description="fixed framework cost per layer and gradient reduction (hooks, buffer setup)"
    )
    layer_call_overhead: NonNegativeSeconds = Field(
        0.0,
        description="framework cost per layer per micro-batch, charged once in forward and once in backward (and in a "
        "full recompute's forward), on the compute thread: Python module calls, autograd graph building, "
        "hooks; what makes many small micro-batches slower than their kernels on a CPU",
    )
    blocking_collectives: Bool = Field(
        False,
        description="the framework waits for each data-parallel collective on the compute thread instead of "
        "overlapping it with compute (PyTorch FSDP2 on CPU issues them synchronously)",
    )

    def efficiencies(self, dtype: str) -> tuple[EfficiencyCurve, EfficiencyCurve, EfficiencyCurve, float]:
        """(matrix, matrix_dim, attention, vector) efficiencies for `dtype`."""
        # Any dtype name may be asked for; one without its own curves is simply not in the table.
        own = self.per_dtype.get(dtype)  # type: ignore[call-overload]  # str key into a Literal-keyed dict
        if own is None:
            return self.matrix_efficiency, self.matrix_dim_efficiency, self.attention_efficiency, self.vector_efficiency
        return (
            own.matrix_efficiency or self.matrix_efficiency,
            own.matrix_dim_efficiency or self.matrix_dim_efficiency,
            own.attention_efficiency or self.attention_efficiency,
            own.vector_efficiency or self.vector_efficiency,
        )

    @model_validator(mode="after")
    def _check(self) -> ComputeSpec:
        if not self.matrix and not self.vector:
            raise ValueError("compute needs at least one peak under 'matrix' or 'vector'")
        return self

    def peak(self, dtype: str, unit: Literal["matrix", "vector"] = "matrix") -> float:
        """Peak FLOP/s for `dtype` on `unit`, falling back to the best the device has.

        Matrix work in a dtype without tensor-core support runs on the vector unit; fp16/bf16 without a
        vector figure run at the fp32 vector rate.
        """
        table = self.matrix if unit == "matrix" else self.vector
        if dtype in table:
            return table[dtype]
        if unit == "matrix" and dtype in self.vector:
            return self.vector[dtype]
        for fallback in ("fp32", "tf32", "fp16", "bf16"):
            if fallback in self.vector:
                return self.vector[fallback]
            if fallback in table:
                return table[fallback]
        raise AssertionError("validated ComputeSpec has some peak")


class MemorySpec(Frozen):
    """Device memory: capacity, peak bandwidth and achieved fraction keyed by transfer size."""

    capacity: Bytes
    bandwidth: Bandwidth
    efficiency: TransferCurve = Field(default_factory=lambda: EfficiencyCurve.flat(0.85))
    reserved: NonNegativeBytes = Field(
        0.0, description="memory taken before the job allocates anything (runtime context, workspaces)"
    )

    @model_validator(mode="after")
    def _reserved_below_capacity(self) -> MemorySpec:
        if self.reserved >= self.capacity:
            raise ValueError(
                f"reserved ({format_bytes(self.reserved)}) must be less than capacity ({format_bytes(self.capacity)}): "
                "it is the part of the memory taken before the job allocates anything"
            )
        return self


class DeviceSpec(Frozen):
    """One accelerator (or a CPU acting as one)."""

    name: Name
    description: Text = ""
    vendor: Name = ""
    kind: Literal["gpu", "cpu", "accelerator"] = "gpu"
    compute: ComputeSpec
    memory: MemorySpec
    sources: dict[Name, Text] = Field(default_factory=dict, description="field -> where the figure comes from")


class HostSpec(Frozen):
    """The CPU side of a node: DRAM capacity and bandwidth, cores."""

    memory: Bytes
    memory_bandwidth: Bandwidth
    num_cores: Int = Field(gt=0, le=MAX_CORES)
    sources: dict[Name, Text] = Field(default_factory=dict)


class StorageSpec(Frozen):
    """Local SSD(s) of a node, as one volume (capacity and bandwidths of all its drives together)."""

    capacity: Bytes
    read_bandwidth: Bandwidth
    write_bandwidth: Bandwidth
    latency: NonNegativeSeconds = 80e-6
    # The node's GPUs share these drives (and their PCIe lanes): per-GPU SSD bandwidth is the total / GPUs.
    drives: Int = Field(1, gt=0, le=1024, description="NVMe drives behind the volume, shared by the node's GPUs")
    sources: dict[Name, Text] = Field(default_factory=dict)


class LinkKind(str, Enum):
    NVLINK = "nvlink"
    NVSWITCH = "nvswitch"
    INFINITY_FABRIC = "infinity_fabric"
    PCIE = "pcie"
    SHARED_MEMORY = "shared_memory"
    INFINIBAND = "infiniband"
    ROCE = "roce"
    ETHERNET = "ethernet"
    WAN = "wan"


CollectiveKind = Literal["all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv"]


class CollectiveFit(Frozen):
    """What one collective kind achieves on a link, measured: bandwidth (one port, one direction, as the
    alpha-beta formulas of `simulator.cost.collectives` use it) and latency per step."""

    bandwidth: Bandwidth
    latency: NonNegativeSeconds = 0.0


class LinkSpec(Frozen):
    """A link or a port: bandwidth per direction, one-way latency and the achieved fraction of bandwidth.

    `collectives` optionally gives measured figures per collective kind (a calibration of gloo, say,
    where send/recv runs several times faster than all-gather); they replace bandwidth x efficiency and
    latency for that kind.
    """

    kind: LinkKind
    bandwidth: Bandwidth = Field(description="per direction")
    latency: NonNegativeSeconds = 0.0
    efficiency: Float = Field(0.8, gt=0, le=1)
    ports: Int = Field(1, gt=0, le=MAX_PORTS, description="parallel ports of this kind (e.g. NICs per node)")
    collectives: dict[CollectiveKind, CollectiveFit] = Field(default_factory=dict)
    sources: dict[Name, Text] = Field(default_factory=dict)

    @property
    def effective_bandwidth(self) -> float:
        """Achievable bytes/s through one port, one direction."""
        return self.bandwidth * self.efficiency

    def achieved(self, kind: str) -> tuple[float, float]:
        """(bytes/s through one port, latency) a collective of `kind` achieves on this link."""
        # Any collective name may be asked for; one not measured is simply not in the table.
        fit = self.collectives.get(kind)  # type: ignore[call-overload]  # str key into a Literal-keyed dict
        if fit is not None:
            return fit.bandwidth, fit.latency
        return self.effective_bandwidth, self.latency

    @property
    def peak_bandwidth(self) -> float:
        """The best any transfer achieves through one port (the port's capacity when flows share it)."""
        return max([self.effective_bandwidth] + [fit.bandwidth for fit in self.collectives.values()])

    @property
    def aggregate_bandwidth(self) -> float:
        """Achievable bytes/s through all ports together, one direction."""
        return self.bandwidth * self.efficiency * self.ports
