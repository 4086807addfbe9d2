"""Planners behind `simulate search`: each turns a workload, a cluster and constraints into the best plan it
finds, the runners-up and the baselines a user would otherwise pick, in one shared result shape."""

from simulator.search.result import Baseline, Candidate, SearchResult

__all__ = ["Baseline", "Candidate", "SearchResult"]
