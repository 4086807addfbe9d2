"""The plan contract: one frozen model read by the simulator and the executor alike.

A plan says how a workload is laid onto a cluster: parallel degrees (`tp`, `pp`, `dp`, `cp`, `ep`), how
data-parallel replicas hold model states (`dp_type`: ddp, zero1, zero2, zero3), recompute, the batch
(`micro_batch` sequences per data-parallel replica per micro-step, `global_batch` sequences per
iteration), the pipeline schedule and numerics. Optional sections, designed now and filled by later
planners: per-layer strategies, explicit pipeline stages with their own device groups and uneven layer
splits, activation offload fractions, model-state placement over GPU/CPU/SSD pages, task graphs and
federated parties.

Plans load from YAML/JSON or from a one-line shorthand:
``tp=8,pp=8,dp=1,micro_batch=1,global_batch=64,schedule=interleaved,virtual_stages=3,recompute=full``.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from hwmodel.errors import SpecError
from hwmodel.fields import Bool, Float, Int, Name, OptionalBool, OptionalFloat, OptionalInt, Text
from hwmodel.loading import parse_mapping, read_mapping, validate
from hwmodel.units import Bytes
from workloads.config import MAX_LAYERS

# Bounds no real run reaches, so that a typo (global_batch: 1e15) is refused up front instead of simulated for
# hours: the largest clusters have about 100,000 devices, the largest global batches a few thousand sequences,
# and gradient accumulation runs to some hundreds of micro-steps.
MAX_DEGREE = 2**20
MAX_DEVICES = 2**20
MAX_GLOBAL_BATCH = 2**24
MAX_MICRO_STEPS = 2**16
MAX_VIRTUAL_STAGES = 1024
MAX_SECTIONS = 10_000
MAX_BYTES = 2**62

DpType = Literal["ddp", "zero1", "zero2", "zero3"]
# Recompute policies (workloads.ops says what each keeps for backward):
# selective: Megatron-LM's, the attention core re-run (Korthikanti et al. 2022).
# op-selective: torchtitan's op-level selective checkpointing: the outputs of every other matmul (the 1st, 3rd,
#   ... of a block) and of the fused attention kernel are saved, everything else in the block re-runs.
# full: the whole block re-runs from its input.
# every-N: full recompute of every N-th block of each model chunk (a pipeline stage, or each of its virtual
#   stages under interleaving: its N-th, 2N-th, ... block), the others none
#   (torchtitan's layer-selective `selective_ac_option: N`; Megatron-LM's `--recompute-method block`).
# tokenwise: MEMO, the `offload` share of tokens swapped to host, the rest recomputed token-wise (workloads.activations)
RECOMPUTE_NAMES = ("none", "selective", "op-selective", "full", "tokenwise")
EVERY_N_PATTERN = r"^every-[1-9][0-9]{0,5}$"


def _recompute_value(value: str) -> str:
    if value in RECOMPUTE_NAMES or re.match(EVERY_N_PATTERN, value):
        return value
    raise ValueError(f"expected one of {', '.join(RECOMPUTE_NAMES)} or every-N (N a whole number >= 1), got {value!r}")


Recompute = Annotated[str, AfterValidator(_recompute_value)]
Schedule = Literal["gpipe", "1f1b", "interleaved"]
PlanDtype = Literal["fp32", "fp16", "bf16"]
# flash: a FlashAttention-2-class fused kernel (flash-attn 2 or PyTorch's flash SDPA backend; what the executor
# runs). flash_triton: the FlashAttention-1-era Triton kernel (MPT's `attn_impl: triton`, which llm-foundry's
# published benchmarks ran): the same operators and memory, the device's `triton_attention_efficiency`;
# simulator only (for published runs of that stack). naive: the score matrix materialized.
Attention = Literal["flash", "flash_triton", "naive"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LayerStrategy(_Frozen):
    """Overrides for a range of transformer blocks, ``layers: [first, last]`` (inclusive, 0-based)."""

    layers: tuple[Int, Int]
    tp: OptionalInt = Field(None, gt=0, le=MAX_DEGREE)
    dp_type: DpType | None = None
    sequence_parallel: OptionalBool = None
    recompute: Recompute | None = None
    offload: OptionalFloat = Field(None, ge=0.0, le=1.0, description="fraction of saved activations swapped to host")

    @model_validator(mode="after")
    def _order(self) -> LayerStrategy:
        if self.layers[0] < 0 or self.layers[1] < self.layers[0] or self.layers[1] >= MAX_LAYERS:
            raise ValueError(
                f"layers must be [first, last] with 0 <= first <= last < {MAX_LAYERS}, got {list(self.layers)}"
            )
        return self


class StageSpec(_Frozen):
    """One pipeline stage: how many transformer blocks it holds and which devices run it.

    `devices` is a rank range ("0-15"), a list of ranks, or a node group name ("a100"); left out, stages
    take the next devices in rank order. The embedding goes with the first stage, the output layer with
    the last.
    """

    num_layers: Int = Field(gt=0, le=MAX_LAYERS)
    devices: Name | tuple[Annotated[Int, Field(ge=0, lt=MAX_DEVICES)], ...] | None = Field(None, max_length=MAX_DEVICES)
    tp: OptionalInt = Field(None, gt=0, le=MAX_DEGREE, description="default: the plan's tp")


class TierShares(_Frozen):
    """Fractions of one class of model states on GPU, host memory and SSD; they sum to 1."""

    gpu: Float = Field(1.0, ge=0, le=1)
    cpu: Float = Field(0.0, ge=0, le=1)
    ssd: Float = Field(0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _sum(self) -> TierShares:
        if abs(self.gpu + self.cpu + self.ssd - 1.0) > 1e-6:
            raise ValueError(f"gpu + cpu + ssd fractions must sum to 1, got {self.gpu + self.cpu + self.ssd:g}")
        return self


class ModelStatePlacement(_Frozen):
    """Where model states live (Angel-PTM style pages).

    `gpu`/`cpu`/`ssd` are the default shares of every state class; `parameters`, `gradients`,
    `master_weights` and `moments` override them per class. `optimizer` says where the step runs:
    on the GPU, on the CPU from host memory, or on the CPU streaming its states from SSD. `staleness` 1 is
    Angel-PTM's lock-free update (step t's update overlaps step t+1, which reads parameters one step old).
    """

    page_size: Bytes = 64 * 2**20
    gpu: Float = Field(1.0, ge=0, le=1)
    cpu: Float = Field(0.0, ge=0, le=1)
    ssd: Float = Field(0.0, ge=0, le=1)
    parameters: TierShares | None = None
    gradients: TierShares | None = None
    master_weights: TierShares | None = None
    moments: TierShares | None = None
    optimizer: Literal["gpu", "cpu-host", "cpu-ssd"] = "gpu"
    staleness: Literal[0, 1] = 0
    prefetch_depth: Int = Field(2, ge=0, le=1024, description="blocks whose pages are fetched ahead of use")

    @model_validator(mode="after")
    def _sum(self) -> ModelStatePlacement:
        if abs(self.gpu + self.cpu + self.ssd - 1.0) > 1e-6:
            raise ValueError(f"gpu + cpu + ssd fractions must sum to 1, got {self.gpu + self.cpu + self.ssd:g}")
        if self.staleness == 1 and self.optimizer == "gpu":
            raise ValueError("staleness=1 (lock-free update) needs the optimizer on the CPU (cpu-host or cpu-ssd)")
        return self

    def shares(self, state: Literal["parameters", "gradients", "master_weights", "moments"]) -> TierShares:
        """The tier shares of one state class (its override, else the default shares)."""
        own: TierShares | None = getattr(self, state)
        return own if own is not None else TierShares(gpu=self.gpu, cpu=self.cpu, ssd=self.ssd)


class TaskSpec(_Frozen):
    """A task of a multi-task multi-modal job: the sub-graph (modules) it runs and its batch."""

    name: Name
    modules: tuple[Name, ...] = Field(max_length=MAX_SECTIONS)
    batch: Int = Field(gt=0, le=MAX_GLOBAL_BATCH)


class FederatedSpec(_Frozen):
    """Vertical federated training: parties (by site) and CELU-VFL's workset size W and local updates R."""

    parties: tuple[Name, ...] = Field(min_length=2, max_length=MAX_SECTIONS)
    workset: Int = Field(1, gt=0, le=MAX_GLOBAL_BATCH)
    local_updates: Int = Field(1, gt=0, le=MAX_MICRO_STEPS)
    # vanilla: one update per batch; fedbcd: R updates on the latest batch, in turn with the WAN; celu: the
    # workset, its R uses per batch overlapped with the WAN (R counts the fresh update: W=1, R=1 is vanilla)
    mode: Literal["vanilla", "fedbcd", "celu"] = "celu"


class MemoryPlanSpec(_Frozen):
    """A static activation memory plan (MEMO's MIP): the planned peak and where the offsets are kept."""

    peak_bytes: Int = Field(ge=0, le=MAX_BYTES, description="planned peak of the activation arena per device, in bytes")
    greedy_peak_bytes: OptionalInt = Field(
        None, ge=0, le=MAX_BYTES, description="best-fit peak for the same tensors, in bytes"
    )
    offsets: Text | None = Field(None, description="file holding tensor -> offset (written by `simulate search memo`)")


class Plan(_Frozen):
    """How a workload runs on a cluster. Frozen: planners create new plans, never edit one."""

    tp: Int = Field(1, gt=0, le=MAX_DEGREE, description="tensor-parallel degree")
    pp: Int = Field(1, gt=0, le=MAX_DEGREE, description="pipeline-parallel degree (stages)")
    dp: OptionalInt = Field(
        None, gt=0, le=MAX_DEGREE, description="data-parallel degree; left out, it fills the cluster"
    )
    cp: Int = Field(1, gt=0, le=MAX_DEGREE, description="context-parallel degree (sequence split across devices)")
    ep: Int = Field(1, gt=0, le=MAX_DEGREE, description="expert-parallel degree for MoE (a divisor of dp)")
    dp_type: DpType = "ddp"
    sequence_parallel: Bool = False
    recompute: Recompute = "none"
    micro_batch: Int = Field(
        1, gt=0, le=MAX_GLOBAL_BATCH, description="sequences per data-parallel replica per micro-step"
    )
    batch_split: tuple[Int, ...] | None = Field(
        None,
        max_length=MAX_DEGREE,
        description="sequences each data-parallel replica takes per micro-step, in replica order, when replicas "
        "differ in speed (sums to micro_batch * dp); left out, micro_batch each. Shorthand: 3+1",
    )
    global_batch: OptionalInt = Field(
        None, gt=0, le=MAX_GLOBAL_BATCH, description="sequences per iteration; default micro_batch*dp"
    )
    schedule: Schedule = "1f1b"
    virtual_stages: Int = Field(
        1, gt=0, le=MAX_VIRTUAL_STAGES, description="model chunks per device (interleaved schedule)"
    )
    dtype: PlanDtype = "bf16"
    grad_reduce_dtype: PlanDtype | None = Field(
        None, description="dtype of gradient reduction; default fp32 for bf16 and fp32 runs, fp16 for fp16"
    )
    attention: Attention = "flash"
    optimizer: Literal["adam", "sgd"] = "adam"
    offload: Float = Field(0.0, ge=0.0, le=1.0, description="fraction of saved activations swapped to host")
    layers: tuple[LayerStrategy, ...] = Field((), max_length=MAX_SECTIONS)
    stages: tuple[StageSpec, ...] = Field((), max_length=MAX_SECTIONS)
    model_states: ModelStatePlacement | None = None
    tasks: tuple[TaskSpec, ...] = Field((), max_length=MAX_SECTIONS)
    federated: FederatedSpec | None = None
    memory_plan: MemoryPlanSpec | None = None
    stack: str | None = Field(
        None, description="software stack (`simulate specs list`) or a stack YAML; left out, the default stack"
    )

    @model_validator(mode="after")
    def _self_consistent(self) -> Plan:
        if self.schedule == "interleaved" and self.virtual_stages < 2:
            raise ValueError("schedule=interleaved needs virtual_stages >= 2")
        if self.schedule != "interleaved" and self.virtual_stages > 1:
            raise ValueError(f"virtual_stages={self.virtual_stages} needs schedule=interleaved (got {self.schedule})")
        if self.dp is not None and self.global_batch is not None:
            steps = -(-self.global_batch // (self.micro_batch * self.dp))
            if steps > MAX_MICRO_STEPS:
                raise ValueError(
                    f"global_batch={self.global_batch} with micro_batch={self.micro_batch} and dp={self.dp} is "
                    f"{steps} micro-steps per iteration; accepted: at most {MAX_MICRO_STEPS} (raise micro_batch or dp)"
                )
        if self.stages and len(self.stages) != self.pp:
            raise ValueError(f"stages lists {len(self.stages)} stages but pp={self.pp}")
        if self.batch_split is not None:
            if any(n < 1 for n in self.batch_split):
                raise ValueError(
                    f"batch_split {'+'.join(map(str, self.batch_split))}: every replica takes at least 1 sequence"
                )
            if self.dp is not None and len(self.batch_split) != self.dp:
                raise ValueError(f"batch_split lists {len(self.batch_split)} replicas but dp={self.dp}")
            if self.dp is not None and sum(self.batch_split) != self.micro_batch * self.dp:
                raise ValueError(
                    f"batch_split {'+'.join(map(str, self.batch_split))} sums to {sum(self.batch_split)}, "
                    f"not micro_batch * dp = {self.micro_batch * self.dp}"
                )
        return self

    def shorthand(self, sections: bool = False) -> str:
        """The one-line form of the uniform keys; with `sections`, followed by the per-layer strategies and the
        explicit stages ("...; layers 0-31: tp=1,dp_type=zero2; stages 16+16 on 0-7/8-15"), which override the
        uniform keys where they are set (other sections are left out)."""
        data = self.model_dump(
            exclude_defaults=True, exclude={"layers", "stages", "model_states", "tasks", "federated", "memory_plan"}
        )
        if "batch_split" in data:
            data["batch_split"] = "+".join(str(n) for n in data["batch_split"])
        text = ",".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in data.items()) or "tp=1"
        if not sections:
            return text
        for strategy in self.layers:
            fields = strategy.model_dump(exclude_none=True, exclude={"layers"})
            if fields.get("sequence_parallel") is False and not self.sequence_parallel:
                del fields["sequence_parallel"]
            body = ",".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in fields.items())
            text += f"; layers {strategy.layers[0]}-{strategy.layers[1]}: {body or 'as above'}"
        if self.stages:
            text += "; stages " + "+".join(str(s.num_layers) for s in self.stages)
            if any(s.devices is not None for s in self.stages):
                text += " on " + "/".join(str(s.devices) if s.devices is not None else "next" for s in self.stages)
            if any(s.tp is not None and s.tp != self.tp for s in self.stages):
                text += " tp " + "/".join(str(s.tp or self.tp) for s in self.stages)
        return text


ALIASES = {
    "sp": "sequence_parallel",
    "mb": "micro_batch",
    "micro_batch_size": "micro_batch",
    "gb": "global_batch",
    "global_batch_size": "global_batch",
    "vpp": "virtual_stages",
    "zero": "dp_type",
    "ckpt": "recompute",
}
SHORTHAND_KEYS = (
    "tp",
    "pp",
    "dp",
    "cp",
    "ep",
    "dp_type",
    "sequence_parallel",
    "recompute",
    "micro_batch",
    "global_batch",
    "schedule",
    "virtual_stages",
    "dtype",
    "grad_reduce_dtype",
    "attention",
    "optimizer",
    "offload",
    "batch_split",
    "stack",
)


def _scalar(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    try:
        return int(low)
    except ValueError:
        pass
    try:
        return float(low)
    except ValueError:
        return text.strip()


def parse_shorthand(text: str) -> Plan:
    """``"tp=8,pp=2,micro_batch=1"`` -> Plan. Unknown keys suggest the nearest accepted key."""
    data: dict[str, Any] = {}
    for part in (p for p in text.replace(" ", ",").split(",") if p.strip()):
        if "=" not in part:
            raise SpecError(f"--plan: {part!r} is not key=value; e.g. 'tp=8,pp=2,micro_batch=1'")
        key, value = (s.strip() for s in part.split("=", 1))
        key = ALIASES.get(key, key)
        if key not in SHORTHAND_KEYS:
            close = difflib.get_close_matches(key, SHORTHAND_KEYS, n=2, cutoff=0.5)
            hint = f" Did you mean {' or '.join(close)}?" if close else ""
            raise SpecError(f"--plan: unknown key {key!r}.{hint} Accepted keys: {', '.join(SHORTHAND_KEYS)}")
        if key in data:
            raise SpecError(f"--plan: key {key!r} is given twice")
        if key == "batch_split":
            counts = value.split("+")
            if not all(c.strip().isdigit() for c in counts):
                raise SpecError(
                    f"--plan: batch_split={value!r}: give each replica's sequences per micro-step "
                    "joined by '+', e.g. batch_split=3+1"
                )
            data[key] = tuple(int(c) for c in counts)
            continue
        data[key] = _scalar(value)
    return validate(Plan, data, "--plan")


def _is_file(text: str) -> bool:
    """`text` names an existing file; False for what cannot be a path (a NUL byte, a name too long)."""
    try:
        return Path(text).exists()
    except (OSError, ValueError):
        return False


def load_plan(value: str | Path) -> Plan:
    """A plan from a YAML/JSON file path or from the shorthand."""
    text = str(value)
    if text.endswith((".yaml", ".yml", ".json")) or (_is_file(text) and "=" not in text):
        path = Path(text)
        data = read_mapping(path)
        if isinstance(data.get("plan"), dict) and ("engine" in data or set(data) <= {"plan", "report", "name"}):
            data = data["plan"]  # a Report (or a planner's result) written with --out: take its plan
        return validate(Plan, data, str(path), {"strict_units": True})
    if "=" in text:
        return parse_shorthand(text)
    if text.strip().startswith("{"):
        return validate(Plan, parse_mapping(text, "--plan"), "--plan")
    raise SpecError(
        f"--plan: {text!r} is neither a plan file (.yaml/.json) nor key=value shorthand such as "
        "'tp=8,pp=2,micro_batch=1,global_batch=64'"
    )


def every_n(recompute: str) -> int | None:
    """N of an `every-N` recompute policy; None for any other policy."""
    return int(recompute[len("every-") :]) if re.match(EVERY_N_PATTERN, recompute) else None


def recompute_policy(recompute: str) -> str:
    """The policy a stack lists for a plan's recompute value: `every-n` stands for every `every-N`."""
    return "every-n" if every_n(recompute) is not None else recompute
