"""VflReport: what one VFL mode with one workset size W and local-update count R is predicted to do."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class PartyFigures(BaseModel):
    """One party's compute per round, in seconds at its full speed."""

    model_config = ConfigDict(frozen=True)

    site: str
    fresh_compute_s: float = Field(description="forward and backward of the round's fresh batch, with the step")
    local_update_s: float = Field(description="one local update on cached statistics")
    local_updates_per_round: float = Field(description="local updates it runs per round (R-1 once steady)")
    local_compute_s: float = Field(description="local-update work per round")
    mean_staleness: float = Field(description="its updates since the cached statistics were computed, mean")


class VflReport(BaseModel):
    """Predicted time per round and epoch and time to the target AUC of one mode (engine 'des')."""

    model_config = ConfigDict(frozen=True)

    engine: Literal["des"] = "des"
    workload: str
    cluster: str
    mode: Literal["vanilla", "fedbcd", "celu"]
    workset: int = Field(description="W: cached batches (CELU-VFL); 1 otherwise")
    local_updates: int = Field(description="R: uses of each batch's statistics, the fresh one included (1: vanilla)")
    weighting: bool = Field(True, description="CELU-VFL's per-instance weights (false: the ablation without them)")
    wan_bandwidth: float = Field(description="achievable bytes/s per direction")
    wan_latency_s: float = Field(description="one way")
    rounds_per_epoch: int
    round_time_s: float = Field(description="steady state: one fresh batch exchanged and trained on")
    epoch_time_s: float
    communication_s: float = Field(description="a round's two messages alone on the link")
    bytes_to_active_per_round: float
    bytes_to_passive_per_round: float
    communication_bytes_per_epoch: float = Field(description="both directions")
    bottleneck: Literal["communication", "compute"] = Field(
        description="what the round mostly waits on: the exchange, or work that does not hide behind it"
    )
    active: PartyFigures
    passive: PartyFigures
    round_worth: float = Field(description="fresh-round equivalents of one round (1 for vanilla)")
    target_auc: float
    epochs_to_target: float
    time_to_target_s: float
    efficiency_fitted: bool = Field(description="false while the statistical-efficiency model holds prior values")
