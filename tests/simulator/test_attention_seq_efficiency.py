"""Fused attention's efficiency factor keyed by the keys one kernel call runs over (ComputeSpec.
attention_seq_efficiency), and the attention kernel a plan names.

The rules, checked on a device whose curves the tests set themselves (so that each expected number is
computed by hand below, not read back from specs/): the op runs at attention_efficiency times the key-length
factor, interpolated in log(keys) and held beyond the curve's ends; a flat factor scales the op's time by
exactly its inverse; context parallelism keys the factor by the ring step's chunk; flash_triton runs at
triton_attention_efficiency without the key-length factor, and as flash on a device without that figure.
On every catalog device: never above the peak, never slower per FLOP with longer sequences, and
flash_triton untouched by the key-length factor.
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest

from hwmodel.catalog import device_names, load_device
from hwmodel.curves import EfficiencyCurve
from simulator.cost.compute import op_times, roofline
from workloads.catalog import load_workload
from workloads.ops import ATTENTION, ShardShape
from workloads.transformer import layer_profile

LLAMA = load_workload("tinyllama-1.1b")

# The test's own figures. The key-length factor rises from 0.5 at 2K keys to 1.0 at 32K keys, linearly in
# log2(keys): factor(k) = 0.5 + 0.5 * (log2(k) - 11) / (15 - 11) for 2K <= k <= 32K, 0.5 below, 1.0 above.
BASE = 0.4  # attention_efficiency (flat in FLOPs)
SEQ_CURVE = EfficiencyCurve(sizes=(2048.0, 32768.0), efficiencies=(0.5, 1.0))
TRITON = 0.2


def _device(name: str = "h200", **compute):
    """A catalog device without its per-kernel launch cost (so op time is FLOPs over rate alone), with
    `compute` fields replaced."""
    device = load_device(name)
    update = {"kernel_overhead": 0.0, **compute}
    return device.model_copy(update={"compute": device.compute.model_copy(update=update)})


def _toy(**compute):
    """The peak and memory of an H200 with the test's own attention figures."""
    figures = dict(
        attention_efficiency=EfficiencyCurve.flat(BASE),
        attention_seq_efficiency=SEQ_CURVE,
        triton_attention_efficiency=EfficiencyCurve.flat(TRITON),
        per_dtype={},
    )
    return _device("h200", **{**figures, **compute})


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


def _efficiency(seq_len: int, device, cp: int = 1, kernel: str = "flash") -> float:
    """Achieved fraction of the device's bf16 matrix peak."""
    flops, seconds = _attention(seq_len, device, cp=cp, kernel=kernel)
    return flops / (seconds * device.compute.peak("bf16"))


@pytest.mark.parametrize(
    "keys, factor",
    [
        (1024, 0.5),  # below the first point: held at 0.5
        (2048, 0.5),  # the first point
        (4096, 0.625),  # log2 = 12: 0.5 + 0.5 * 1/4
        (8192, 0.75),  # log2 = 13: 0.5 + 0.5 * 2/4 (halfway in log(keys))
        (16384, 0.875),  # log2 = 14: 0.5 + 0.5 * 3/4
        (32768, 1.0),  # the last point
        (131072, 1.0),  # beyond it: held at 1.0
    ],
)
def test_attention_runs_at_its_efficiency_times_the_key_length_factor(keys, factor):
    assert _efficiency(keys, _toy()) == pytest.approx(BASE * factor, rel=1e-9)


@pytest.mark.parametrize("keys", [1024, 8192, 65536])
def test_a_flat_factor_scales_attention_time_by_its_inverse(keys):
    one = _toy(attention_seq_efficiency=EfficiencyCurve.flat(1.0))
    half = _toy(attention_seq_efficiency=EfficiencyCurve.flat(0.5))
    flops, t_one = _attention(keys, one)
    assert _attention(keys, half) == pytest.approx((flops, 2 * t_one), rel=1e-12)
    assert _efficiency(keys, one) == pytest.approx(BASE, rel=1e-9)  # a factor of 1 changes nothing


def test_context_parallel_keys_the_factor_by_the_ring_chunk():
    # cp=4 at 64K: each kernel call runs over 64K / 4 = 16K keys, so the factor is 0.875 (as at 16K), not the
    # 1.0 a 64K kernel would get.
    toy = _toy()
    assert _efficiency(65536, toy, cp=4) == pytest.approx(BASE * 0.875, rel=1e-9)
    assert _efficiency(65536, toy, cp=4) == pytest.approx(_efficiency(16384, toy), rel=1e-9)
    assert _efficiency(65536, toy) == pytest.approx(BASE * 1.0, rel=1e-9)


@pytest.mark.parametrize("keys", [1024, 8192, 65536])
def test_the_triton_kernel_runs_at_its_own_efficiency_without_the_key_length_factor(keys):
    assert _efficiency(keys, _toy(), kernel="flash_triton") == pytest.approx(TRITON, rel=1e-9)


def test_a_device_without_a_triton_figure_runs_the_triton_kernel_as_flash():
    toy = _toy(triton_attention_efficiency=None)
    for keys in (1024, 8192, 65536):
        assert _attention(keys, toy, kernel="flash_triton") == _attention(keys, toy)


# ---- the catalog: relations every device must keep, whatever its figures ------------------------------------

SEQ_LENS = [2**k for k in range(9, 19)]  # 512 ... 256K keys


@pytest.mark.parametrize("name", device_names())
@pytest.mark.parametrize("kernel", ["flash", "flash_triton"])
def test_attention_never_exceeds_the_peak_and_never_slows_per_flop_with_longer_sequences(name, kernel):
    device = _device(name)
    efficiencies = [_efficiency(seq, device, kernel=kernel) for seq in SEQ_LENS]
    assert all(0 < e <= 1 for e in efficiencies), efficiencies
    for shorter, longer in pairwise(efficiencies):
        assert longer >= shorter * (1 - 1e-9), efficiencies


@pytest.mark.parametrize("name", device_names())
def test_the_triton_kernel_ignores_the_key_length_factor_on_every_device(name):
    device = _device(name)
    without = _device(name, attention_seq_efficiency=EfficiencyCurve.flat(1.0))
    triton = [_attention(seq, device, kernel="flash_triton") for seq in SEQ_LENS]
    if device.compute.triton_attention_efficiency is None:
        assert triton == [_attention(seq, device) for seq in SEQ_LENS]  # runs as flash, factor and all
    else:
        assert triton == [_attention(seq, without, kernel="flash_triton") for seq in SEQ_LENS]
