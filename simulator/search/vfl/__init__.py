"""Vertical federated learning (vanilla VFL, FedBCD, CELU-VFL) in the simulator: the parties and the WAN as a
SimPy timeline (`engine.py`), their costs from the specs and the workload (`costs.py`), what a local update is
worth (`efficiency.py`), and the planner that picks CELU-VFL's workset size W and local updates R
(`search.py`, `simulate search vfl`)."""

from simulator.search.vfl.efficiency import EfficiencyModel, load_efficiency
from simulator.search.vfl.engine import Timeline, TimingModel, simulate_mode
from simulator.search.vfl.report import VflReport
from simulator.search.vfl.search import search_vfl

__all__ = ["EfficiencyModel", "Timeline", "TimingModel", "VflReport", "load_efficiency", "search_vfl", "simulate_mode"]
