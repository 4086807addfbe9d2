"""CELU-VFL's planner: the workset size W and local updates R that reach the target AUC soonest.

The (W, R) grid is searched coarse to fine: every other value of each axis is simulated (`engine.py`) and
valued with the statistical-efficiency model (`efficiency.py`), then the grid neighbours of the best; the
objective is the predicted wall time to the target AUC. Every point costs a timeline of up to an epoch, so
the two stages keep a search to a few seconds.
The baselines a user would otherwise run are evaluated the same way: vanilla VFL, FedBCD with its own best R,
and CELU-VFL without instance weighting at the chosen W and R (when the stored model has that ablation).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from hwmodel.cluster import ClusterSpec
from hwmodel.errors import UserError
from simulator.plan import FederatedSpec, Plan
from simulator.search.result import Baseline, Candidate, SearchResult
from simulator.search.vfl.costs import default_sites, timing_model
from simulator.search.vfl.efficiency import EfficiencyModel, load_efficiency
from simulator.search.vfl.engine import Mode, Timeline, TimingModel, simulate_mode
from simulator.search.vfl.report import PartyFigures, VflReport
from simulator.search.vfl.workset import Sampling
from workloads import vfl as wl

WORKSET_GRID: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12, 16)
UPDATES_GRID: tuple[int, ...] = (2, 3, 4, 6, 8, 12, 16)  # R counts the fresh use: R=1 is vanilla VFL


def federated_plan(sites: tuple[str, str], workset: int, local_updates: int, mode: Mode = "celu") -> Plan:
    """The plan the executor runs: the parties (active first), the mode, W and R; VFL models train in fp32."""
    return Plan(
        dtype="fp32", federated=FederatedSpec(parties=sites, workset=workset, local_updates=local_updates, mode=mode)
    )


def plan_mode(federated: FederatedSpec) -> str:
    """The mode a plan's federated section asks for: its `mode` where the contract has one, else CELU-VFL
    (W=1, R=1 is vanilla VFL either way)."""
    return str(getattr(federated, "mode", None) or "celu")


def _party(site: str, timeline: Timeline, name: str, model: TimingModel) -> PartyFigures:
    compute = model.active if name == "active" else model.passive
    staleness = timeline.staleness[name]
    return PartyFigures(
        site=site,
        fresh_compute_s=compute.forward_s + compute.backward_s,
        local_update_s=compute.local_s,
        local_updates_per_round=timeline.local_updates_per_round[name],
        local_compute_s=timeline.local_compute_s[name],
        mean_staleness=sum(staleness) / len(staleness) if staleness else 0.0,
    )


def evaluate(
    mode: Mode,
    workset: int,
    local_updates: int,
    *,
    cfg: wl.VflWorkloadConfig,
    cluster: ClusterSpec,
    efficiency: EfficiencyModel,
    target: float,
    sites: tuple[str, str],
    weighting: bool = True,
    full: bool = False,
    lock: str = "fifo",
    sampling: Sampling = "uniform",
) -> VflReport:
    """One mode with W and R, simulated (`full`: the whole first epoch, not just to its steady state) and valued."""
    model = timing_model(cfg, cluster, sites, mode, weighting)
    timeline = simulate_mode(model, mode, workset, local_updates, full=full, lock=lock, sampling=sampling)
    # FedBCD's local steps are unweighted, like the CELU-VFL ablation without weights.
    weighted = weighting and mode == "celu"
    worth = efficiency.round_worth(timeline, weighted)
    rounds = efficiency.mode_rounds_to(target, timeline, weighted)
    # The exchange is the bottleneck while the two messages take at least half of the round.
    bottleneck = "communication" if timeline.communication_s >= 0.5 * timeline.round_time_s else "compute"
    return VflReport(
        workload=cfg.name,
        cluster=cluster.name,
        mode=mode,
        workset=workset if mode == "celu" else 1,
        local_updates=timeline.local_updates,
        weighting=weighting,
        wan_bandwidth=model.to_active.bandwidth,
        wan_latency_s=model.to_active.latency,
        rounds_per_epoch=model.rounds_per_epoch,
        round_time_s=timeline.round_time_s,
        epoch_time_s=timeline.epoch_time_s,
        communication_s=timeline.communication_s,
        bytes_to_active_per_round=model.forward_bytes,
        bytes_to_passive_per_round=model.backward_bytes,
        communication_bytes_per_epoch=(model.forward_bytes + model.backward_bytes) * model.rounds_per_epoch,
        bottleneck=bottleneck,  # type: ignore[arg-type]
        active=_party(sites[0], timeline, "active", model),
        passive=_party(sites[1], timeline, "passive", model),
        round_worth=worth,
        target_auc=target,
        epochs_to_target=rounds / model.rounds_per_epoch,
        time_to_target_s=timeline.time_for(rounds) if math.isfinite(rounds) else math.inf,
        efficiency_fitted=efficiency.fitted,
    )


def _coarse(values: tuple[int, ...]) -> tuple[int, ...]:
    """Every other value, the first and the last always included."""
    return tuple(sorted(set(values[::2]) | {values[-1]}))


def _check_grid(name: str, values: Sequence[int]) -> tuple[int, ...]:
    if not values or any(v < 1 for v in values):
        raise UserError(f"{name} takes positive integers, got {', '.join(str(v) for v in values) or 'nothing'}")
    return tuple(sorted(set(values)))


@dataclass(frozen=True)
class _Setting:
    """What every point of one search shares: the workload, the cluster, the efficiency model, the target, the
    sites."""

    cfg: wl.VflWorkloadConfig
    cluster: ClusterSpec
    efficiency: EfficiencyModel
    target: float
    sites: tuple[str, str]

    def evaluate(self, mode: Mode, workset: int, local_updates: int, weighting: bool = True) -> VflReport:
        return evaluate(
            mode,
            workset,
            local_updates,
            cfg=self.cfg,
            cluster=self.cluster,
            efficiency=self.efficiency,
            target=self.target,
            sites=self.sites,
            weighting=weighting,
        )


def _rank_key(report: VflReport) -> tuple[float, int, int]:
    return report.time_to_target_s, report.workset, report.local_updates


def _point(w: int, r: int) -> tuple[int, int]:
    """R=1 uses each batch once, whatever W: vanilla VFL, one candidate at most."""
    return (w if r > 1 else 1, r)


def _walk_grid(
    setting: _Setting, worksets: tuple[int, ...], updates: tuple[int, ...]
) -> list[tuple[tuple[int, int], VflReport]]:
    """Every (W, R) the coarse-to-fine walk visits, best first: the coarse grid, then the grid neighbours of
    the best until none of them is better."""
    done: dict[tuple[int, int], VflReport] = {}

    def visit(points: Iterable[tuple[int, int]]) -> None:
        for w, r in sorted(set(points) - set(done)):
            done[(w, r)] = setting.evaluate("celu", w, r)

    visit(_point(w, r) for w in _coarse(worksets) for r in _coarse(updates))
    while True:  # walk to the best grid neighbour until none is better
        best = min(done.values(), key=_rank_key)
        w0, r0 = best.workset, best.local_updates
        wi, ri = worksets.index(w0) if w0 in worksets else 0, updates.index(r0)
        near = [
            _point(worksets[i], updates[j])
            for i in range(max(0, wi - 1), min(len(worksets), wi + 2))
            for j in range(max(0, ri - 1), min(len(updates), ri + 2))
        ]
        if set(near) <= set(done):
            break
        visit(near)
    return sorted(done.items(), key=lambda item: _rank_key(item[1]))


def _baselines(
    setting: _Setting, chosen: VflReport, chosen_plan: Plan, updates: tuple[int, ...]
) -> tuple[list[Baseline], VflReport, VflReport]:
    """The baselines beside the chosen W and R, with the vanilla and the best FedBCD report."""
    sites = setting.sites
    vanilla = setting.evaluate("vanilla", 1, 1)
    fedbcd = min(
        (setting.evaluate("fedbcd", 1, r) for r in updates), key=lambda rep: (rep.time_to_target_s, rep.local_updates)
    )
    baselines = [
        Baseline(
            name="vanilla VFL",
            plan=federated_plan(sites, 1, 1, "vanilla"),
            report=vanilla,
            reason="one fresh exchange per batch, no local updates",
        ),
        Baseline(
            name=f"FedBCD R={fedbcd.local_updates}",
            plan=federated_plan(sites, 1, fedbcd.local_updates, "fedbcd"),
            report=fedbcd,
            reason="R-1 local steps on each round's stale statistics, in the main loop (its best R)",
        ),
    ]
    if setting.efficiency.local_unweighted is not None:
        ablation = setting.evaluate("celu", chosen.workset, chosen.local_updates, weighting=False)
        baselines.append(
            Baseline(
                name="CELU-VFL, no weighting",
                plan=chosen_plan,
                report=ablation,
                reason="the chosen W and R without per-instance weights",
            )
        )
    return baselines, vanilla, fedbcd


def search_vfl(
    cfg: wl.VflWorkloadConfig,
    cluster: ClusterSpec,
    target: float | None = None,
    sites: tuple[str, str] | None = None,
    worksets: Sequence[int] = WORKSET_GRID,
    updates: Sequence[int] = UPDATES_GRID,
    top_k: int = 5,
) -> SearchResult:
    """The best CELU-VFL (W, R) for `cfg` on `cluster`, with vanilla and FedBCD beside it.

    Raises:
        UserError: an unreachable target, sites the cluster lacks, a workload without a stored efficiency model.
    """
    started = time.perf_counter()
    worksets, updates = _check_grid("workset sizes", worksets), _check_grid("local updates", updates)
    efficiency = load_efficiency(cfg.name)
    target = efficiency.default_target() if target is None else target
    efficiency.check_target(target)
    setting = _Setting(cfg, cluster, efficiency, target, sites or default_sites(cluster))
    visited = _walk_grid(setting, worksets, updates)
    candidates = [Candidate(plan=federated_plan(setting.sites, w, r), report=rep) for (w, r), rep in visited]
    best, chosen = candidates[0], visited[0][1]
    baselines, vanilla, fedbcd = _baselines(setting, chosen, best.plan, updates)

    def speedup(other: VflReport) -> float:
        return other.time_to_target_s / chosen.time_to_target_s if chosen.time_to_target_s > 0 else math.inf

    return SearchResult(
        planner="vfl",
        best=best,
        candidates=candidates[:top_k],
        baselines=baselines,
        search_time_s=time.perf_counter() - started,
        details={
            "target_auc": target,
            "speedup_over_vanilla": speedup(vanilla),
            "speedup_over_fedbcd": speedup(fedbcd),
            "epoch_time_ratio_to_vanilla": chosen.epoch_time_s / vanilla.epoch_time_s,
            "evaluated": len(candidates) + len(updates) + len(baselines) - 1,
            "local_updates_convention": "R counts every use of a batch, the fresh one included: R=1 is vanilla VFL",
            "efficiency_fitted": efficiency.fitted,
            "efficiency_provenance": efficiency.provenance,
            "active_site": setting.sites[0],
            "passive_site": setting.sites[1],
        },
    )


def with_wan(cluster: ClusterSpec, bandwidth: float | None = None, latency: float | None = None) -> ClusterSpec:
    """`cluster` with every WAN link's per-direction bandwidth (bytes/s) and/or one-way latency (s) replaced."""
    if not cluster.wan:
        raise UserError(f"cluster {cluster.name!r} has no WAN links to change")
    if bandwidth is not None and bandwidth <= 0:
        raise UserError(f"WAN bandwidth must be positive, got {bandwidth:g} B/s")
    if latency is not None and latency < 0:
        raise UserError(f"WAN latency must not be negative, got {latency:g} s")
    update = {k: v for k, v in (("bandwidth", bandwidth), ("latency", latency)) if v is not None}
    wan = tuple(w.model_copy(update={"link": w.link.model_copy(update=update)}) for w in cluster.wan)
    return cluster.replaced(wan=wan)
