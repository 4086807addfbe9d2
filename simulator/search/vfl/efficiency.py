"""Statistical efficiency: how much AUC a round buys in each mode, and so the time to a target AUC.

Vanilla VFL's test AUC after `n` rounds (fresh updates, one mini-batch each) follows a saturating power law,

    AUC(n) = A_inf - (A_inf - A_0) * (1 + n / n_0) ** -p,

fitted to the executor's vanilla runs. Counted in rounds rather than epochs, so that a fit from a run on
fewer samples carries over to the full data set (the same distribution, the same batch). A local update
(FedBCD's or CELU-VFL's, on cached statistics) is worth a fraction of a fresh one:

    value = rho * exp(-staleness / tau) * kappa ** repeat

- rho: a local update at the smallest staleness relative to a fresh update (the other party's half of the
  model does not move with it);
- tau: the staleness (the party's own updates since the cached statistics were computed) over which the cached
  statistics go bad; CELU-VFL's instance weighting (cosine similarity of stale and fresh statistics, zeroed
  below a threshold) is what keeps tau long, so the ablation without weighting has its own, shorter tau;
- kappa: the penalty for using one batch several times in a row (repeat = how many of the party's updates just
  before this one used the same batch), which FedBCD pays on every local step and CELU-VFL's uniform sampling
  over the workset avoids while the workset holds other batches.

The timeline (`engine.py`) gives each party's local updates in order, with their staleness and repeat, and
how many had begun by the end of each round. A mode's progress after n rounds, in fresh-round equivalents,
is `n + mean over the two parties of the summed values of the local updates begun by then`, and its AUC is
the vanilla curve's at that progress; beyond the simulated rounds progress grows by the steady stretch's
worth per round (`1 +` the local updates' value per round). Counting update by update matters when a target
is reached while the worksets are still filling. Parameters are fitted from the
executor's runs (`benchmarks/vfl_fit.py`) and stored with the workload under `simulator/search/vfl/data/`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from hwmodel.errors import UserError
from simulator.fitting import nelder_mead
from simulator.search.vfl.engine import Timeline

DATA_DIR = Path(str(resources.files("simulator"))) / "search" / "vfl" / "data"


class AucCurve(BaseModel):
    """Vanilla VFL's test AUC against rounds of fresh updates."""

    model_config = ConfigDict(frozen=True)

    auc_start: float = Field(ge=0, le=1, description="A_0, the AUC before training")
    auc_limit: float = Field(gt=0, le=1, description="A_inf, what training converges to")
    scale_rounds: float = Field(gt=0, description="n_0")
    power: float = Field(gt=0, description="p")

    def auc(self, rounds: float | np.ndarray) -> float | np.ndarray:
        return self.auc_limit - (self.auc_limit - self.auc_start) * (1.0 + np.asarray(rounds) / self.scale_rounds) ** (
            -self.power
        )

    def rounds_to(self, target: float) -> float:
        """Rounds of fresh updates until the AUC reaches `target` (inf when it never does)."""
        if target <= self.auc_start:
            return 0.0
        if target >= self.auc_limit:
            return math.inf
        ratio = (self.auc_limit - self.auc_start) / (self.auc_limit - target)
        return self.scale_rounds * (ratio ** (1.0 / self.power) - 1.0)


class LocalValue(BaseModel):
    """What one local update is worth relative to a fresh one (see the module docstring)."""

    model_config = ConfigDict(frozen=True)

    rho: float = Field(ge=0, le=1.5)
    tau: float = Field(gt=0, description="staleness scale, in the party's updates")
    kappa: float = Field(ge=0, le=1, description="factor per preceding update on the same batch")

    def values(self, staleness: Sequence[int], repeat: Sequence[int]) -> np.ndarray:
        s = np.asarray(staleness, dtype=float)
        r = np.asarray(repeat, dtype=float)
        return self.rho * np.exp(-s / self.tau) * self.kappa**r


class EfficiencyModel(BaseModel):
    """The fitted statistical-efficiency model of one workload, with where its numbers come from."""

    model_config = ConfigDict(frozen=True)

    workload: str
    curve: AucCurve
    local: LocalValue = Field(description="local updates with CELU-VFL's instance weighting (and FedBCD's)")
    local_unweighted: LocalValue | None = Field(None, description="CELU-VFL without instance weighting")
    reference_rounds: float = Field(gt=0, description="rounds of the fitted vanilla run (default target: its AUC)")
    fitted: bool = Field(description="false: prior values, not fitted to any run of this machine")
    provenance: dict[str, Any] = Field(default_factory=dict)

    def default_target(self) -> float:
        """Vanilla's AUC after the reference number of rounds, less 0.005 (the benchmark's target rule)."""
        return float(self.curve.auc(self.reference_rounds)) - 0.005

    def check_target(self, target: float) -> None:
        if not 0.5 < target < 1.0:
            raise UserError(f"--target-auc must be between 0.5 and 1 (exclusive), got {target:g}")
        if target >= self.curve.auc_limit:
            raise UserError(
                f"--target-auc {target:g} is above what {self.workload} converges to (AUC {self.curve.auc_limit:.4f} "
                f"in the fitted model); choose a target below it, e.g. {self.default_target():.4f}"
            )

    def value_of(self, weighting: bool) -> LocalValue:
        """Weighted local updates (CELU-VFL) or unweighted ones (FedBCD, the ablation)."""
        return self.local if weighting or self.local_unweighted is None else self.local_unweighted

    def round_worth(self, timeline: Timeline, weighting: bool = True) -> float:
        """Fresh-round equivalents of one steady round of `timeline` (1 for vanilla)."""
        return Progress(timeline, self.value_of(weighting)).worth

    def mode_rounds_to(self, target: float, timeline: Timeline, weighting: bool = True) -> float:
        """Rounds of `timeline`'s mode until the AUC reaches `target` (inf when it never does)."""
        return Progress(timeline, self.value_of(weighting)).rounds_for(self.curve.rounds_to(target))

    def auc_after(self, rounds, timeline: Timeline, weighting: bool = True) -> np.ndarray:
        """The predicted AUC after each of `rounds` rounds of `timeline`'s mode."""
        return np.asarray(self.curve.auc(Progress(timeline, self.value_of(weighting)).effective(rounds)))


class Progress:
    """Fresh-round equivalents reached after n rounds of a simulated timeline."""

    def __init__(self, timeline: Timeline, local: LocalValue):
        rounds = len(timeline.ends)
        start = min(timeline.steady_from, rounds - 1)
        gained = np.zeros(rounds)
        # In the long run every batch gets its R-1 local updates (FedBCD in turn, CELU-VFL because a new batch
        # waits for room): the steady worth counts R-1 per round at the steady stretch's mean value.
        self.worth = 1.0
        for party in ("active", "passive"):
            counts = np.asarray(timeline.local_counts[party], dtype=int)
            if not timeline.staleness[party]:
                continue
            values = local.values(timeline.staleness[party], timeline.repeat[party])
            cumulative = np.concatenate([[0.0], np.cumsum(values)])
            gained += cumulative[counts] / 2.0  # the mean over the two parties
            first = counts[start - 1] if start >= 1 else 0
            steady = values[first:] if len(values) > first else values
            self.worth += (timeline.local_updates - 1) * float(steady.mean()) / 2.0
        # at[k]: progress after k rounds, k = 0..rounds
        self.at = np.concatenate([[0.0], np.arange(1, rounds + 1) + gained])

    def effective(self, rounds) -> np.ndarray:
        n = np.asarray(rounds, dtype=float)
        simulated = len(self.at) - 1
        inside = np.interp(np.minimum(n, simulated), np.arange(simulated + 1), self.at)
        return np.where(n <= simulated, inside, self.at[-1] + (n - simulated) * self.worth)

    def rounds_for(self, needed: float) -> float:
        """Rounds until the progress reaches `needed` fresh-round equivalents."""
        if not math.isfinite(needed):
            return math.inf
        if needed <= self.at[-1]:
            k = int(np.searchsorted(self.at, needed))  # at[k-1] < needed <= at[k]
            if k == 0:
                return 0.0
            return k - 1 + (needed - self.at[k - 1]) / (self.at[k] - self.at[k - 1])
        return len(self.at) - 1 + (needed - self.at[-1]) / self.worth


def data_file(workload: str) -> Path:
    return DATA_DIR / f"{workload}.json"


@lru_cache(maxsize=16)
def _load(path: str, mtime: float) -> EfficiencyModel:
    return EfficiencyModel.model_validate(json.loads(Path(path).read_text(encoding="utf-8")))


def load_efficiency(workload: str) -> EfficiencyModel:
    """The stored model of `workload` (`simulator/search/vfl/data/<name>.json`)."""
    path = data_file(workload)
    if not path.is_file():
        known = sorted(p.stem for p in DATA_DIR.glob("*.json"))
        raise UserError(
            f"no statistical-efficiency model is stored for workload {workload!r} (looked for {path}); "
            f"fit one with `benchmarks/vfl_fit.py --workload {workload}` from executor runs; stored for: "
            f"{', '.join(known) or 'none'}"
        )
    return _load(str(path), path.stat().st_mtime)


# ---- fitting ------------------------------------------------------------------------------------------------
def fit_curve(rounds: Sequence[float], auc: Sequence[float]) -> AucCurve:
    """Least-squares fit of the vanilla curve to (rounds, AUC) points; A_0 is 0.5 (an untrained ranker)."""
    e, a = np.asarray(rounds, dtype=float), np.asarray(auc, dtype=float)
    if len(e) < 3:
        raise UserError(f"fitting the AUC curve needs at least 3 points, got {len(e)}")
    top = float(a.max())

    def unpack(x):
        # p is kept in (0.2, 5): beyond it the power law is an exponential in disguise with runaway n_0.
        return min(0.999, top + math.exp(x[0])), math.exp(x[1]), 0.2 + 4.8 / (1.0 + math.exp(-x[2]))

    def loss(x):
        limit, scale, power = unpack(x)
        pred = limit - (limit - 0.5) * (1.0 + e / scale) ** (-power)
        return float(((pred - a) ** 2).sum())

    best = min(
        (
            nelder_mead(loss, [math.log(d), math.log(s * e.max()), -1.5], [0.5, 0.5, 0.5])
            for d in (0.002, 0.02)
            for s in (0.05, 0.5)
        ),
        key=loss,
    )
    limit, scale, power = unpack(best)
    return AucCurve(auc_start=0.5, auc_limit=limit, scale_rounds=scale, power=power)


def fit_local_value(
    curve: AucCurve, runs: Sequence[tuple[Timeline, Sequence[float], Sequence[float]]], start: LocalValue | None = None
) -> LocalValue:
    """Fit rho, tau, kappa so that each run's AUC after n rounds matches the vanilla curve at n x its round worth.

    Args:
        runs: (the run's simulated timeline, its rounds, its measured AUCs), for FedBCD and CELU-VFL runs.
    """
    if not runs:
        raise UserError("fitting the local-update value needs at least one FedBCD or CELU-VFL run")
    start = start or LocalValue(rho=0.7, tau=30.0, kappa=0.9)

    def unpack(x) -> LocalValue:
        return LocalValue(rho=1.5 / (1 + math.exp(-x[0])), tau=math.exp(x[1]), kappa=1 / (1 + math.exp(-x[2])))

    def loss(x) -> float:
        local = unpack(x)
        total = 0.0
        for timeline, rounds, auc in runs:
            pred = curve.auc(Progress(timeline, local).effective(rounds))
            total += float(((pred - np.asarray(auc, dtype=float)) ** 2).sum())
        return total + 1e-6 * float(x[1] ** 2)  # keeps tau finite where the data cannot tell

    def logit(p: float) -> float:
        p = min(max(p, 1e-4), 1 - 1e-4)
        return math.log(p / (1 - p))

    x0 = [logit(start.rho / 1.5), math.log(start.tau), logit(start.kappa)]
    return unpack(nelder_mead(loss, x0, [0.5, 0.7, 0.5]))


def fit_jointly(
    vanilla: Sequence[tuple[Sequence[float], Sequence[float]]],
    weighted: Sequence[tuple[Timeline, Sequence[float], Sequence[float]]],
    unweighted: Sequence[tuple[Timeline, Sequence[float], Sequence[float]]],
) -> tuple[AucCurve, LocalValue | None, LocalValue | None]:
    """The curve and both local values fitted together, so that where the runs with local updates plateau
    tells the curve's limit too (a short vanilla run alone, still rising, cannot); kappa is shared.

    Args:
        vanilla: (rounds, AUCs) of each vanilla run.
        weighted, unweighted: (simulated timeline, rounds, AUCs) of the runs with weighted (CELU-VFL) and
            unweighted (FedBCD, the ablation) local updates.
    """
    rounds = [n for r, _ in vanilla for n in r]
    aucs = [a for _, auc in vanilla for a in auc]
    curve = fit_curve(rounds, aucs)
    local = fit_local_value(curve, weighted) if weighted else None
    local_unweighted = fit_local_value(curve, unweighted) if unweighted else None
    top = max(aucs + [a for _, _, auc in (*weighted, *unweighted) for a in auc])

    def logit(p: float) -> float:
        p = min(max(p, 1e-4), 1 - 1e-4)
        return math.log(p / (1 - p))

    def encode(value: LocalValue | None) -> list[float]:
        value = value or LocalValue(rho=0.7, tau=30.0, kappa=0.9)
        return [logit(value.rho / 1.5), math.log(value.tau), logit(value.kappa)]

    def decode_local(x, kappa: float) -> LocalValue:
        return LocalValue(rho=1.5 / (1 + math.exp(-x[0])), tau=math.exp(x[1]), kappa=kappa)

    # One kappa for both: reusing a batch back to back is what uniform sampling avoids, not what the weights
    # correct, and only runs that repeat batches (FedBCD, W=1) can tell it.
    def decode(x) -> tuple[AucCurve, LocalValue, LocalValue]:
        limit = min(0.999, top + math.exp(x[0]))
        c = AucCurve(
            auc_start=0.5, auc_limit=limit, scale_rounds=math.exp(x[1]), power=0.2 + 4.8 / (1 + math.exp(-x[2]))
        )
        kappa = 1 / (1 + math.exp(-x[7]))
        return c, decode_local(x[3:5], kappa), decode_local(x[5:7], kappa)

    v_rounds = [np.asarray(r, dtype=float) for r, _ in vanilla]
    v_aucs = [np.asarray(a, dtype=float) for _, a in vanilla]

    def loss(x) -> float:
        c, w, u = decode(x)
        total = sum(float(((c.auc(r) - a) ** 2).sum()) for r, a in zip(v_rounds, v_aucs))
        for value, runs in ((w, weighted), (u, unweighted)):
            for timeline, r, a in runs:
                total += float(((c.auc(Progress(timeline, value).effective(r)) - np.asarray(a)) ** 2).sum())
        return total + 1e-6 * float(x[4] ** 2 + x[6] ** 2)

    power = min(max(curve.power, 0.21), 4.99)
    w0, u0 = encode(local), encode(local_unweighted)
    x0 = [
        math.log(max(curve.auc_limit - top, 1e-4)),
        math.log(curve.scale_rounds),
        logit((power - 0.2) / 4.8),
        *w0[:2],
        *u0[:2],
        (w0[2] + u0[2]) / 2,
    ]
    best, value = np.asarray(x0), loss(x0)
    for _ in range(3):  # restarts: the simplex shrinks in 8 dimensions
        x = nelder_mead(loss, best.tolist(), [0.5] * 8, iterations=1500)
        if loss(x) >= value - 1e-12:
            break
        best, value = x, loss(x)
    c, w, u = decode(best)
    return c, (w if weighted else None), (u if unweighted else None)
