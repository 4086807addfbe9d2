"""Plan errors. Planners catch `InfeasiblePlan` and count it; bugs stay assertions."""

from hwmodel.errors import UserError


class InfeasiblePlan(UserError):
    """The plan cannot run on this workload and cluster (degrees do not divide, batch does not split...)."""


class UnsupportedPlan(UserError):
    """The plan uses a feature this engine does not model yet; refused rather than approximated."""
