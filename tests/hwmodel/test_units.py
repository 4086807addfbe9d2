"""Units at the edges (hwmodel.units) and size-keyed efficiency curves (hwmodel.curves)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hwmodel.curves import EfficiencyCurve
from hwmodel.units import (
    UnitError,
    format_bandwidth,
    format_bytes,
    format_flop_rate,
    format_seconds,
    parse_quantity,
)

# Pure functions of microseconds an example; deadline=None because the first calls fill caches (curve
# lookups) and a loaded CI machine pauses: a deadline would time the machine, not the code.
SETTINGS = settings(max_examples=60, deadline=None)


# ---- parse_quantity: every dimension, decimal vs binary, bits vs bytes ------------------------------


@pytest.mark.parametrize(
    "text, dimension, expected",
    [
        # sizes: decimal and binary prefixes are different numbers
        ("80 GiB", "bytes", 80 * 2**30),
        ("80 GB", "bytes", 80e9),
        ("1 KiB", "bytes", 1024),
        ("1 KB", "bytes", 1000),
        ("512 MiB", "bytes", 512 * 2**20),
        ("30.72 TB", "bytes", 30.72e12),
        ("1 TiB", "bytes", 2**40),
        ("4096 bytes", "bytes", 4096),
        ("7 B", "bytes", 7),
        ("80GiB", "bytes", 80 * 2**30),  # no space
        ("  1.5e3 MB ", "bytes", 1.5e9),  # exponent and padding
        # rates: bytes per second and bits per second
        ("2039 GB/s", "bandwidth", 2039e9),
        ("25 GiB/s", "bandwidth", 25 * 2**30),
        ("200 Gbit/s", "bandwidth", 25e9),
        ("200 Gb/s", "bandwidth", 25e9),
        ("200 Gbps", "bandwidth", 25e9),
        ("100 Mbit/s", "bandwidth", 12.5e6),
        ("100 Mbps", "bandwidth", 12.5e6),
        ("1.6 Tbit/s", "bandwidth", 200e9),
        ("300 GB/s", "bandwidth", 300e9),
        # compute rates and amounts
        ("312 TFLOPS", "flop_rate", 312e12),
        ("312 TFLOP/s", "flop_rate", 312e12),
        ("1.979 PFLOPS", "flop_rate", 1.979e15),
        ("19.5 TFLOPS", "flop_rate", 19.5e12),
        ("10 GFLOP", "flops", 10e9),
        ("10 GFLOPs", "flops", 10e9),
        ("1 TFLOP", "flops", 1e12),
        # times
        ("10 us", "time", 10e-6),
        ("10 µs", "time", 10e-6),
        ("40 ms", "time", 40e-3),
        ("1.5 s", "time", 1.5),
        ("20 ns", "time", 20e-9),
        ("2 min", "time", 120.0),
        ("1 h", "time", 3600.0),
        # counts have no unit
        ("4096", "count", 4096),
    ],
)
def test_parse_quantity_values(text, dimension, expected):
    assert parse_quantity(text, dimension) == pytest.approx(expected, rel=1e-12)


def test_decimal_and_binary_prefixes_differ():
    assert parse_quantity("80 GiB", "bytes") - parse_quantity("80 GB", "bytes") == pytest.approx(80 * 2**30 - 80e9)
    assert parse_quantity("80 GiB", "bytes") > parse_quantity("80 GB", "bytes")


def test_bits_are_an_eighth_of_bytes():
    assert parse_quantity("200 GB/s", "bandwidth") == 8 * parse_quantity("200 Gbit/s", "bandwidth")


def test_numbers_are_taken_as_si_when_allowed():
    assert parse_quantity(5, "bytes") == 5.0
    assert parse_quantity(2.5e-6, "time") == 2.5e-6
    assert parse_quantity("1024", "bytes") == 1024.0
    assert parse_quantity(7, "count", allow_bare_number=False) == 7.0  # counts never need a unit


@pytest.mark.parametrize(
    "value, dimension",
    [
        ("80 GB/s", "bytes"),  # a rate where a size is expected
        ("80 GiB", "bandwidth"),
        ("312 TFLOPS", "flops"),
        ("10 GFLOP", "flop_rate"),
        ("10 ms", "bytes"),
        ("80 GiB", "time"),
        ("200 Gbit/s", "flop_rate"),
    ],
)
def test_wrong_dimension_is_refused(value, dimension):
    with pytest.raises(UnitError, match="expected") as info:
        parse_quantity(value, dimension)
    assert repr(value) in str(info.value)
    assert "unknown unit" not in str(info.value)  # recognised as another kind, not as garbage


@pytest.mark.parametrize(
    "value, dimension",
    [("80 XB", "bytes"), ("80 gib", "bytes"), ("10 sec", "time"), ("200 Gbits", "bandwidth"), ("3 furlongs", "time")],
)
def test_unknown_unit(value, dimension):
    with pytest.raises(UnitError, match="unknown unit"):
        parse_quantity(value, dimension)


def test_unknown_unit_lists_accepted_units():
    with pytest.raises(UnitError) as info:
        parse_quantity("80 XB", "bytes")
    assert "GiB" in str(info.value) and "GB" in str(info.value)


@pytest.mark.parametrize("value", ["80", 80, 80.0, " 12 "])
def test_missing_unit_rejected_when_bare_numbers_are_off(value):
    with pytest.raises(UnitError, match="no unit"):
        parse_quantity(value, "bytes", allow_bare_number=False)


@pytest.mark.parametrize(
    "value, dimension",
    [
        (float("inf"), "bytes"),
        (float("-inf"), "time"),
        (float("nan"), "bandwidth"),
        ("1e400 GB", "bytes"),
        ("1e999 s", "time"),
    ],
)
def test_non_finite_rejected(value, dimension):
    with pytest.raises(UnitError, match="finite"):
        parse_quantity(value, dimension)


@pytest.mark.parametrize(
    "value, dimension",
    [
        ("inf GB", "bytes"),
        ("nan s", "time"),
        ("GB", "bytes"),
        ("", "bytes"),
        ("1.2.3 GB", "bytes"),
        ("- 5 GB", "bytes"),
    ],
)
def test_unreadable_text_rejected(value, dimension):
    with pytest.raises(UnitError):
        parse_quantity(value, dimension)


@pytest.mark.parametrize("value", [True, False])
@pytest.mark.parametrize("dimension", ["bytes", "bandwidth", "time", "count"])
def test_booleans_rejected(value, dimension):
    with pytest.raises(UnitError):
        parse_quantity(value, dimension)


@pytest.mark.parametrize("value", [None, [80, "GB"], {"GB": 80}])
def test_other_types_rejected(value):
    with pytest.raises(UnitError):
        parse_quantity(value, "bytes")


def test_unit_error_is_a_value_error():
    assert issubclass(UnitError, ValueError)


# ---- formatting round-trips ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected_text, dimension, value",
    [
        (format_bytes(80 * 2**30), "80 GiB", "bytes", 80 * 2**30),
        (format_bytes(40e9, binary=False), "40 GB", "bytes", 40e9),
        (format_bytes(1536), "1.5 KiB", "bytes", 1536),
        (format_bandwidth(25e9), "25 GB/s", "bandwidth", 25e9),
        (format_flop_rate(312e12), "312 TFLOPS", "flop_rate", 312e12),
        (format_seconds(0.0123), "12.3 ms", "time", 0.0123),
        (format_seconds(2e-5), "20 us", "time", 2e-5),
    ],
)
def test_format_examples(text, expected_text, dimension, value):
    assert text == expected_text
    assert parse_quantity(text, dimension) == pytest.approx(value, rel=1e-12)


def test_format_seconds_zero():
    assert parse_quantity(format_seconds(0.0), "time") == 0.0


_MAGNITUDE = st.floats(min_value=1e-3, max_value=1e18, allow_nan=False, allow_infinity=False)


@SETTINGS
@given(value=_MAGNITUDE, binary=st.booleans())
def test_format_bytes_round_trip(value, binary):
    # 3 significant digits lose at most half a unit in the last place: 0.5 %.
    assert parse_quantity(format_bytes(value, binary=binary), "bytes") == pytest.approx(value, rel=0.005)


@SETTINGS
@given(value=_MAGNITUDE)
def test_format_bandwidth_round_trip(value):
    assert parse_quantity(format_bandwidth(value), "bandwidth") == pytest.approx(value, rel=0.005)


@SETTINGS
@given(value=_MAGNITUDE)
def test_format_flop_rate_round_trip(value):
    assert parse_quantity(format_flop_rate(value), "flop_rate") == pytest.approx(value, rel=0.005)


@SETTINGS
@given(value=st.floats(min_value=1e-12, max_value=1e6, allow_nan=False, allow_infinity=False))
def test_format_seconds_round_trip(value):
    assert parse_quantity(format_seconds(value), "time") == pytest.approx(value, rel=0.005)


# ---- efficiency curves -----------------------------------------------------------------------------


@st.composite
def curves(draw, min_points=2, max_points=6):
    """A curve with strictly increasing sizes and non-decreasing efficiencies in (0, 1]."""
    n = draw(st.integers(min_points, max_points))
    exponents = draw(st.lists(st.integers(0, 40), min_size=n, max_size=n, unique=True).map(sorted))
    sizes = tuple(float(2**e) for e in exponents)
    effs = sorted(draw(st.lists(st.floats(0.01, 1.0), min_size=n, max_size=n)))
    return EfficiencyCurve(sizes=sizes, efficiencies=tuple(effs))


_SIZE = st.floats(min_value=0.0, max_value=2.0**45, allow_nan=False)


@SETTINGS
@given(curve=curves(), a=_SIZE, b=_SIZE)
def test_curve_monotone_between_increasing_points(curve, a, b):
    lo, hi = sorted((a, b))
    assert curve(lo) <= curve(hi)
    assert curve.efficiencies[0] <= curve(lo) <= curve.efficiencies[-1]


@SETTINGS
@given(curve=curves())
def test_curve_clamps_beyond_ends(curve):
    assert curve(curve.sizes[0] / 2) == pytest.approx(curve.efficiencies[0])
    assert curve(0.0) == pytest.approx(curve.efficiencies[0])
    assert curve(curve.sizes[-1] * 1e6) == pytest.approx(curve.efficiencies[-1])
    for size, eff in zip(curve.sizes, curve.efficiencies):
        assert curve(size) == pytest.approx(eff)  # passes through its points


@SETTINGS
@given(curve=curves(min_points=1), sizes=st.lists(_SIZE, min_size=1, max_size=20))
def test_curve_many_agrees_with_call(curve, sizes):
    batch = curve.many(np.asarray(sizes))
    assert batch.shape == (len(sizes),)
    for size, eff in zip(sizes, batch):
        assert eff == pytest.approx(curve(size), rel=1e-12)


def test_curve_interpolates_in_log_size():
    curve = EfficiencyCurve.parse([["1 GFLOP", 0.4], ["1 TFLOP", 0.8]], "flops", strict=True)
    assert curve.sizes == (1e9, 1e12)
    # The geometric mean of the two sizes sits halfway in log(size).
    assert curve(math.sqrt(1e9 * 1e12)) == pytest.approx(0.6)
    assert curve(1e10) == pytest.approx(0.4 + 0.4 / 3)


def test_flat_curve_is_constant():
    curve = EfficiencyCurve.parse(0.7, "flops", strict=True)
    assert curve(1.0) == curve(1e15) == 0.7
    assert list(curve.many(np.array([0.0, 1e3, 1e20]))) == [0.7, 0.7, 0.7]


def test_curve_scaled_caps_at_one():
    curve = EfficiencyCurve(sizes=(1.0, 1e6), efficiencies=(0.5, 0.9))
    assert curve.scaled(1.5).efficiencies == pytest.approx((0.75, 1.0))


@pytest.mark.parametrize(
    "sizes, effs",
    [
        ((1e6, 1e3), (0.5, 0.6)),  # decreasing sizes
        ((1e3, 1e3), (0.5, 0.6)),  # repeated size
        ((1e3, 1e6, 1e4), (0.5, 0.6, 0.7)),  # unsorted
        ((0.0, 1e3), (0.5, 0.6)),  # non-positive size
        ((1e3,), (0.0,)),  # efficiency 0
        ((1e3,), (1.01,)),  # above 1
        ((1e3, 1e6), (-0.5, 0.6)),
        ((), ()),  # no point
        ((1e3, 1e6), (0.5,)),  # mismatched lengths
    ],
)
def test_curve_rejects_bad_points(sizes, effs):
    with pytest.raises(ValueError):
        EfficiencyCurve(sizes=sizes, efficiencies=effs)


def test_curve_accepts_efficiency_one():
    assert EfficiencyCurve(sizes=(1.0,), efficiencies=(1.0,))(123.0) == 1.0


@pytest.mark.parametrize("value", [[["1 GFLOP", True]], [["1 GFLOP"]], "0.5", [["1 GFLOP", "0.5"]]])
def test_curve_parse_rejects_malformed_yaml(value):
    with pytest.raises(ValueError):
        EfficiencyCurve.parse(value, "flops", strict=True)


def test_curve_parse_strict_needs_units():
    with pytest.raises(UnitError):
        EfficiencyCurve.parse([[1e9, 0.4], [1e12, 0.8]], "flops", strict=True)
    assert EfficiencyCurve.parse([[1e9, 0.4], [1e12, 0.8]], "flops", strict=False).sizes == (1e9, 1e12)


@pytest.mark.parametrize(
    "value, expected", [(1022 * 2**30, "1022 GiB"), (999.7 * 2**30, "1000 GiB"), (80 * 2**30, "80 GiB")]
)
def test_format_bytes_never_prints_scientific_notation(value, expected):
    # 1000-1023 GiB is below one TiB: three significant digits would print "1.02e+03 GiB".
    assert format_bytes(value) == expected
