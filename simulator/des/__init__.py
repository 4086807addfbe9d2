"""The discrete-event engine: SimPy timelines of plans, with contention, memory over time and traces."""

from simulator.des.engine import DesResult, Simulation, simulate
from simulator.des.results import des_report

__all__ = ["DesResult", "Simulation", "des_report", "evaluate_des", "simulate"]


def evaluate_des(plan, workload, cluster):
    """Predict `plan` with the discrete-event engine (the Report of `simulate`)."""
    return des_report(simulate(plan, workload, cluster))
