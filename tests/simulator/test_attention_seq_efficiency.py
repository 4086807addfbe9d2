"""Fused attention's efficiency factor keyed by the keys one kernel call runs over (ComputeSpec.
attention_seq_efficiency): short and long sequences run at what was measured on the H200, a flat curve
changes nothing, and context parallelism keys it by the ring step's chunk. And the attention kernel a plan
names: flash_triton runs at the device's triton_attention_efficiency, without the FlashAttention-2 curve."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hwmodel.catalog import load_device
from hwmodel.curves import EfficiencyCurve
from simulator.cost.compute import op_times, roofline
from workloads.catalog import load_workload
from workloads.ops import ATTENTION, ShardShape
from workloads.transformer import layer_profile

LLAMA = load_workload("tinyllama-1.1b")


def _device(name: str, **compute):
    """A catalog device without its per-kernel launch cost (so op time is FLOPs over rate alone), with
    `compute` fields replaced."""
    device = load_device(name)
    return device.model_copy(update={"compute": device.compute.model_copy(update={"kernel_overhead": 0.0, **compute})})


def _flat(device):
    compute = device.compute.model_copy(update={"attention_seq_efficiency": EfficiencyCurve.flat(1.0)})
    return device.model_copy(update={"compute": compute})


def _attention(seq_len: int, device, cp: int = 1, kernel: str = "flash") -> tuple[float, float]:
    """(forward FLOPs, forward seconds) of the flash attention op of one tinyllama layer, one sequence."""
    shape = ShardShape(
        micro_batch=1, seq_len=seq_len, tp=1, sequence_parallel=False, cp=cp, ep=1, dtype_bytes=2, attention="flash"
    )
    prof = layer_profile(LLAMA.with_seq_len(seq_len), "decoder", shape)
    i = int(np.flatnonzero(prof.unit == ATTENTION)[0])
    seconds = op_times(
        prof.fwd_flops[i : i + 1],
        prof.fwd_bytes[i : i + 1],
        prof.fwd_kernels[i : i + 1],
        prof.unit[i : i + 1],
        prof.min_dim[i : i + 1],
        roofline(device, "bf16", kernel),
    )
    return float(prof.fwd_flops[i]), float(seconds[0])


def _efficiency(seq_len: int, device, kernel: str = "flash") -> float:
    flops, seconds = _attention(seq_len, device, kernel=kernel)
    return flops / (seconds * device.compute.peak("bf16"))


def test_short_and_long_sequences_run_at_the_measured_efficiency():
    h200 = _device("h200")
    # Measured with SDPA's flash backend on the H200: 0.180 at 2K keys, 0.318 at 16K, 0.330 at 64K.
    assert _efficiency(2048, h200) == pytest.approx(0.180, rel=5e-3)
    assert _efficiency(16384, h200) == pytest.approx(0.318, rel=5e-3)
    assert _efficiency(65536, h200) == pytest.approx(0.330, rel=1e-3)
    # Below the curve's first point the factor holds its first value: shorter kernels keep the 2K value too.
    assert _attention(1024, h200)[1] * 0.545 == pytest.approx(_attention(1024, _flat(h200))[1], rel=1e-6)
    # With the factor flat the op is faster by exactly the factor's value at 16K keys.
    assert _attention(16384, h200)[1] * 0.962 == pytest.approx(_attention(16384, _flat(h200))[1], rel=1e-6)


def test_the_triton_kernel_runs_at_its_own_flat_efficiency():
    # llm-foundry's runs (MPT's Triton flash attention) calibrated 0.174 on GH100 at every length.
    h200 = _device("h200")
    for seq in (2048, 16384, 65536):
        assert _efficiency(seq, h200, "flash_triton") == pytest.approx(0.174, rel=1e-3)
    a800 = _device("a800-80g")
    assert _efficiency(65536, a800, "flash_triton") == pytest.approx(0.317, rel=1e-3)
    assert _efficiency(65536, a800) == pytest.approx(0.606, rel=1e-3)  # FlashAttention-2's published A100 figure


def test_a_device_without_a_triton_figure_runs_the_triton_kernel_as_flash():
    v100 = _device("v100-32g")
    assert v100.compute.triton_attention_efficiency is None
    assert _attention(8192, v100, kernel="flash_triton") == _attention(8192, v100)


def test_devices_without_a_curve_are_unchanged():
    a800 = load_device("a800-80g")
    assert a800.compute.attention_seq_efficiency.efficiencies == (1.0,)
    assert _attention(32768, a800)[1] == pytest.approx(_attention(32768, _flat(a800))[1])


def test_context_parallel_keys_the_factor_by_the_ring_chunk():
    h200 = load_device("h200")
    # cp=4 at 64K: each kernel runs over 16K keys, so it is as efficient as a 16K kernel, not a 64K one.
    flops, seconds = _attention(65536, h200, cp=4)
    chunk_flops, chunk_seconds = _attention(16384, h200)
    assert flops / seconds == pytest.approx(chunk_flops / chunk_seconds, rel=0.02)


@settings(max_examples=40, deadline=None)
@given(st.integers(min_value=9, max_value=17))
def test_longer_sequences_never_run_at_lower_efficiency(log2_seq):
    h200 = load_device("h200")
    short, longer = 2**log2_seq, 2 ** (log2_seq + 1)
    f1, t1 = _attention(short, h200)
    f2, t2 = _attention(longer, h200)
    assert f2 / t2 >= f1 / t1 * (1 - 1e-9)
