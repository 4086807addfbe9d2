"""Executor runs as the simulator reads them: `benchmarks/results/vfl_measured.json`, written by
`benchmarks/vfl_wan.py` (see its docstring for the layout): the workload's fields, the convergence runs at one
link (each mode with its AUC evaluations) and the one-epoch runs of vanilla VFL and CELU-VFL at each link.

A list of `execute vfl run --out` results with a `link` {bandwidth, latency} each (what a user collects by
hand) reads too.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hwmodel.errors import UserError
from hwmodel.loading import validate
from hwmodel.units import parse_quantity
from workloads.vfl import VflWorkloadConfig, batches_per_epoch, load_vfl_workload


@dataclass(frozen=True)
class MeasuredRun:
    name: str
    kind: str  # "convergence" (several epochs, AUC evaluations) or "epoch" (one epoch, for its time)
    workload: VflWorkloadConfig
    mode: str
    workset: int
    local_updates: int
    sampling: str
    weighting: bool
    bandwidth: float  # line rate, bytes/s, per direction
    latency_s: float  # one way
    epoch_times_s: tuple[float, ...]  # training time of each whole epoch (evaluation left out)
    evals: tuple[dict, ...] = field(default_factory=tuple)
    target_auc: float | None = None  # the benchmark's target (vanilla's final AUC - 0.005)

    def time_to(self, target: float) -> float | None:
        """Training time at the first evaluation at or above `target` (None: never reached)."""
        return next((float(e["train_time_s"]) for e in self.evals if e["auc"] >= target), None)

    @property
    def epoch_time_s(self) -> float:
        """Median training time of a whole epoch."""
        return statistics.median(self.epoch_times_s)

    @property
    def link_label(self) -> str:
        bits = 8 * self.bandwidth
        rate = f"{bits / 1e9:g}Gbit" if bits >= 1e9 else f"{bits / 1e6:g}Mbit"
        return f"{rate}/{1e3 * 2 * self.latency_s:g}ms"

    @property
    def label(self) -> str:
        name = {"vanilla": "vanilla", "fedbcd": "FedBCD", "celu": "CELU-VFL"}[self.mode]
        extras = [] if self.sampling == "uniform" or self.mode != "celu" else ["latest"]
        if self.mode == "celu" and not self.weighting:
            extras.append("no weights")
        return name + (f" ({', '.join(extras)})" if extras else "")


def _quantity(value: Any, dimension: str, where: str) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return parse_quantity(value, dimension, allow_bare_number=False)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None


def _epoch_times(record: dict, per_epoch: int) -> tuple[float, ...]:
    """Each whole epoch's training time: from `epoch_times_s`, else the evaluations at epoch ends."""
    if record.get("epoch_times_s"):
        return tuple(float(t) for t in record["epoch_times_s"])
    if record.get("epoch_time_s"):
        return (float(record["epoch_time_s"]),)
    ends = {
        int(e["round"]): float(e["train_time_s"]) for e in record.get("evals") or () if int(e["round"]) % per_epoch == 0
    }
    times, previous = [], 0.0
    for k in range(1, int(record.get("rounds", 0)) // per_epoch + 1):
        if k * per_epoch not in ends:
            break
        times.append(ends[k * per_epoch] - previous)
        previous = ends[k * per_epoch]
    return tuple(times)


def _run(
    name: str,
    kind: str,
    record: dict,
    cfg: VflWorkloadConfig,
    bandwidth: float,
    latency: float,
    where: str,
    target: float | None = None,
) -> MeasuredRun:
    times = _epoch_times(record, batches_per_epoch(cfg))
    if not times and not record.get("evals"):
        raise UserError(f"{where}: neither epoch times nor AUC evaluations")
    return MeasuredRun(
        name=name,
        kind=kind,
        workload=cfg,
        mode=str(record["mode"]),
        workset=int(record.get("workset", 1)),
        local_updates=int(record.get("local_updates", record.get("local_updates_per_batch", 1))),
        sampling=str(record.get("sampling", "uniform")),
        weighting=bool(record.get("weighting", True)),
        bandwidth=bandwidth,
        latency_s=latency,
        epoch_times_s=times,
        evals=tuple(record.get("evals") or ()),
        target_auc=target,
    )


def _benchmark_file(data: dict, path: Path) -> list[MeasuredRun]:
    cfg = validate(VflWorkloadConfig, data["workload"], f"{path}: workload")
    runs = []
    conv = data.get("convergence")
    if conv:
        for i, record in enumerate(conv.get("runs") or ()):
            runs.append(
                _run(
                    str(record.get("name", i)),
                    "convergence",
                    record,
                    cfg,
                    conv["bandwidth_bit_s"] / 8,
                    conv["rtt_s"] / 2,
                    f"{path}: convergence run {i}",
                    conv.get("target_auc"),
                )
            )
    for i, record in enumerate(data.get("epoch_times") or ()):
        link = f"{record['bandwidth_bit_s'] / 1e6:g}mbit/{record['rtt_s'] * 1e3:g}ms"
        runs.append(
            _run(
                f"{record['mode']} {link} #{i}",
                "epoch",
                record,
                cfg,
                record["bandwidth_bit_s"] / 8,
                record["rtt_s"] / 2,
                f"{path}: epoch_times[{i}]",
            )
        )
    return runs


def _link(record: dict, where: str) -> tuple[float, float]:
    link = record.get("link")
    if not isinstance(link, dict) or "bandwidth" not in link or "latency" not in link:
        raise UserError(f"{where}: expected 'link': {{bandwidth, latency}} (line rate, one-way latency)")
    return _quantity(link["bandwidth"], "bandwidth", where), _quantity(link["latency"], "time", where)


def _result_list(records: list, path: Path) -> list[MeasuredRun]:
    runs = []
    for i, record in enumerate(records):
        where = f"{path}: run {i}"
        cfg = load_vfl_workload(str(record.get("workload", "vfl-wdl")))
        if record.get("batches_per_epoch") and batches_per_epoch(cfg) != int(record["batches_per_epoch"]):
            # A run on fewer samples (execute --set num_samples=...): the same batches, fewer of them.
            cfg = load_vfl_workload(cfg.name, num_samples=int(record["batches_per_epoch"]) * cfg.batch_size)
        runs.append(_run(str(record.get("name", i)), "convergence", record, cfg, *_link(record, where), where))
    return runs


def load_measured(path: str | Path) -> list[MeasuredRun]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist; run benchmarks/vfl_wan.py first (it writes the measured runs)")
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict) and isinstance(data.get("workload"), dict):
        runs = _benchmark_file(data, path)
    elif isinstance(data, dict) and isinstance(data.get("runs"), list):
        runs = _result_list(data["runs"], path)
    elif isinstance(data, list):
        runs = _result_list(data, path)
    else:
        raise UserError(f"{path}: not a vfl_wan.py result (no 'workload') nor a list of runs")
    if not runs:
        raise UserError(f"{path} holds no runs")
    return runs
