"""Predict what a training plan does: the plan contract, cost models, the analytic engine, reports."""

from .analytic import evaluate
from .binding import bind
from .errors import InfeasiblePlan, UnsupportedPlan
from .plan import Plan, load_plan, parse_shorthand
from .report import Report

__all__ = ["InfeasiblePlan", "Plan", "Report", "UnsupportedPlan", "bind", "evaluate", "load_plan", "parse_shorthand"]
