"""Operator time on a device: a roofline with size-keyed efficiency plus a per-kernel overhead.

time(op) = max(FLOPs / (peak_unit * eff_unit(FLOPs)), bytes / (mem_bw * eff_mem(bytes))) + kernels * overhead

For matmuls eff_unit(FLOPs) is the size-keyed `matrix_efficiency` times `matrix_dim_efficiency` keyed by
the GEMM's smallest dimension: a (65536 x 768) @ (768 x 2304) GEMM is large but thin and reaches less of
the peak than a square one of the same FLOPs.

`unit` is the matrix (tensor-core) peak for matmuls, the matrix peak with the attention curve for fused
attention, and the vector peak for elementwise work. Evaluated for all operators of a layer at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from hwmodel.components import DeviceSpec
from hwmodel.curves import EfficiencyCurve
from workloads.ops import ATTENTION, MATRIX, LayerProfile

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


@dataclass(frozen=True, eq=False)
class Roofline:
    """A device's compute and memory figures for one dtype, ready for vectorized lookups."""

    device: DeviceSpec
    dtype: str
    peaks: np.ndarray  # FLOP/s by unit: matrix, attention (matrix peak), vector (times its efficiency)
    memory_bandwidth: float
    kernel_overhead: float
    overlap_slowdown: float
    matrix_efficiency: EfficiencyCurve
    matrix_dim_efficiency: EfficiencyCurve
    attention_efficiency: EfficiencyCurve
    attention_seq_efficiency: EfficiencyCurve


_ROOFLINES: dict[tuple[int, str, str], Roofline] = {}


def roofline(device: DeviceSpec, dtype: str, attention: str = "flash") -> Roofline:
    """The (cached) roofline of `device` for plan dtype `dtype` and the plan's attention kernel."""
    key = (id(device), dtype, attention)
    cached = _ROOFLINES.get(key)
    if cached is not None and cached.device is device:
        return cached
    compute = device.compute
    matrix = compute.peak(dtype, "matrix")
    vector = compute.peak(dtype, "vector")
    matrix_eff, dim_eff, attention_eff, vector_eff = compute.efficiencies(dtype)
    seq_eff = compute.attention_seq_efficiency
    if attention == "flash_triton" and compute.triton_attention_efficiency is not None:
        # A different kernel: its own efficiency; the key-length curve was measured for FlashAttention-2.
        attention_eff, seq_eff = compute.triton_attention_efficiency, EfficiencyCurve.flat(1.0)
    line = Roofline(
        device=device,
        dtype=dtype,
        peaks=np.array([matrix, matrix, vector * vector_eff]),
        memory_bandwidth=device.memory.bandwidth,
        kernel_overhead=compute.kernel_overhead,
        overlap_slowdown=compute.comm_overlap_slowdown,
        matrix_efficiency=matrix_eff,
        matrix_dim_efficiency=dim_eff,
        attention_efficiency=attention_eff,
        attention_seq_efficiency=seq_eff,
    )
    if len(_ROOFLINES) > 512:  # calibration builds many devices; keep the cache bounded
        _ROOFLINES.clear()
    _ROOFLINES[key] = line
    return line


def op_times(
    flops: np.ndarray, nbytes: np.ndarray, kernels: np.ndarray, unit: np.ndarray, min_dim: np.ndarray, line: Roofline
) -> np.ndarray:
    """Seconds per operator."""
    eff = np.ones_like(flops)
    is_matrix = unit == MATRIX
    is_attention = unit == ATTENTION
    if is_matrix.any():
        eff[is_matrix] = line.matrix_efficiency.many(flops[is_matrix]) * line.matrix_dim_efficiency.many(
            min_dim[is_matrix]
        )
    if is_attention.any():
        # Attention ops carry the key/value length of one kernel call in `min_dim` (0: unknown, no factor).
        seq = min_dim[is_attention]
        seq_eff = np.where(seq > 0, line.attention_seq_efficiency.many(np.maximum(seq, 1.0)), 1.0)
        eff[is_attention] = line.attention_efficiency.many(flops[is_attention]) * seq_eff
    t_compute = flops / (line.peaks[unit] * eff)
    mem_eff = line.device.memory.efficiency.many(nbytes)
    t_memory = nbytes / (line.memory_bandwidth * mem_eff)
    seconds: np.ndarray = np.maximum(t_compute, t_memory) + kernels * line.kernel_overhead  # numpy types it Any
    return seconds


@dataclass(frozen=True)
class LayerTimes:
    """Seconds for one layer, one micro-batch, on one device."""

    forward: float
    backward: float
    recompute_selective: float  # forward time of the attention core
    recompute_full: float  # forward time of the whole layer
    recompute_op_selective: float  # forward time op-selective recompute re-runs (workloads.ops.OP_SELECTIVE)


@lru_cache(maxsize=16384)
def layer_times(profile: LayerProfile, line: Roofline) -> LayerTimes:
    fwd = op_times(profile.fwd_flops, profile.fwd_bytes, profile.fwd_kernels, profile.unit, profile.min_dim, line)
    bwd = op_times(profile.bwd_flops, profile.bwd_bytes, profile.bwd_kernels, profile.unit, profile.min_dim, line)
    forward = float(fwd.sum())
    return LayerTimes(
        forward=forward,
        backward=float(bwd.sum()),
        recompute_selective=float(fwd[profile.selective].sum()),
        recompute_full=forward,
        recompute_op_selective=float((fwd * profile.op_selective).sum()),
    )


def optimizer_time(num_params: float, bytes_per_param: float, line: Roofline) -> float:
    """An optimizer step streams its states through memory: memory-bound."""
    nbytes = num_params * bytes_per_param
    if nbytes <= 0:
        return 0.0
    eff = line.device.memory.efficiency(nbytes)
    return nbytes / (line.memory_bandwidth * eff) + line.kernel_overhead
