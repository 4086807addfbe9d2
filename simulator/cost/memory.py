"""Memory per device: model states by ZeRO stage and precision, activations by schedule.

Model states follow the ZeRO paper (Rajbhandari et al. 2020): mixed-precision Adam keeps 2 bytes of
fp16/bf16 weights, 2 bytes of gradients and 12 bytes of optimizer state (fp32 master weights, momentum,
variance) per parameter: 16 bytes before sharding. ZeRO-1 shards the optimizer state over the
data-parallel group, ZeRO-2 also the gradients, ZeRO-3 also the weights. Pure fp32 training keeps 4 + 4
+ 8 bytes (no master copy).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StateBytes:
    """Bytes per parameter of each model state."""

    weights: float
    gradients: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer


def state_bytes(dtype: str, optimizer: str) -> StateBytes:
    """Bytes per parameter for a plan's dtype and optimizer, before any sharding."""
    mixed = dtype in ("fp16", "bf16")
    if optimizer == "adam":
        return StateBytes(2, 2, 12) if mixed else StateBytes(4, 4, 8)
    # SGD with momentum: mixed precision keeps an fp32 master copy and the momentum.
    return StateBytes(2, 2, 8) if mixed else StateBytes(4, 4, 4)


# Bytes an optimizer step streams through device memory per local parameter (reads + writes).
OPTIMIZER_TRAFFIC = {("adam", True): 36.0, ("adam", False): 28.0, ("sgd", True): 20.0, ("sgd", False): 16.0}


@dataclass(frozen=True)
class ModelStateMemory:
    weights: float
    gradients: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer


def model_state_memory(num_params: float, dtype: str, optimizer: str, dp_type: str, dp: int) -> ModelStateMemory:
    """Bytes of weights, gradients and optimizer state one device holds for `num_params` parameters.

    Args:
        num_params: parameters this device holds before data-parallel sharding (after tp/pp splits).
        dp_type: ddp, zero1 (optimizer sharded), zero2 (+ gradients), zero3 (+ weights).
        dp: data-parallel degree the states are sharded over.
    """
    per = state_bytes(dtype, optimizer)
    shard_opt = dp if dp_type in ("zero1", "zero2", "zero3") else 1
    shard_grad = dp if dp_type in ("zero2", "zero3") else 1
    shard_weights = dp if dp_type == "zero3" else 1
    return ModelStateMemory(
        weights=num_params * per.weights / shard_weights,
        gradients=num_params * per.gradients / shard_grad,
        optimizer=num_params * per.optimizer / shard_opt,
    )


def micro_batches_in_flight(
    schedule: str, stage: int, num_stages: int, num_micro_batches: int, virtual_stages: int
) -> float:
    """How many micro-batches' worth of a stage's activations are alive at its peak.

    GPipe keeps all forward passes before any backward. 1F1B keeps at most (p - stage) on stage `stage`.
    Megatron's interleaved schedule warms up (p - stage - 1) * 2 + (v - 1) * p + 1 model chunks, each
    holding 1/v of the stage's layers.
    """
    m, p, v = num_micro_batches, num_stages, virtual_stages
    if schedule == "gpipe":
        return float(m)
    if schedule == "1f1b":
        return float(min(m, p - stage))
    warmup_chunks = min(m * v, (p - stage - 1) * 2 + (v - 1) * p + 1)
    return warmup_chunks / v
