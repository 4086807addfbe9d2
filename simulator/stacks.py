"""Which software stack a prediction assumes, and the cluster as that stack uses it.

A plan names its stack (`stack:` in a plan file, `--stack` on the command line); left out, the prediction
assumes `DEFAULT_STACK`, llm-foundry's figures, the ones every device spec carried before stacks were an
input of their own, so a plan that names no stack predicts what it did then. `bind` applies the stack, so
the analytic and the event engine see the same devices.
"""

from __future__ import annotations

from hwmodel.catalog import load_stack
from hwmodel.cluster import ClusterSpec
from hwmodel.errors import UserError
from hwmodel.stack import StackSpec, apply_stack_to_cluster
from simulator.plan import recompute_policy

DEFAULT_STACK = "llm-foundry"

_STACKED: dict[tuple[int, int], tuple[ClusterSpec, StackSpec, ClusterSpec]] = {}
# id(stacked cluster) -> (it, its base cluster, its stack): a cluster already carrying a stack's figures
# (a search given --stack binds thousands of plans on one) is not stacked twice.
_ORIGIN: dict[int, tuple[ClusterSpec, ClusterSpec, StackSpec]] = {}


def resolve_stack(name: str | None) -> StackSpec:
    """The stack called (or at the path) `name`; None: the default stack."""
    return load_stack(name or DEFAULT_STACK)


def check_recompute(stack: StackSpec, recompute: str) -> None:
    """A recompute policy the stack does not offer is refused by name."""
    if recompute_policy(recompute) not in stack.recompute_policies:
        raise UserError(
            f"stack {stack.name!r} has no recompute policy {recompute!r}; it offers: "
            f"{', '.join(stack.recompute_policies)}"
        )


def stacked_cluster(cluster: ClusterSpec, stack: StackSpec) -> ClusterSpec:
    """`cluster` with every device as `stack` uses it (cached: searches bind thousands of plans)."""
    key = (id(cluster), id(stack))
    hit = _STACKED.get(key)
    if hit is not None and hit[0] is cluster and hit[1] is stack:
        return hit[2]
    out = apply_stack_to_cluster(cluster, stack)
    if len(_STACKED) > 256:
        _STACKED.clear()
        _ORIGIN.clear()
    _STACKED[key] = (cluster, stack, out)
    _ORIGIN[id(out)] = (out, cluster, stack)
    return out


def bind_stack(cluster: ClusterSpec, name: str | None) -> tuple[ClusterSpec, StackSpec]:
    """The cluster a plan naming stack `name` (None: none named) runs on, and that stack.

    A cluster from `stacked_cluster` keeps its stack when the plan names none, and is re-based on its
    original devices when the plan names another.
    """
    origin = _ORIGIN.get(id(cluster))
    if origin is not None and origin[0] is cluster:
        base, carried = origin[1], origin[2]
        if name is None or load_stack(name) is carried:
            return cluster, carried
        cluster = base
    stack = resolve_stack(name)
    return stacked_cluster(cluster, stack), stack


STACK_HELP = (
    "Software stack (see `simulate specs list`) or a stack YAML: what the framework achieves on the devices. "
    f"Left out: the plan's `stack`, else {DEFAULT_STACK}."
)


def cluster_with_stack(cluster: ClusterSpec, name: str | None) -> ClusterSpec:
    """`cluster` as stack `name` uses it (None: unchanged, so each plan's own stack or the default applies)."""
    if name is None:
        return cluster
    return stacked_cluster(cluster, resolve_stack(name))


def carrying_stack(cluster: ClusterSpec) -> ClusterSpec:
    """`cluster` as it runs a plan that names no stack (the default stack, or the one it already carries):
    what a planner's own cost model reads, so that it sees the devices `bind` gives the engines."""
    return bind_stack(cluster, None)[0]
