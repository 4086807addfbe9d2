"""Topology queries of catalog clusters (hwmodel.cluster) and what-if edits (hwmodel.whatif)."""

from __future__ import annotations

import pytest

from hwmodel import Tier, UnknownNameError, UserError, load_cluster, load_device
from hwmodel.whatif import with_device_everywhere, with_link_bandwidth

# dgx-a100-80g.yaml: NVSwitch 300 GB/s at 80 %, 2 us; 8x 200 Gbit/s HDR at 92 %, 2 us; fabric 1 us.
NVSWITCH_BW = 300e9 * 0.8
NVSWITCH_LAT = 2e-6
NIC_BW = 200e9 / 8 * 0.92
NIC_LAT = 2e-6 + 1e-6
NICS_PER_NODE = 8


@pytest.fixture(scope="module")
def dgx4():
    return load_cluster("dgx-a100-80g", nodes=4)


@pytest.fixture(scope="module")
def wan():
    return load_cluster("two-sites-wan")


# ---- sizes and ranks ---------------------------------------------------------------------------------


def test_dgx_four_nodes_has_32_devices(dgx4):
    assert dgx4.num_devices == 32
    assert dgx4.num_nodes == 4
    assert dgx4.device_types() == ["a100-80g"]
    assert dgx4.is_homogeneous


def test_ranks_are_node_by_node(dgx4):
    loc = dgx4.location(8)
    assert (loc.node, loc.local) == (1, 0)
    loc = dgx4.location(31)
    assert (loc.node, loc.local) == (3, 7)


@pytest.mark.parametrize("rank", [-1, 32, 100])
def test_rank_outside_cluster_is_an_error(dgx4, rank):
    with pytest.raises(UserError, match="outside"):
        dgx4.location(rank)


# ---- paths ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("a, b", [(0, 1), (0, 7), (9, 14), (31, 24)])
def test_path_inside_a_node_is_nvswitch(dgx4, a, b):
    path = dgx4.path(a, b)
    assert path.tier == Tier.NODE
    assert path.bandwidth == pytest.approx(NVSWITCH_BW)
    assert path.latency == pytest.approx(NVSWITCH_LAT)


@pytest.mark.parametrize("a, b", [(0, 8), (7, 8), (3, 31), (16, 9)])
def test_path_across_nodes_is_one_nic(dgx4, a, b):
    path = dgx4.path(a, b)
    assert path.tier == Tier.SITE
    assert path.bandwidth == pytest.approx(NIC_BW)
    assert path.latency == pytest.approx(NIC_LAT)


def test_path_to_itself(dgx4):
    path = dgx4.path(5, 5)
    assert path.tier == Tier.DEVICE
    assert path.bandwidth == float("inf")
    assert path.latency == 0.0


def test_path_is_symmetric(mixed):
    for a, b in [(0, 1), (0, 9), (3, 20), (16, 31)]:
        assert mixed.path(a, b) == mixed.path(b, a)


# ---- spans ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("first", [0, 8, 24])
def test_tp_group_of_eight_consecutive_ranks_is_one_node_level(dgx4, first):
    span = dgx4.span(tuple(range(first, first + 8)))
    assert span.size == 8
    assert len(span.levels) == 1
    (level,) = span.levels
    assert level.tier == Tier.NODE
    assert level.fanout == 8
    assert level.bandwidth == pytest.approx(NVSWITCH_BW)
    assert level.latency == pytest.approx(NVSWITCH_LAT)
    assert span.slowest == Tier.NODE


def test_data_parallel_group_across_nodes_is_one_site_level(dgx4):
    span = dgx4.span((0, 8, 16, 24))
    assert span.size == 4
    assert len(span.levels) == 1
    (level,) = span.levels
    assert level.tier == Tier.SITE
    assert level.fanout == 4
    # Rail-optimized: each device gets its share of the node's NICs (here one NIC per GPU).
    assert level.bandwidth == pytest.approx(NIC_BW * NICS_PER_NODE / 8)
    assert level.latency == pytest.approx(NIC_LAT)


def test_whole_cluster_spans_node_then_site(dgx4):
    span = dgx4.span(tuple(range(32)))
    assert span.size == 32
    assert [(lvl.tier, lvl.fanout) for lvl in span.levels] == [(Tier.NODE, 8), (Tier.SITE, 4)]
    assert span.slowest == Tier.SITE


def test_partial_nodes_span(dgx4):
    span = dgx4.span((0, 1, 8, 9, 16, 17))
    assert [(lvl.tier, lvl.fanout) for lvl in span.levels] == [(Tier.NODE, 2), (Tier.SITE, 3)]


def test_single_device_span_has_no_level(dgx4):
    span = dgx4.span((5,))
    assert span.size == 1
    assert span.levels == ()
    assert span.slowest == Tier.DEVICE


def test_span_is_cached_and_stable(dgx4):
    assert dgx4.span([0, 8, 16, 24]) is dgx4.span((0, 8, 16, 24))


def test_slowest_tier(dgx4):
    assert dgx4.slowest_tier(tuple(range(8))).tier == Tier.NODE
    whole = dgx4.slowest_tier(tuple(range(32)))
    assert whole.tier == Tier.SITE
    assert whole.bandwidth == pytest.approx(NIC_BW)
    assert whole.latency == pytest.approx(NIC_LAT)
    alone = dgx4.slowest_tier((3,))
    assert alone.tier == Tier.DEVICE and alone.bandwidth == float("inf") and alone.latency == 0.0


# ---- a mixed cluster -----------------------------------------------------------------------------------


def test_mixed_cluster_device_types(mixed):
    assert mixed.num_devices == 32
    assert mixed.device_types() == ["a100-40g", "v100-32g"]
    assert not mixed.is_homogeneous
    assert mixed.device(0).name == "a100-40g"
    assert mixed.device(15).name == "a100-40g"
    assert mixed.device(16).name == "v100-32g"
    assert mixed.device(31).name == "v100-32g"


def test_mixed_cluster_intra_node_bandwidth_follows_the_node(mixed):
    assert mixed.path(0, 1).bandwidth == pytest.approx(300e9 * 0.8)
    assert mixed.path(16, 17).bandwidth == pytest.approx(150e9 * 0.7)
    # A group with devices of both node types runs at the slower fabric.
    span = mixed.span((0, 1, 16, 17))
    assert span.levels[0].tier == Tier.NODE
    assert span.levels[0].bandwidth == pytest.approx(150e9 * 0.7)


def test_mixed_cluster_across_node_types(mixed):
    path = mixed.path(0, 31)
    assert path.tier == Tier.SITE
    assert path.bandwidth == pytest.approx(100e9 / 8 * 0.9)
    assert path.latency == pytest.approx(2e-6 + 2e-6)
    # One 100 Gbit/s NIC per node is shared by its 8 GPUs.
    (level,) = mixed.span((0, 16)).levels
    assert level.bandwidth == pytest.approx(100e9 / 8 * 0.9 / 8)


# ---- two sites over a WAN ------------------------------------------------------------------------------


def test_two_sites_wan_path(wan):
    assert wan.num_devices == 2
    assert wan.sites == ["dc-a", "dc-b"]
    path = wan.path(0, 1)
    assert path.tier == Tier.WAN
    assert path.bandwidth == pytest.approx(100e6 / 8 * 0.9)
    assert path.latency == pytest.approx(20e-3)


def test_two_sites_wan_span(wan):
    (level,) = wan.span((0, 1)).levels
    assert (level.tier, level.fanout) == (Tier.WAN, 2)
    assert level.bandwidth == pytest.approx(100e6 / 8 * 0.9)
    assert level.latency == pytest.approx(20e-3)
    assert wan.slowest_tier((0, 1)).tier == Tier.WAN


# ---- resizing and what-if edits ------------------------------------------------------------------------


def test_with_num_nodes_resizes(dgx4):
    three = dgx4.with_num_nodes(3)
    assert three.num_devices == 24
    assert dgx4.num_devices == 32  # specs are immutable
    assert load_cluster("dgx-a100-80g").num_devices == 8


@pytest.mark.parametrize("name", ["mixed-a100-v100", "two-sites-wan"])
def test_with_num_nodes_refuses_multi_group_cluster(name):
    cluster = load_cluster(name)
    with pytest.raises(UserError, match="node groups"):
        cluster.with_num_nodes(4)
    with pytest.raises(UserError):
        load_cluster(name, nodes=2)


@pytest.mark.parametrize("nodes", [0, -1, -8])
def test_with_num_nodes_refuses_non_positive(dgx4, nodes):
    with pytest.raises(UserError, match="positive"):
        dgx4.with_num_nodes(nodes)
    with pytest.raises(UserError):
        load_cluster("dgx-a100-80g", nodes=nodes)


def test_with_device_swaps_the_device(dgx4):
    h100 = load_device("h100-sxm")
    swapped = dgx4.with_device("a100-80g", h100)
    assert swapped.device_types() == ["h100-sxm"]
    assert swapped.device(0) == h100 and swapped.device(31) == h100
    assert swapped.num_devices == 32
    assert swapped.path(0, 8) == dgx4.path(0, 8)  # links unchanged
    assert dgx4.device(0).name == "a100-80g"


def test_with_device_swaps_only_the_named_type(mixed):
    h100 = load_device("h100-sxm")
    swapped = mixed.with_device("v100-32g", h100)
    assert swapped.device_types() == ["a100-40g", "h100-sxm"]
    assert swapped.device(0).name == "a100-40g"
    assert swapped.device(16).name == "h100-sxm"


def test_with_device_unknown_name(dgx4):
    with pytest.raises(UnknownNameError) as info:
        dgx4.with_device("a100-80", load_device("h100-sxm"))
    assert "a100-80g" in info.value.suggestions


def test_with_device_everywhere(mixed):
    v100s = with_device_everywhere(mixed, "v100-32g")
    assert v100s.device_types() == ["v100-32g"]
    assert v100s.device(0).name == "v100-32g"
    assert v100s.path(0, 1) == mixed.path(0, 1)


def test_with_link_bandwidth_changes_paths(dgx4):
    faster = with_link_bandwidth(dgx4, "intra_node_bandwidth", 900e9)
    assert faster.path(0, 1).bandwidth == pytest.approx(900e9 * 0.8)
    assert faster.path(0, 8).bandwidth == pytest.approx(NIC_BW)  # other tiers untouched
    assert faster.span(tuple(range(8))).levels[0].bandwidth == pytest.approx(900e9 * 0.8)

    net = with_link_bandwidth(dgx4, "inter_node_bandwidth", 400e9 / 8)
    assert net.path(0, 8).bandwidth == pytest.approx(400e9 / 8 * 0.92)
    assert net.path(0, 1).bandwidth == pytest.approx(NVSWITCH_BW)

    host = with_link_bandwidth(dgx4, "host_link_bandwidth", 64e9)
    assert host.node_of(0).host_link.bandwidth == 64e9
    assert host.path(0, 1) == dgx4.path(0, 1)


def test_with_link_bandwidth_on_every_group(mixed):
    slow = with_link_bandwidth(mixed, "intra_node_bandwidth", 50e9)
    assert slow.path(0, 1).bandwidth == pytest.approx(50e9 * 0.8)
    assert slow.path(16, 17).bandwidth == pytest.approx(50e9 * 0.7)


def test_with_wan_bandwidth(wan):
    faster = with_link_bandwidth(wan, "wan_bandwidth", 1e9 / 8)
    assert faster.path(0, 1).bandwidth == pytest.approx(1e9 / 8 * 0.9)
    assert faster.path(0, 1).latency == pytest.approx(20e-3)


@pytest.mark.parametrize(
    "cluster_name, key, value",
    [
        ("dgx-a100-80g", "wan_bandwidth", 1e9),  # no WAN links
        ("dgx-a100-80g", "nvlink_bandwidth", 1e9),  # unknown key
        ("dgx-a100-80g", "intra_node_bandwidth", 0.0),
        ("dgx-a100-80g", "inter_node_bandwidth", -1e9),
    ],
)
def test_with_link_bandwidth_rejects(cluster_name, key, value):
    with pytest.raises(UserError):
        with_link_bandwidth(load_cluster(cluster_name), key, value)


def test_devices_of_a_site_share_its_wan_link():
    # Two sites of 4 devices each: an all-reduce over all 8 pushes the whole buffer through the one WAN
    # link once per phase, whatever the number of devices (every device's shard shares the link).
    from hwmodel import load_device
    from simulator.cost.collectives import collective_time

    two = load_cluster("two-sites-wan")
    node = two.node_groups[0].node.model_copy(update={"num_devices": 4, "device": load_device("cpu")})
    groups = [g.model_copy(update={"node": node}) for g in two.node_groups]
    cluster = two.replaced(node_groups=tuple(groups))
    wan = cluster.wan[0].link.effective_bandwidth
    nbytes = 1e8
    time = collective_time("all_reduce", nbytes, cluster.span(range(8)))
    latency = 2 * 3 * cluster.wan[0].link.latency  # two phases of min(7, log2 8) = 3 steps
    assert time == pytest.approx(nbytes / wan + latency, rel=0.01)  # the intra-host phases are tiny beside it
    assert time >= nbytes / wan


def test_devices_per_node_resizes_every_node():
    cluster = load_cluster("cpu-local", devices_per_node=4)
    assert cluster.num_devices == 4 and cluster.num_nodes == 1
    assert load_cluster("dgx-a100-80g", nodes=2, devices_per_node=4).num_devices == 8
    with pytest.raises(UserError, match="devices-per-node"):
        load_cluster("cpu-local", devices_per_node=0)
