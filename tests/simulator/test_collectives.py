"""Alpha-beta collective costs over the tiers a group spans (simulator.cost.collectives), on the test cluster
tests/specs/toy-fabric.yaml (the tests' own figures, so each exact formula below is worked out by hand) and
on hand-built spans."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hwmodel import GroupSpan, Level, Tier
from simulator.cost.collectives import COLLECTIVES, collective_time, p2p_time
from tests.helpers import toy_cluster

# Pure formulas, microseconds an example: no deadline is needed to keep them fast, and none is wanted (the
# first call of a span fills its cache).
SETTINGS = settings(max_examples=60, deadline=None)

# toy-fabric.yaml: 4 nodes of 8 devices; fabric 100 GB/s at 50 %, 4 us; 4 NICs of 80 Gbit/s at 75 % per node,
# 3 us, plus 2 us of switch fabric.
INTRA_BW, INTRA_LAT = 100e9 * 0.5, 4e-6
NIC_SHARE_BW = 80e9 / 8 * 0.75 * 4 / 8  # 3.75 GB/s: each device's share of its node's 4 NICs
NIC_LAT = 3e-6 + 2e-6


# Module-level rather than a fixture: hypothesis prints its arguments, and a cluster's repr is long.
FABRIC = toy_cluster("toy-fabric")


def _span(fanout: int, bandwidth: float, latency: float, tier: Tier = Tier.NODE) -> GroupSpan:
    return GroupSpan(fanout, (Level(tier, fanout, bandwidth, latency),))


# ---- relations between collectives --------------------------------------------------------------------

_BYTES = st.floats(min_value=1.0, max_value=1e11, allow_nan=False)
_GROUPS = st.sampled_from(
    [tuple(range(8)), (0, 8, 16, 24), tuple(range(32)), (0, 1), (0, 1, 8, 9), tuple(range(0, 32, 2)), (3, 11)]
)


@SETTINGS
@given(nbytes=_BYTES, ranks=_GROUPS)
def test_all_reduce_is_reduce_scatter_plus_all_gather(nbytes, ranks):
    span = FABRIC.span(ranks)
    rs = collective_time("reduce_scatter", nbytes, span)
    ag = collective_time("all_gather", nbytes, span)
    assert rs > 0
    assert ag == rs
    assert collective_time("all_reduce", nbytes, span) == pytest.approx(2 * rs, rel=1e-12)


@pytest.mark.parametrize("kind", COLLECTIVES)
@pytest.mark.parametrize("nbytes", [1.0, 1e6, 1e10])
def test_group_of_one_is_free(kind, nbytes):
    assert collective_time(kind, nbytes, FABRIC.span((5,))) == 0.0
    assert collective_time(kind, nbytes, GroupSpan(1, ())) == 0.0


@pytest.mark.parametrize("kind", COLLECTIVES)
@pytest.mark.parametrize("ranks", [tuple(range(8)), tuple(range(32))])
def test_zero_bytes_is_free(kind, ranks):
    assert collective_time(kind, 0.0, FABRIC.span(ranks)) == 0.0


def test_p2p_time():
    assert p2p_time(0.0, 1e9, 1e-3) == 0.0
    assert p2p_time(2e9, 1e9, 1e-3) == pytest.approx(2.0 + 1e-3)


# ---- monotonicity ----------------------------------------------------------------------------------------


@SETTINGS
@given(
    kind=st.sampled_from(COLLECTIVES),
    ranks=_GROUPS,
    a=_BYTES,
    b=_BYTES,
)
def test_time_strictly_increases_with_bytes(kind, ranks, a, b):
    small, large = sorted((a, b))
    span = FABRIC.span(ranks)
    t_small, t_large = collective_time(kind, small, span), collective_time(kind, large, span)
    assert t_small > 0
    assert t_large >= t_small
    if large > small * (1 + 1e-9):  # sizes a rounding error apart may round to one time
        assert t_large > t_small


@SETTINGS
@given(
    kind=st.sampled_from(COLLECTIVES),
    fanouts=st.lists(st.integers(2, 8), min_size=1, max_size=3),
    bandwidths=st.lists(st.floats(1e6, 1e12), min_size=3, max_size=3),
    factors=st.lists(st.floats(1.0, 100.0), min_size=3, max_size=3),
    latency=st.floats(0.0, 1e-3),
    nbytes=_BYTES,
)
def test_time_never_increases_with_bandwidth(kind, fanouts, bandwidths, factors, latency, nbytes):
    tiers = (Tier.NODE, Tier.SITE, Tier.WAN)
    size = 1
    for k in fanouts:
        size *= k
    slow = GroupSpan(size, tuple(Level(t, k, bw, latency) for t, k, bw in zip(tiers, fanouts, bandwidths)))
    fast = GroupSpan(
        size, tuple(Level(t, k, bw * f, latency) for t, k, bw, f in zip(tiers, fanouts, bandwidths, factors))
    )
    assert collective_time(kind, nbytes, fast) <= collective_time(kind, nbytes, slow)


@pytest.mark.parametrize("kind", COLLECTIVES)
@pytest.mark.parametrize("nbytes", [1e3, 1e6, 1e9])
def test_one_rank_per_node_is_slower_than_inside_a_node(kind, nbytes):
    inside = collective_time(kind, nbytes, FABRIC.span((0, 1, 2, 3)))
    across = collective_time(kind, nbytes, FABRIC.span((0, 8, 16, 24)))
    assert across > inside > 0


@st.composite
def _spread_groups(draw):
    """(size, ranks) of a group laid over 2-4 of toy-fabric's nodes of 8, `per_node` ranks on each."""
    size = draw(st.sampled_from([2, 4, 8]))
    per_node = draw(st.sampled_from([k for k in (1, 2, 4) if k < size and size // k <= 4]))
    first_local = draw(st.integers(0, 8 - per_node))
    ranks = tuple(node * 8 + first_local + i for node in range(size // per_node) for i in range(per_node))
    return size, ranks


@SETTINGS
@given(kind=st.sampled_from(COLLECTIVES), group=_spread_groups(), nbytes=_BYTES)
@example(kind="all_to_all", group=(4, (0, 1, 8, 9)), nbytes=1e4)  # small, 2 ranks on each of 2 nodes
@example(kind="all_reduce", group=(4, (0, 1, 8, 9)), nbytes=1.0)
def test_group_spanning_nodes_is_slower_than_inside_a_node(kind, group, nbytes):
    size, ranks = group
    assert FABRIC.span(ranks).slowest == Tier.SITE
    inside = collective_time(kind, nbytes, FABRIC.span(tuple(range(size))))
    across = collective_time(kind, nbytes, FABRIC.span(ranks))
    assert across > inside > 0


# ---- exact formulas ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("p, steps", [(2, 1), (4, 2), (8, 3)])
def test_ring_formula_single_level(p, steps):
    # One intra-node level of p ranks: (p-1)/p * S / B plus min(p-1, log2 p) latency steps
    # (NCCL picks ring or recursive halving, whichever has fewer sequential steps).
    nbytes = 1e9
    span = FABRIC.span(tuple(range(p)))
    ring = (p - 1) / p * nbytes / INTRA_BW + steps * INTRA_LAT
    assert collective_time("reduce_scatter", nbytes, span) == pytest.approx(ring, rel=1e-12)
    assert collective_time("all_gather", nbytes, span) == pytest.approx(ring, rel=1e-12)
    assert collective_time("all_reduce", nbytes, span) == pytest.approx(2 * ring, rel=1e-12)


def test_ring_formula_numbers():
    # 1 GB all-reduce over 8 GPUs at 100 GB/s, 10 us per step, 3 steps per phase:
    # 2 * (7/8 * 10 ms + 3 * 10 us) = 17.56 ms.
    span = _span(8, 100e9, 10e-6)
    assert collective_time("all_reduce", 1e9, span) == pytest.approx(0.01756, rel=1e-12)
    assert collective_time("all_gather", 1e9, span) == pytest.approx(0.00878, rel=1e-12)


@SETTINGS
@given(
    p=st.integers(2, 64),
    bandwidth=st.floats(1e6, 1e12),
    nbytes=_BYTES,
)
def test_ring_bandwidth_term_single_level(p, bandwidth, nbytes):
    # Without latency only the bandwidth term is left: (p-1)/p * S / B per phase.
    span = _span(p, bandwidth, 0.0)
    term = (p - 1) / p * nbytes / bandwidth
    assert collective_time("reduce_scatter", nbytes, span) == pytest.approx(term, rel=1e-12)
    assert collective_time("all_reduce", nbytes, span) == pytest.approx(2 * term, rel=1e-12)


def _bandwidth_term(kind: str, nbytes: float, span: GroupSpan) -> float:
    """Time per nbytes with the (size-independent) latency term removed: t(2S) - t(S)."""
    return collective_time(kind, 2 * nbytes, span) - collective_time(kind, nbytes, span)


def test_ring_bandwidth_across_nodes():
    nbytes = 1e9
    span = FABRIC.span((0, 8, 16, 24))
    expected = 3 / 4 * nbytes / NIC_SHARE_BW
    assert _bandwidth_term("all_gather", nbytes, span) == pytest.approx(expected, rel=1e-9)
    assert _bandwidth_term("all_reduce", nbytes, span) == pytest.approx(2 * expected, rel=1e-9)


def test_hierarchical_bandwidth_two_levels():
    # Intra-node first on the whole tensor, then across nodes on the 1/8 shard each device holds.
    nbytes = 2e9
    expected = 7 / 8 * nbytes / INTRA_BW + 3 / 4 * (nbytes / 8) / NIC_SHARE_BW
    span = FABRIC.span(tuple(range(32)))
    assert _bandwidth_term("reduce_scatter", nbytes, span) == pytest.approx(expected, rel=1e-9)
    assert _bandwidth_term("all_reduce", nbytes, span) == pytest.approx(2 * expected, rel=1e-9)
    # The same with a hand-built span and no latency, exactly.
    bare = GroupSpan(32, (Level(Tier.NODE, 8, INTRA_BW, 0.0), Level(Tier.SITE, 4, NIC_SHARE_BW, 0.0)))
    assert collective_time("reduce_scatter", nbytes, bare) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("kind", ["all_reduce", "all_gather", "reduce_scatter"])
@pytest.mark.parametrize("ranks", [tuple(range(8)), (0, 8, 16, 24), tuple(range(32)), (0, 1, 8, 9)])
def test_latency_steps_between_one_hop_and_a_ring(kind, ranks):
    # A one-byte collective is all latency: at least one hop of the slowest tier, at most p-1 of them per phase.
    span = FABRIC.span(ranks)
    slowest = max(level.latency for level in span.levels)
    phases = 2 if kind == "all_reduce" else 1
    t = collective_time(kind, 1.0, span)
    assert phases * slowest < t < phases * (len(ranks) - 1) * slowest + 1e-9


def test_all_to_all_single_level():
    nbytes = 1e9
    # Bandwidth term of the 7 peers' shares plus min(7, log2 8) = 3 latency steps.
    expected = 7 / 8 * nbytes / INTRA_BW + 3 * INTRA_LAT
    assert collective_time("all_to_all", nbytes, FABRIC.span(tuple(range(8)))) == pytest.approx(expected, rel=1e-12)


def test_all_to_all_is_bounded_by_its_slowest_tier():
    nbytes = 1e9
    # 32 ranks: 7 peers over NVSwitch, 24 over the NICs; the NIC tier dominates. Latency: min(31, log2 32)
    # = 5 steps of the slowest hop.
    expected = max(7 / 32 * nbytes / INTRA_BW, 24 / 32 * nbytes / NIC_SHARE_BW) + 5 * max(NIC_LAT, INTRA_LAT)
    assert collective_time("all_to_all", nbytes, FABRIC.span(tuple(range(32)))) == pytest.approx(expected, rel=1e-12)


def test_send_recv_ring_crosses_the_slowest_link():
    nbytes = 1e8
    expected = nbytes / NIC_SHARE_BW + 31 * NIC_LAT
    assert collective_time("send_recv", nbytes, FABRIC.span(tuple(range(32)))) == pytest.approx(expected, rel=1e-12)
