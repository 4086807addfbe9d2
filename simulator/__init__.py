"""Predict what a training plan does: the plan contract, cost models, the analytic engine, reports."""

from simulator.analytic import evaluate
from simulator.binding import bind
from simulator.errors import InfeasiblePlan, UnsupportedPlan
from simulator.plan import Plan, load_plan, parse_shorthand
from simulator.report import Report

__all__ = ["InfeasiblePlan", "Plan", "Report", "UnsupportedPlan", "bind", "evaluate", "load_plan", "parse_shorthand"]
