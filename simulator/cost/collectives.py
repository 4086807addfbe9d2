"""Collective communication as alpha-beta costs over the tiers a device group spans.

A group that spans nodes runs hierarchically, innermost tier first (as NCCL's rings and trees
effectively do on rail-optimized clusters): a reduce-scatter of S bytes over levels with fan-outs
k1 (intra-node), k2 (nodes), k3 (sites) moves (k1-1)/k1 * S over the intra-node fabric, then
(k2-1)/k2 * S/k1 over each device's share of the NICs, then (k3-1)/k3 * S/(k1*k2) over the WAN. The
latency term is min(p - 1, log2 p) steps (ring or recursive halving) of the slowest hop's latency.
All-gather mirrors it; all-reduce is both. All-to-all sends each peer its share concurrently at every
tier, so the slowest tier bounds it. A link may carry measured figures per collective kind
(`LinkSpec.collectives`); a level then uses those for that kind.

`nbytes` is always the size of the full tensor: the all-reduce buffer, the all-gather output, the
reduce-scatter input, the bytes one device sends in all-to-all or send/recv.
"""

from __future__ import annotations

import math
from functools import lru_cache

from hwmodel.cluster import GroupSpan

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv")


def latency_steps(p: int) -> int:
    """Sequential steps of one reduce-scatter or all-gather over p ranks: a ring takes p - 1, recursive
    halving/doubling log2(p); NCCL picks the cheaper for the message."""
    return min(p - 1, math.ceil(math.log2(p)))


def _scatter_phase(nbytes: float, span: GroupSpan, kind: str) -> float:
    """Time of one hierarchical reduce-scatter or all-gather phase of `nbytes` (figures of `kind`)."""
    total = 0.0
    share = nbytes
    for level in span.levels:
        k = level.fanout
        total += (k - 1) / k * share / level.bandwidth_for(kind)
        share /= k
    # Every step waits for its slowest hop.
    return total + latency_steps(span.size) * max(level.latency_for(kind) for level in span.levels)


@lru_cache(maxsize=65536)
def collective_time(kind: str, nbytes: float, span: GroupSpan) -> float:
    """Seconds for one collective of `kind` over the group described by `span`."""
    if span.size <= 1 or nbytes <= 0 or not span.levels:
        return 0.0
    if kind in ("all_gather", "reduce_scatter"):
        return _scatter_phase(nbytes, span, kind)
    if kind == "all_reduce":
        return 2.0 * _scatter_phase(nbytes, span, kind)
    if kind == "all_to_all":
        p = span.size
        inner = 1
        worst = 0.0
        for level in span.levels:
            # Peers first reachable at this tier: those inside the next tier out but not the inner one.
            # Their shares cross this tier's links while the other tiers carry theirs.
            peers = inner * (level.fanout - 1)
            worst = max(worst, peers / p * nbytes / level.bandwidth_for(kind))
            inner *= level.fanout
        return worst + latency_steps(p) * max(level.latency_for(kind) for level in span.levels)
    if kind == "send_recv":
        # A ring of point-to-point transfers: every step crosses the slowest link of the ring.
        level = max(span.levels, key=lambda lvl: lvl.tier)
        steps = max(1, span.size - 1)
        return nbytes / level.bandwidth_for(kind) + steps * level.latency_for(kind)
    raise AssertionError(f"unknown collective {kind}")


def p2p_time(nbytes: float, bandwidth: float, latency: float) -> float:
    """One point-to-point transfer between two devices."""
    if nbytes <= 0:
        return 0.0
    return nbytes / bandwidth + latency
