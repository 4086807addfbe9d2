"""The one result shape every `simulate search` planner returns and prints with `--json`.

``{"best": {"plan": ..., "report": ...}, "candidates": [...], "baselines": [{"name": ..., "plan": ...,
"report": ... or null, "reason": ...}], "search_time_s": ...}``

`report` is a `simulator.report.Report` for training-throughput planners; planners with their own
figures (federated rounds, for example) put their own pydantic model there. `reason` says why a baseline
has no report (out of memory, does not divide the cluster) or why a candidate was chosen.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny

from simulator.plan import Plan


class Candidate(BaseModel):
    """A plan with its predicted report."""

    model_config = ConfigDict(frozen=True)

    plan: Plan
    report: SerializeAsAny[BaseModel]


class Baseline(BaseModel):
    """A hand-style plan evaluated under the same constraints; `report` is None where it cannot run."""

    model_config = ConfigDict(frozen=True)

    name: str
    plan: Plan | None = None
    report: SerializeAsAny[BaseModel] | None = None
    reason: str | None = Field(None, description="why there is no report (e.g. out of memory), or a remark")


class SearchResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    planner: str = Field(description="galvatron, memo, vfl, ...")
    best: Candidate
    candidates: list[Candidate] = Field(default_factory=list, description="the top K, best first")
    baselines: list[Baseline] = Field(default_factory=list)
    search_time_s: float
    details: dict[str, Any] = Field(default_factory=dict, description="planner-specific figures (e.g. MIP peak)")

    def to_json(self) -> str:
        """The shared --json shape."""
        return self.model_dump_json(indent=2)
