"""Human units at the edges, SI inside.

YAML and the CLI accept quantities such as "80 GiB", "2039 GB/s", "200 Gbit/s", "312 TFLOPS",
"10 us". Inside the code everything is SI: bytes, bytes/s, FLOP/s, FLOPs, seconds. Parsing is strict:
a quantity of the wrong kind ("80 GB/s" where a size is expected), an unknown unit, or a missing unit
is an error that says what is accepted. Decimal (GB) and binary (GiB) prefixes are different things,
and "b" (bit) is not "B" (byte).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer, ValidationInfo

from hwmodel.errors import UserError

_DECIMAL = {"": 1.0, "K": 1e3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}
_BINARY = {"Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40, "Pi": 2.0**50}


def _table_bytes() -> dict[str, float]:
    table = {f"{p}B": f for p, f in _DECIMAL.items() if p != "k"}
    table.update({f"{p}B": f for p, f in _BINARY.items()})
    table["bytes"] = 1.0
    return table


def _table_byte_rate() -> dict[str, float]:
    table = {f"{unit}/s": f for unit, f in _table_bytes().items() if unit != "bytes"}
    for p, f in _DECIMAL.items():
        if p == "k":
            continue
        # Network rates are quoted in bits; 8 bits per byte.
        table[f"{p}bit/s"] = f / 8
        table[f"{p}b/s"] = f / 8
        table[f"{p}bps"] = f / 8
    return table


def _table_flop_rate() -> dict[str, float]:
    table = {}
    for p, f in _DECIMAL.items():
        if p == "k":
            continue
        table[f"{p}FLOPS"] = f
        table[f"{p}FLOP/s"] = f
    return table


def _table_flops() -> dict[str, float]:
    return {f"{p}FLOP": f for p, f in _DECIMAL.items() if p != "k"} | {
        f"{p}FLOPs": f for p, f in _DECIMAL.items() if p != "k"
    }


_TIME = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0}

# dimension name -> (unit table, example for messages)
DIMENSIONS: dict[str, tuple[dict[str, float], str]] = {
    "bytes": (_table_bytes(), "'80 GiB' or '40 GB'"),
    "bandwidth": (_table_byte_rate(), "'2039 GB/s', '25 GiB/s' or '200 Gbit/s'"),
    "flop_rate": (_table_flop_rate(), "'312 TFLOPS'"),
    "flops": (_table_flops(), "'10 GFLOP'"),
    "time": (_TIME, "'10 us', '40 ms' or '1.5 s'"),
    "count": ({}, "'4096'"),
}

LABELS = {
    "bytes": "size",
    "bandwidth": "bandwidth",
    "flop_rate": "FLOP rate",
    "flops": "FLOP count",
    "time": "time",
    "count": "count",
}

_QUANTITY = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*([^\s\d].*?)?\s*$")


class UnitError(UserError):
    """A quantity that is malformed, has the wrong unit, or has no unit where one is required."""


def _kind_of(unit: str) -> str | None:
    for dim, (table, _) in DIMENSIONS.items():
        if unit in table:
            return dim
    return None


def parse_quantity(value: Any, dimension: str, *, allow_bare_number: bool = True) -> float:
    """Parse `value` as a quantity of `dimension` and return it in SI units.

    Args:
        value: a string such as "80 GiB", or a number already in SI units.
        dimension: one of `DIMENSIONS` ("bytes", "bandwidth", "flop_rate", "flops", "time").
        allow_bare_number: accept a plain number as SI. YAML files are parsed with this off, so
            "capacity: 80" is rejected instead of silently meaning 80 bytes.

    Raises:
        UnitError: naming what was wrong and what is accepted.
    """
    table, example = DIMENSIONS[dimension]
    label = LABELS[dimension]
    if dimension == "count":
        allow_bare_number = True  # counts have no unit
    if isinstance(value, bool):
        raise UnitError(f"expected a {label} such as {example}, got {value!r}")
    if isinstance(value, (int, float)):
        if not allow_bare_number and dimension != "count":
            raise UnitError(f"{value!r} has no unit; write a {label} such as {example}")
        number = float(value)
    elif isinstance(value, str):
        match = _QUANTITY.match(value)
        if not match:
            raise UnitError(f"cannot read {value!r} as a {label}; write one such as {example}")
        number = float(match.group(1))
        unit = (match.group(2) or "").strip()
        if not unit:
            if not allow_bare_number:
                raise UnitError(f"{value!r} has no unit; write a {label} such as {example}")
        elif unit in table:
            number *= table[unit]
        else:
            other = _kind_of(unit)
            if other is not None:
                raise UnitError(f"{value!r} is a {LABELS[other]}, but a {label} is expected here, such as {example}")
            accepted = ", ".join(sorted(table, key=lambda u: (table[u], u)))
            raise UnitError(f"unknown unit {unit!r} in {value!r}; a {label} takes one of: {accepted}")
    else:
        raise UnitError(f"expected a {label} such as {example}, got {type(value).__name__} {value!r}")
    if not math.isfinite(number):
        raise UnitError(f"{value!r} is not a finite {label}")
    return number


def _strict(info: ValidationInfo | None) -> bool:
    return bool(info is not None and info.context and info.context.get("strict_units"))


# The range of each quantity that a real part has, in SI units, so that a slip of the prefix ('1e-30 GB/s',
# '1e9 s' of kernel overhead) is refused before a simulation runs for hours on it. Lower bounds apply to figures
# that must be positive (a bandwidth of 1 KB/s is slower than any WAN; no device is slower than 1 MFLOP/s); upper
# bounds to every figure (no device memory or disk holds an exabyte, no link moves a petabyte a second, no
# latency or per-kernel overhead of a working system reaches 10 s, no one operation a yottaFLOP, no tensor
# dimension 2**40).
PHYSICAL_RANGE: dict[str, tuple[float, float]] = {
    "bytes": (1.0, 2.0**60),
    "bandwidth": (1e3, 1e15),
    "flop_rate": (1e6, 1e19),
    "flops": (1.0, 1e24),
    "time": (1e-12, 10.0),
    "count": (1.0, 2.0**40),
}

_FORMATTERS: dict[str, Callable[[float], str]] = {}


def _shown(number: float, dimension: str) -> str:
    formatter = _FORMATTERS.get(dimension)
    return formatter(number) if formatter else f"{number:g}"


def check_range(value: Any, number: float, dimension: str, positive: bool) -> None:
    """Refuse a quantity outside PHYSICAL_RANGE for its dimension (the lower bound only where it must be positive)."""
    low, high = PHYSICAL_RANGE.get(dimension, (0.0, math.inf))
    if number > high:
        raise UnitError(
            f"{value!r} is beyond what a real part has; accepted: {'' if positive else '0 or '}"
            f"{_shown(low, dimension)} to {_shown(high, dimension)}"
        )
    if positive and number < low:
        raise UnitError(
            f"{value!r} is below what a real part has; accepted: {_shown(low, dimension)} to {_shown(high, dimension)}"
        )


def _make_validator(dimension: str, lower: float | None, inclusive: bool) -> Callable[[Any, ValidationInfo], float]:
    def validate(value: Any, info: ValidationInfo) -> float:
        number = parse_quantity(value, dimension, allow_bare_number=not _strict(info))
        if lower is not None:
            too_small = number < lower if inclusive else number <= lower
            if too_small:
                relation = "at least" if inclusive else "greater than"
                raise UnitError(f"{value!r} must be {relation} {lower:g}")
        check_range(value, number, dimension, positive=not inclusive)
        return number

    return validate


def _quantity_validator(dimension: str, *, positive: bool = True) -> BeforeValidator:
    lower, inclusive = (0.0, False) if positive else (0.0, True)
    return BeforeValidator(_make_validator(dimension, lower, inclusive))


# Quantities are stored as plain floats in SI units and written back as such.
_AS_FLOAT = PlainSerializer(lambda v: v, return_type=float)

# Pydantic field types. Positive* reject zero and negatives; NonNegative* reject negatives only.
# Spelled out as `Annotated[...]` (not built by a function) so that type checkers see them as aliases of float.
Bytes = Annotated[float, _quantity_validator("bytes"), _AS_FLOAT]
NonNegativeBytes = Annotated[float, _quantity_validator("bytes", positive=False), _AS_FLOAT]
Bandwidth = Annotated[float, _quantity_validator("bandwidth"), _AS_FLOAT]
FlopRate = Annotated[float, _quantity_validator("flop_rate"), _AS_FLOAT]
Flops = Annotated[float, _quantity_validator("flops"), _AS_FLOAT]
Seconds = Annotated[float, _quantity_validator("time"), _AS_FLOAT]
NonNegativeSeconds = Annotated[float, _quantity_validator("time", positive=False), _AS_FLOAT]


def _fmt(value: float, steps: list[tuple[float, str]], digits: int = 3) -> str:
    factor, unit = next(((f, u) for f, u in steps if abs(value) >= f), steps[-1])
    scaled = value / factor
    text = f"{scaled:.{digits}g}"
    if "e" in text:  # 1000-1023 of a binary unit (or rounding up to 1000): "1022 GiB", not "1.02e+03 GiB";
        text = f"{scaled:.0f}"  # no digit grouping, so parse_quantity reads it back
    return f"{text} {unit}"


def format_bytes(value: float, binary: bool = True, digits: int = 3) -> str:
    """80 * 2**30 -> '80 GiB'."""
    if binary:
        steps = [(2.0**50, "PiB"), (2.0**40, "TiB"), (2.0**30, "GiB"), (2.0**20, "MiB"), (2.0**10, "KiB"), (1, "B")]
    else:
        steps = [(1e15, "PB"), (1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "KB"), (1, "B")]
    return _fmt(value, steps, digits)


def format_bandwidth(value: float, digits: int = 3) -> str:
    """25e9 -> '25 GB/s'."""
    return _fmt(value, [(1e12, "TB/s"), (1e9, "GB/s"), (1e6, "MB/s"), (1e3, "KB/s"), (1, "B/s")], digits)


def format_flop_rate(value: float, digits: int = 3) -> str:
    """312e12 -> '312 TFLOPS'."""
    return _fmt(value, [(1e15, "PFLOPS"), (1e12, "TFLOPS"), (1e9, "GFLOPS"), (1e6, "MFLOPS"), (1, "FLOPS")], digits)


def format_flops(value: float, digits: int = 3) -> str:
    """1e10 -> '10 GFLOP'."""
    steps = [(1e15, "PFLOP"), (1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP"), (1e3, "KFLOP"), (1, "FLOP")]
    return _fmt(value, steps, digits)


def format_seconds(value: float, digits: int = 3) -> str:
    """0.0123 -> '12.3 ms'."""
    if value == 0:
        return "0 s"
    return _fmt(value, [(1.0, "s"), (1e-3, "ms"), (1e-6, "us"), (1e-9, "ns")], digits)


_FORMATTERS.update(
    bytes=format_bytes, bandwidth=format_bandwidth, flop_rate=format_flop_rate, flops=format_flops, time=format_seconds
)
