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

DEFAULT_STACK = "llm-foundry"

_STACKED: dict[tuple[int, int], tuple[ClusterSpec, StackSpec, ClusterSpec]] = {}


def resolve_stack(name: str | None) -> StackSpec:
    """The stack called (or at the path) `name`; None: the default stack."""
    return load_stack(name or DEFAULT_STACK)


def check_recompute(stack: StackSpec, recompute: str) -> None:
    """A recompute policy the stack does not offer is refused by name."""
    if recompute not in stack.recompute_policies:
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
    _STACKED[key] = (cluster, stack, out)
    return out
