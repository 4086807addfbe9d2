"""Topology queries (hwmodel.cluster) and what-if edits (hwmodel.whatif), on the test clusters of
tests/specs: their figures are the tests' own, so every expected bandwidth and latency below is worked
out by hand from those files rather than read back from the catalog."""

from __future__ import annotations

import pytest

from hwmodel import Tier, UnknownNameError, UserError, load_device
from hwmodel.whatif import with_device_everywhere, with_link_bandwidth
from tests.helpers import toy_cluster

# toy-fabric.yaml: 8 devices per node; fabric 100 GB/s at 50 %, 4 us; 4 NICs of 80 Gbit/s at 75 %, 3 us;
# switch fabric 2 us.
INTRA_BW = 100e9 * 0.5  # 50 GB/s
INTRA_LAT = 4e-6
NIC_BW = 80e9 / 8 * 0.75  # 7.5 GB/s: what one flow between two nodes gets (one NIC)
NIC_SHARE = NIC_BW * 4 / 8  # 3.75 GB/s: each device's share of the node's 4 NICs in a collective
NIC_LAT = 3e-6 + 2e-6  # the NIC's latency plus the switch fabric's
# toy-mixed.yaml: "fast" nodes 100 GB/s x 0.5, 2 us; "slow" nodes 40 GB/s x 0.7, 6 us; one 40 Gbit/s NIC
# at 80 % per node of 4 devices, 1 us (fast) and 3 us (slow), fabric 2 us.
FAST_BW, SLOW_BW = 100e9 * 0.5, 40e9 * 0.7
MIXED_NIC_BW = 40e9 / 8 * 0.8  # 4 GB/s
# toy-wan.yaml: 1 Gbit/s at 80 %, 10 ms one way.
WAN_BW, WAN_LAT = 1e9 / 8 * 0.8, 10e-3


@pytest.fixture(scope="module")
def fabric():
    return toy_cluster("toy-fabric")


@pytest.fixture(scope="module")
def mixed():
    """2 fast nodes of 4 (ranks 0-7), then 2 slow nodes of 4 (ranks 8-15)."""
    return toy_cluster("toy-mixed")


@pytest.fixture(scope="module")
def wan():
    return toy_cluster("toy-wan")


# ---- sizes and ranks ---------------------------------------------------------------------------------


def test_four_nodes_of_eight_have_32_devices(fabric):
    assert fabric.num_devices == 32
    assert fabric.num_nodes == 4
    assert fabric.device_types() == ["a100-80g"]
    assert fabric.is_homogeneous


def test_ranks_are_node_by_node(fabric):
    loc = fabric.location(8)
    assert (loc.node, loc.local) == (1, 0)
    loc = fabric.location(31)
    assert (loc.node, loc.local) == (3, 7)


@pytest.mark.parametrize("rank", [-1, 32, 100])
def test_rank_outside_cluster_is_an_error(fabric, rank):
    with pytest.raises(UserError, match="outside"):
        fabric.location(rank)


# ---- paths ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("a, b", [(0, 1), (0, 7), (9, 14), (31, 24)])
def test_path_inside_a_node_is_nvswitch(fabric, a, b):
    path = fabric.path(a, b)
    assert path.tier == Tier.NODE
    assert path.bandwidth == pytest.approx(INTRA_BW)
    assert path.latency == pytest.approx(INTRA_LAT)


@pytest.mark.parametrize("a, b", [(0, 8), (7, 8), (3, 31), (16, 9)])
def test_path_across_nodes_is_one_nic(fabric, a, b):
    path = fabric.path(a, b)
    assert path.tier == Tier.SITE
    assert path.bandwidth == pytest.approx(NIC_BW)  # a whole NIC, not a device's share of the node's NICs
    assert path.latency == pytest.approx(NIC_LAT)


def test_path_to_itself(fabric):
    path = fabric.path(5, 5)
    assert path.tier == Tier.DEVICE
    assert path.bandwidth == float("inf")
    assert path.latency == 0.0


def test_path_is_symmetric(mixed):
    for a, b in [(0, 1), (0, 5), (3, 10), (8, 15)]:
        assert mixed.path(a, b) == mixed.path(b, a)


# ---- spans ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("first", [0, 8, 24])
def test_tp_group_of_eight_consecutive_ranks_is_one_node_level(fabric, first):
    span = fabric.span(tuple(range(first, first + 8)))
    assert span.size == 8
    assert len(span.levels) == 1
    (level,) = span.levels
    assert level.tier == Tier.NODE
    assert level.fanout == 8
    assert level.bandwidth == pytest.approx(INTRA_BW)
    assert level.latency == pytest.approx(INTRA_LAT)
    assert span.slowest == Tier.NODE


def test_data_parallel_group_across_nodes_is_one_site_level(fabric):
    span = fabric.span((0, 8, 16, 24))
    assert span.size == 4
    assert len(span.levels) == 1
    (level,) = span.levels
    assert level.tier == Tier.SITE
    assert level.fanout == 4
    # Each device gets its share of the node's NICs: 4 NICs for 8 devices, half a NIC each.
    assert level.bandwidth == pytest.approx(NIC_SHARE)
    assert level.latency == pytest.approx(NIC_LAT)


def test_whole_cluster_spans_node_then_site(fabric):
    span = fabric.span(tuple(range(32)))
    assert span.size == 32
    assert [(lvl.tier, lvl.fanout) for lvl in span.levels] == [(Tier.NODE, 8), (Tier.SITE, 4)]
    assert span.slowest == Tier.SITE


def test_partial_nodes_span(fabric):
    span = fabric.span((0, 1, 8, 9, 16, 17))
    assert [(lvl.tier, lvl.fanout) for lvl in span.levels] == [(Tier.NODE, 2), (Tier.SITE, 3)]


def test_single_device_span_has_no_level(fabric):
    span = fabric.span((5,))
    assert span.size == 1
    assert span.levels == ()
    assert span.slowest == Tier.DEVICE


def test_span_is_cached_and_stable(fabric):
    assert fabric.span([0, 8, 16, 24]) is fabric.span((0, 8, 16, 24))


def test_slowest_tier(fabric):
    assert fabric.slowest_tier(tuple(range(8))).tier == Tier.NODE
    whole = fabric.slowest_tier(tuple(range(32)))
    assert whole.tier == Tier.SITE
    assert whole.bandwidth == pytest.approx(NIC_SHARE)  # per device there: half a NIC, as in the span
    assert whole.latency == pytest.approx(NIC_LAT)
    alone = fabric.slowest_tier((3,))
    assert alone.tier == Tier.DEVICE and alone.bandwidth == float("inf") and alone.latency == 0.0


# ---- a mixed cluster -----------------------------------------------------------------------------------


def test_mixed_cluster_device_types(mixed):
    assert mixed.num_devices == 16
    assert mixed.device_types() == ["a100-40g", "v100-32g"]
    assert not mixed.is_homogeneous
    assert mixed.device(0).name == "a100-40g"
    assert mixed.device(7).name == "a100-40g"
    assert mixed.device(8).name == "v100-32g"
    assert mixed.device(15).name == "v100-32g"


def test_mixed_cluster_intra_node_bandwidth_follows_the_node(mixed):
    assert mixed.path(0, 1).bandwidth == pytest.approx(FAST_BW)
    assert mixed.path(8, 9).bandwidth == pytest.approx(SLOW_BW)
    # A group with devices of both node types runs at the slower fabric, with its latency.
    span = mixed.span((0, 1, 8, 9))
    assert span.levels[0].tier == Tier.NODE
    assert span.levels[0].bandwidth == pytest.approx(SLOW_BW)
    assert span.levels[0].latency == pytest.approx(6e-6)


def test_mixed_cluster_across_node_types(mixed):
    path = mixed.path(0, 15)
    assert path.tier == Tier.SITE
    assert path.bandwidth == pytest.approx(MIXED_NIC_BW)
    assert path.latency == pytest.approx(3e-6 + 2e-6)  # the slower NIC's latency plus the fabric's
    # One NIC per node is shared by its 4 devices.
    (level,) = mixed.span((0, 8)).levels
    assert level.bandwidth == pytest.approx(MIXED_NIC_BW / 4)


# ---- two sites over a WAN ------------------------------------------------------------------------------


def test_two_sites_wan_path(wan):
    assert wan.num_devices == 4
    assert wan.sites == ["site-a", "site-b"]
    path = wan.path(0, 2)
    assert path.tier == Tier.WAN
    assert path.bandwidth == pytest.approx(WAN_BW)
    assert path.latency == pytest.approx(WAN_LAT)


def test_two_sites_wan_span(wan):
    (level,) = wan.span((0, 2)).levels
    assert (level.tier, level.fanout) == (Tier.WAN, 2)
    assert level.bandwidth == pytest.approx(WAN_BW)
    assert level.latency == pytest.approx(WAN_LAT)
    assert wan.slowest_tier((0, 2)).tier == Tier.WAN
    # Both devices of a site send at once across the one link: half of it each.
    node, across = wan.span(range(4)).levels
    assert (node.tier, node.fanout, across.tier, across.fanout) == (Tier.NODE, 2, Tier.WAN, 2)
    assert across.bandwidth == pytest.approx(WAN_BW / 2)


# ---- resizing and what-if edits ------------------------------------------------------------------------


def test_with_num_nodes_resizes(fabric):
    three = fabric.with_num_nodes(3)
    assert three.num_devices == 24
    assert fabric.num_devices == 32  # specs are immutable
    assert toy_cluster("toy-fabric").num_devices == 32  # and the loaded one is not changed either


@pytest.mark.parametrize("name", ["toy-mixed", "toy-wan"])
def test_with_num_nodes_refuses_multi_group_cluster(name):
    cluster = toy_cluster(name)
    with pytest.raises(UserError, match="node groups"):
        cluster.with_num_nodes(4)
    with pytest.raises(UserError):
        toy_cluster(name, nodes=2)


@pytest.mark.parametrize("nodes", [0, -1, -8])
def test_with_num_nodes_refuses_non_positive(fabric, nodes):
    with pytest.raises(UserError, match="positive"):
        fabric.with_num_nodes(nodes)
    with pytest.raises(UserError):
        toy_cluster("toy-fabric", nodes=nodes)


def test_with_device_swaps_the_device(fabric):
    h100 = load_device("h100-sxm")
    swapped = fabric.with_device("a100-80g", h100)
    assert swapped.device_types() == ["h100-sxm"]
    assert swapped.device(0) == h100 and swapped.device(31) == h100
    assert swapped.num_devices == 32
    assert swapped.path(0, 8) == fabric.path(0, 8)  # links unchanged
    assert fabric.device(0).name == "a100-80g"


def test_with_device_swaps_only_the_named_type(mixed):
    h100 = load_device("h100-sxm")
    swapped = mixed.with_device("v100-32g", h100)
    assert swapped.device_types() == ["a100-40g", "h100-sxm"]
    assert swapped.device(0).name == "a100-40g"
    assert swapped.device(8).name == "h100-sxm"


def test_with_device_unknown_name(fabric):
    with pytest.raises(UnknownNameError) as info:
        fabric.with_device("a100-80", load_device("h100-sxm"))
    assert "a100-80g" in info.value.suggestions


def test_with_device_everywhere(mixed):
    v100s = with_device_everywhere(mixed, "v100-32g")
    assert v100s.device_types() == ["v100-32g"]
    assert v100s.device(0).name == "v100-32g"
    assert v100s.path(0, 1) == mixed.path(0, 1)


def test_with_link_bandwidth_changes_paths(fabric):
    # A new bandwidth keeps the link's efficiency (50 % on the fabric, 75 % on the NICs).
    faster = with_link_bandwidth(fabric, "intra_node_bandwidth", 900e9)
    assert faster.path(0, 1).bandwidth == pytest.approx(900e9 * 0.5)
    assert faster.path(0, 8).bandwidth == pytest.approx(NIC_BW)  # other tiers untouched
    assert faster.span(tuple(range(8))).levels[0].bandwidth == pytest.approx(900e9 * 0.5)

    net = with_link_bandwidth(fabric, "inter_node_bandwidth", 400e9 / 8)
    assert net.path(0, 8).bandwidth == pytest.approx(400e9 / 8 * 0.75)
    assert net.span((0, 8)).levels[0].bandwidth == pytest.approx(400e9 / 8 * 0.75 * 4 / 8)
    assert net.path(0, 1).bandwidth == pytest.approx(INTRA_BW)

    host = with_link_bandwidth(fabric, "host_link_bandwidth", 64e9)
    assert host.node_of(0).host_link.bandwidth == 64e9
    assert host.path(0, 1) == fabric.path(0, 1)


def test_with_link_bandwidth_on_every_group(mixed):
    slow = with_link_bandwidth(mixed, "intra_node_bandwidth", 50e9)
    assert slow.path(0, 1).bandwidth == pytest.approx(50e9 * 0.5)  # each group keeps its own efficiency
    assert slow.path(8, 9).bandwidth == pytest.approx(50e9 * 0.7)


def test_with_wan_bandwidth(wan):
    faster = with_link_bandwidth(wan, "wan_bandwidth", 10e9 / 8)
    assert faster.path(0, 2).bandwidth == pytest.approx(10e9 / 8 * 0.8)
    assert faster.path(0, 2).latency == pytest.approx(WAN_LAT)


@pytest.mark.parametrize(
    "key, value",
    [
        ("wan_bandwidth", 1e9),  # no WAN links
        ("nvlink_bandwidth", 1e9),  # unknown key
        ("intra_node_bandwidth", 0.0),
        ("inter_node_bandwidth", -1e9),
    ],
)
def test_with_link_bandwidth_rejects(fabric, key, value):
    with pytest.raises(UserError):
        with_link_bandwidth(fabric, key, value)


def test_devices_of_a_site_share_its_wan_link():
    # Two sites of 4 devices each: an all-reduce over all 8 pushes the whole buffer through the one WAN
    # link once per phase, whatever the number of devices (every device's shard shares the link).
    from simulator.cost.collectives import collective_time

    cluster = toy_cluster("toy-wan", devices_per_node=4)
    nbytes = 1e8
    time = collective_time("all_reduce", nbytes, cluster.span(range(8)))
    latency = 2 * 3 * WAN_LAT  # two phases of min(7, log2 8) = 3 steps
    # Inside each site first: reduce-scatter then all-gather over 4 devices at 5 GB/s, 3/4 of the buffer each.
    intra = 2 * 3 / 4 * nbytes / (10e9 * 0.5)
    # 1e8 B / 100 MB/s = 1 s, + 60 ms of WAN latency, + 30 ms inside the sites = 1.09 s (the 1 us intra-node
    # latency steps are below the tolerance).
    assert time == pytest.approx(nbytes / WAN_BW + latency + intra, rel=1e-4)
    assert time >= nbytes / WAN_BW


def test_devices_per_node_resizes_every_node():
    cluster = toy_cluster("toy-mixed", devices_per_node=3)
    assert cluster.num_devices == 12 and cluster.num_nodes == 4
    assert toy_cluster("toy-fabric", nodes=2, devices_per_node=4).num_devices == 8
    with pytest.raises(UserError, match="devices-per-node"):
        toy_cluster("toy-fabric", devices_per_node=0)
