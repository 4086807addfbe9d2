"""Efficiency curves keyed by operation size.

A GEMM of a few MFLOP reaches a small fraction of a GPU's peak; one of a few TFLOP reaches most of it.
The same holds for memory copies and transfer size. A curve is a list of (size, efficiency) points,
interpolated linearly in log(size) and held constant beyond its ends (as Calculon's size-keyed tables).
"""

from __future__ import annotations

import bisect
import math
from functools import cached_property
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, PrivateAttr, model_validator

from hwmodel.units import check_range, parse_quantity


class EfficiencyCurve(BaseModel):
    """Achieved fraction of peak as a function of operation size.

    In YAML: a list of ``[size, efficiency]`` pairs, sizes with units (``["1 GFLOP", 0.4]`` for compute,
    ``["1 MiB", 0.5]`` for memory), or a single number for a flat curve.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    sizes: tuple[float, ...]
    efficiencies: tuple[float, ...]
    _log_sizes: np.ndarray = PrivateAttr()
    _effs: np.ndarray = PrivateAttr()

    @model_validator(mode="after")
    def _check(self) -> EfficiencyCurve:
        if len(self.sizes) != len(self.efficiencies) or not self.sizes:
            raise ValueError("an efficiency curve needs at least one [size, efficiency] point")
        if any(s <= 0 for s in self.sizes):
            raise ValueError("efficiency curve sizes must be positive")
        if any(b <= a for a, b in zip(self.sizes, self.sizes[1:])):
            raise ValueError("efficiency curve sizes must be strictly increasing")
        if any(not (0.0 < e <= 1.0) for e in self.efficiencies):
            raise ValueError("efficiencies must lie in (0, 1]")
        self._log_sizes = np.log(np.asarray(self.sizes, dtype=float))
        self._effs = np.asarray(self.efficiencies, dtype=float)
        return self

    def __eq__(self, other: object) -> bool:
        # The numpy arrays kept for lookups would make the default comparison ambiguous.
        if not isinstance(other, EfficiencyCurve):
            return NotImplemented
        return self.sizes == other.sizes and self.efficiencies == other.efficiencies

    def __hash__(self) -> int:
        return hash((self.sizes, self.efficiencies))

    @cached_property
    def log_size_list(self) -> list[float]:
        """log(size) of each point (a plain list: scalar lookups avoid numpy's call overhead)."""
        return [math.log(size) for size in self.sizes]

    @classmethod
    def flat(cls, efficiency: float) -> EfficiencyCurve:
        return cls(sizes=(1.0,), efficiencies=(efficiency,))

    @classmethod
    def parse(cls, value: Any, dimension: str, strict: bool) -> EfficiencyCurve:
        """Build a curve from YAML: a number, or a list of [size, efficiency] pairs."""
        if isinstance(value, EfficiencyCurve):
            return value
        if isinstance(value, dict) and set(value) == {"sizes", "efficiencies"}:
            return cls(sizes=tuple(value["sizes"]), efficiencies=tuple(value["efficiencies"]))
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return cls.flat(float(value))
        if not isinstance(value, (list, tuple)):
            raise ValueError(
                "an efficiency curve is a number in (0, 1] or a list of [size, efficiency] pairs, "
                f"e.g. [['1 GFLOP', 0.4], ['1 TFLOP', 0.8]]; got {value!r}"
            )
        sizes, effs = [], []
        for point in value:
            if not isinstance(point, (list, tuple)) or len(point) != 2:
                raise ValueError(f"each curve point is a [size, efficiency] pair; got {point!r}")
            size = parse_quantity(point[0], dimension, allow_bare_number=not strict)
            check_range(point[0], size, dimension, positive=True)
            sizes.append(size)
            eff = point[1]
            if isinstance(eff, bool) or not isinstance(eff, (int, float)):
                raise ValueError(f"efficiency must be a number in (0, 1]; got {eff!r}")
            effs.append(float(eff))
        return cls(sizes=tuple(sizes), efficiencies=tuple(effs))

    def __call__(self, size: float) -> float:
        """Efficiency for one operation of `size` (FLOPs or bytes); pure Python, for scalar hot paths."""
        effs = self.efficiencies
        if len(effs) == 1:
            return effs[0]
        x = math.log(max(size, 1.0))
        logs = self.log_size_list
        if x <= logs[0]:
            return effs[0]
        if x >= logs[-1]:
            return effs[-1]
        i = bisect.bisect_right(logs, x)
        frac = (x - logs[i - 1]) / (logs[i] - logs[i - 1])
        return effs[i - 1] + frac * (effs[i] - effs[i - 1])

    def many(self, sizes: np.ndarray) -> np.ndarray:
        """Vectorized efficiency for an array of sizes (zeros get the smallest point's efficiency)."""
        if len(self.sizes) == 1:
            return np.full(np.shape(sizes), self._effs[0])
        safe = np.log(np.maximum(sizes, 1.0))
        efficiencies: np.ndarray = np.interp(safe, self._log_sizes, self._effs)  # an array for an array of sizes
        return efficiencies

    def scaled(self, factor: float) -> EfficiencyCurve:
        """The same curve with every efficiency multiplied by `factor` (capped at 1)."""
        return EfficiencyCurve(sizes=self.sizes, efficiencies=tuple(min(1.0, e * factor) for e in self.efficiencies))
