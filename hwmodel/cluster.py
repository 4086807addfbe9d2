"""Nodes, clusters and topology queries.

A cluster is a list of node groups (count x node spec), so mixed GPU types are natural: two nodes of
8x A100 next to two nodes of 8x V100 are two groups. Nodes of one site share an inter-node network;
sites are joined by WAN links. Devices get global ranks in order: group by group, node by node, local
index within the node.

Topology queries answer what the cost model needs: the path (tier, bandwidth, latency) between two
devices, and, for a group of devices, how it spreads over the tiers (devices per node, nodes per site,
sites), which is what a hierarchical collective runs over.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from functools import cached_property
from typing import Any

from pydantic import Field, model_validator

from hwmodel.components import DeviceSpec, Frozen, HostSpec, LinkKind, LinkSpec, StorageSpec
from hwmodel.errors import UnknownNameError, UserError
from hwmodel.fields import Int, Name, Text
from hwmodel.units import NonNegativeSeconds

# Sizes no real cluster reaches (the largest have about 100,000 accelerators; a node holds at most a few dozen),
# checked before the rank tables are built: 10**12 nodes would be a MemoryError, not an answer.
MAX_DEVICES = 2**20
MAX_DEVICES_PER_NODE = 4096
MAX_GROUPS = 10_000


def too_many_devices(count: int) -> str:
    return f"the cluster would have {count} devices; accepted: at most {MAX_DEVICES}"


class Tier(IntEnum):
    """How far apart two devices are; larger is slower."""

    DEVICE = 0
    NODE = 1
    SITE = 2
    WAN = 3


class NodeSpec(Frozen):
    """One server: `num_devices` identical devices, their fabric, the host, storage and NICs."""

    name: Name = ""
    device: DeviceSpec
    num_devices: Int = Field(gt=0, le=MAX_DEVICES_PER_NODE)
    intra_node: LinkSpec = Field(description="device-to-device bandwidth inside the node, per device")
    host_link: LinkSpec = Field(description="device-to-host link (PCIe), per device")
    network: LinkSpec | None = Field(None, description="NICs to other nodes; `ports` NICs per node")
    host: HostSpec
    storage: StorageSpec | None = None


class NodeGroup(Frozen):
    name: Name
    count: Int = Field(gt=0, le=MAX_DEVICES)
    node: NodeSpec
    site: Name = "site0"


class WanLink(Frozen):
    """A wide-area link between two sites; bandwidth is per direction, latency one-way."""

    sites: tuple[Name, Name]
    link: LinkSpec


@dataclass(frozen=True)
class DeviceLocation:
    rank: int
    group: int
    node: int  # global node index
    local: int
    site: str


@dataclass(frozen=True)
class Path:
    tier: Tier
    bandwidth: float  # achievable bytes/s one direction
    latency: float  # seconds, one way


@dataclass(frozen=True)
class Level:
    """One tier of a hierarchical collective: `fanout` peers exchanging over `bandwidth` each.

    `fits` holds (kind, bandwidth, latency) for collective kinds the link has measured figures for.
    """

    tier: Tier
    fanout: int
    bandwidth: float
    latency: float
    fits: tuple[tuple[str, float, float], ...] = ()

    def bandwidth_for(self, kind: str) -> float:
        for name, bandwidth, _ in self.fits:
            if name == kind:
                return bandwidth
        return self.bandwidth

    def latency_for(self, kind: str) -> float:
        for name, _, latency in self.fits:
            if name == kind:
                return latency
        return self.latency


def _fits(
    links: list[LinkSpec], share: float = 1.0, extra_latency: float = 0.0
) -> tuple[tuple[str, float, float], ...]:
    """Per-kind figures of a level crossing `links` (the slowest link wins); bandwidth x `share`."""
    kinds = sorted({kind for link in links for kind in link.collectives})
    out = []
    for kind in kinds:
        achieved = [link.achieved(kind) for link in links]
        out.append((kind, min(bw for bw, _ in achieved) * share, max(lat for _, lat in achieved) + extra_latency))
    return tuple(out)


@dataclass(frozen=True)
class GroupSpan:
    """How a device group spreads over the tiers, innermost first. Levels with fanout 1 are omitted."""

    size: int
    levels: tuple[Level, ...]

    @property
    def slowest(self) -> Tier:
        return max((lvl.tier for lvl in self.levels), default=Tier.DEVICE)


class ClusterSpec(Frozen):
    """A whole cluster: node groups, the inter-node fabric latency, and WAN links between sites."""

    name: Name
    description: Text = ""
    node_groups: tuple[NodeGroup, ...] = Field(max_length=MAX_GROUPS)
    network_latency: NonNegativeSeconds = Field(
        0.0, description="switch fabric latency added to every inter-node hop, one way"
    )
    wan: tuple[WanLink, ...] = Field((), max_length=MAX_GROUPS)
    sources: dict[Name, Text] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> ClusterSpec:
        if not self.node_groups:
            raise ValueError("a cluster needs at least one node group")
        names = [g.name for g in self.node_groups]
        if len(set(names)) != len(names):
            raise ValueError(f"node group names must be unique, got {names}")
        num_nodes = sum(g.count for g in self.node_groups)
        num_devices = sum(g.count * g.node.num_devices for g in self.node_groups)
        if num_devices > MAX_DEVICES:
            raise ValueError(too_many_devices(num_devices))
        sites = {g.site for g in self.node_groups}
        for wan in self.wan:
            for site in wan.sites:
                if site not in sites:
                    raise ValueError(f"wan link names site {site!r}, but the node groups have sites {sorted(sites)}")
        if len(sites) > 1:
            for a in sorted(sites):
                for b in sorted(sites):
                    if a < b and self._wan(a, b) is None:
                        raise ValueError(f"sites {a!r} and {b!r} have no wan link between them")
        multi_node = [g.name for g in self.node_groups if g.node.network is None]
        if num_nodes > 1 and multi_node:
            raise ValueError(f"node groups {multi_node} have no 'network', but the cluster has {num_nodes} nodes")
        return self

    @cached_property
    def topology(self) -> _Topology:
        """Plain-Python index of ranks, nodes and group spans (cached: queries sit on hot paths)."""
        return _Topology(self)

    # ---- sizes -------------------------------------------------------------------------------
    @property
    def num_devices(self) -> int:
        return self.topology.num_devices

    @property
    def num_nodes(self) -> int:
        return len(self.topology.nodes)

    @property
    def sites(self) -> list[str]:
        return sorted({g.site for g in self.node_groups})

    def location(self, rank: int) -> DeviceLocation:
        topo = self.topology
        if not 0 <= rank < topo.num_devices:
            raise UserError(f"device rank {rank} is outside cluster {self.name!r} (ranks 0..{topo.num_devices - 1})")
        return topo.locations[rank]

    def node_of(self, rank: int) -> NodeSpec:
        return self.topology.nodes[self.location(rank).node]

    def device(self, rank: int) -> DeviceSpec:
        return self.node_of(rank).device

    def device_types(self) -> list[str]:
        """Distinct device names, in rank order."""
        seen: dict[str, None] = {}
        for group in self.node_groups:
            seen.setdefault(group.node.device.name, None)
        return list(seen)

    @property
    def is_homogeneous(self) -> bool:
        return len(self.node_groups) == 1 and len(self.sites) == 1

    def with_num_nodes(self, num_nodes: int) -> ClusterSpec:
        """The same cluster with `num_nodes` nodes; only for clusters made of one kind of node."""
        if num_nodes <= 0:
            raise UserError(f"--nodes must be a positive integer, got {num_nodes}")
        if len(self.node_groups) != 1:
            raise UserError(
                f"cluster {self.name!r} has {len(self.node_groups)} node groups "
                f"({', '.join(g.name for g in self.node_groups)}); --nodes only applies to a cluster of identical nodes"
            )
        if num_nodes * self.node_groups[0].node.num_devices > MAX_DEVICES:
            raise UserError(
                f"--nodes {num_nodes}: {too_many_devices(num_nodes * self.node_groups[0].node.num_devices)}"
            )
        return self.replaced(node_groups=(self.node_groups[0].model_copy(update={"count": num_nodes}),))

    def with_devices_per_node(self, num_devices: int) -> ClusterSpec:
        """The same cluster with `num_devices` devices in each node (e.g. 4 CPU ranks on `cpu-local`)."""
        if num_devices <= 0:
            raise UserError(f"--devices-per-node must be a positive integer, got {num_devices}")
        if num_devices > MAX_DEVICES_PER_NODE:
            raise UserError(f"--devices-per-node {num_devices}: accepted: 1 to {MAX_DEVICES_PER_NODE}")
        total = num_devices * sum(g.count for g in self.node_groups)
        if total > MAX_DEVICES:
            raise UserError(f"--devices-per-node {num_devices}: {too_many_devices(total)}")
        groups = tuple(
            g.model_copy(update={"node": g.node.model_copy(update={"num_devices": num_devices})})
            for g in self.node_groups
        )
        return self.replaced(node_groups=groups)

    def replaced(self, **changes: Any) -> ClusterSpec:
        """A new, validated cluster with some fields changed (`model_copy` would skip validation and keep
        this cluster's cached topology)."""
        fields = {name: getattr(self, name) for name in type(self).model_fields}
        fields.update(changes)
        return ClusterSpec(**fields)

    def with_device(self, name: str, device: DeviceSpec) -> ClusterSpec:
        """The same cluster with every device called `name` replaced by `device` (what-if, calibration)."""
        if name not in self.device_types():
            raise UnknownNameError("device", name, self.device_types())
        groups = tuple(
            g.model_copy(update={"node": g.node.model_copy(update={"device": device})})
            if g.node.device.name == name
            else g
            for g in self.node_groups
        )
        return self.replaced(node_groups=groups)

    # ---- topology ---------------------------------------------------------------------------
    def _wan(self, a: str, b: str) -> LinkSpec | None:
        for wan in self.wan:
            if set(wan.sites) == {a, b}:
                return wan.link
        return None

    def _inter_node_per_device(self, node: NodeSpec) -> float:
        # Rail-optimized fabrics give each device its share of the node's NICs.
        assert node.network is not None
        return node.network.aggregate_bandwidth / node.num_devices

    def path(self, a: int, b: int) -> Path:
        """Tier, achievable bandwidth (bytes/s, one direction) and one-way latency from device a to b."""
        la, lb = self.location(a), self.location(b)
        if a == b:
            return Path(Tier.DEVICE, float("inf"), 0.0)
        nodes = self.topology.nodes
        na, nb = nodes[la.node], nodes[lb.node]
        if la.node == lb.node:
            return Path(Tier.NODE, *na.intra_node.achieved("send_recv"))
        if la.site == lb.site:
            assert na.network is not None and nb.network is not None
            (bw_a, lat_a), (bw_b, lat_b) = na.network.achieved("send_recv"), nb.network.achieved("send_recv")
            return Path(Tier.SITE, min(bw_a, bw_b), max(lat_a, lat_b) + self.network_latency)
        wan = self._wan(la.site, lb.site)
        assert wan is not None
        return Path(Tier.WAN, *wan.achieved("send_recv"))

    def span(self, ranks: Sequence[int]) -> GroupSpan:
        """How a device group spreads over nodes and sites, as levels of a hierarchical collective.

        Each level says how many peers exchange at that tier and the bandwidth each device gets there.
        A group with 4 devices on each of 2 nodes has levels (NODE, 4, intra-node bw) and (SITE, 2, NIC
        share per device).
        """
        # A range hashes in O(1); planners ask for the same consecutive groups over and over.
        key = ranks if isinstance(ranks, range) else tuple(ranks)
        cache = self.topology.span_cache
        cached = cache.get(key)
        if cached is not None:
            return cached
        locs = [self.location(r) for r in key]
        by_node: dict[int, int] = {}
        by_site_nodes: dict[str, set[int]] = {}
        by_site_devices: dict[str, int] = {}
        for loc in locs:
            by_node[loc.node] = by_node.get(loc.node, 0) + 1
            by_site_nodes.setdefault(loc.site, set()).add(loc.node)
            by_site_devices[loc.site] = by_site_devices.get(loc.site, 0) + 1
        nodes = [self.topology.nodes[n] for n in by_node]
        levels = []
        per_node = max(by_node.values())
        if per_node > 1:
            levels.append(
                Level(
                    Tier.NODE,
                    per_node,
                    min(n.intra_node.effective_bandwidth for n in nodes),
                    max(n.intra_node.latency for n in nodes),
                    _fits([n.intra_node for n in nodes]),
                )
            )
        nodes_per_site = max(len(v) for v in by_site_nodes.values())
        if nodes_per_site > 1:
            networks: list[LinkSpec] = []
            for n in nodes:
                assert n.network is not None  # validation gives every node of a multi-node cluster a network
                networks.append(n.network)
            share = min(network.ports / n.num_devices for network, n in zip(networks, nodes))
            levels.append(
                Level(
                    Tier.SITE,
                    nodes_per_site,
                    min(self._inter_node_per_device(n) for n in nodes),
                    max(network.latency for network in networks) + self.network_latency,
                    _fits(networks, share, self.network_latency),
                )
            )
        if len(by_site_nodes) > 1:
            sites = sorted(by_site_nodes)
            links = [self._wan(a, b) for a in sites for b in sites if a < b]
            # At this level every device of a site sends its shard at once: they share the site's link.
            share = max(by_site_devices.values())
            wan_links = [link for link in links if link]
            bandwidth = min(link.effective_bandwidth for link in wan_links) / share
            levels.append(
                Level(
                    Tier.WAN,
                    len(sites),
                    bandwidth,
                    max(link.latency for link in wan_links),
                    _fits(wan_links, 1.0 / share),
                )
            )
        span = GroupSpan(len(key), tuple(levels))
        # Intern: groups of the same shape share one object, so callers may key caches on its identity.
        span = self.topology.span_shapes.setdefault(span, span)
        cache[key] = span
        return span

    def slowest_tier(self, ranks: Sequence[int]) -> Path:
        """The slowest tier a device group spans, with the per-device bandwidth and latency there."""
        span = self.span(ranks)
        if not span.levels:
            return Path(Tier.DEVICE, float("inf"), 0.0)
        level = max(span.levels, key=lambda lvl: lvl.tier)
        return Path(level.tier, level.bandwidth, level.latency)

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "num_nodes": self.num_nodes,
            "num_devices": self.num_devices,
            "device_types": self.device_types(),
            "sites": self.sites,
        }


class _Topology:
    """Ranks laid out group by group, node by node; spans cached by device group."""

    def __init__(self, cluster: ClusterSpec):
        locations: list[DeviceLocation] = []
        nodes: list[NodeSpec] = []
        rank = 0
        for gi, group in enumerate(cluster.node_groups):
            for _ in range(group.count):
                node_index = len(nodes)
                nodes.append(group.node)
                for local in range(group.node.num_devices):
                    locations.append(DeviceLocation(rank, gi, node_index, local, group.site))
                    rank += 1
        self.locations: tuple[DeviceLocation, ...] = tuple(locations)
        self.nodes: tuple[NodeSpec, ...] = tuple(nodes)
        self.num_devices = len(locations)
        self.devices: tuple[DeviceSpec, ...] = tuple(nodes[loc.node].device for loc in locations)
        self.span_cache: dict[Sequence[int], GroupSpan] = {}
        self.span_shapes: dict[GroupSpan, GroupSpan] = {}
        self._peak_flops: dict[str, float] = {}

    def peak_flops(self, dtype: str) -> float:
        """Sum of every device's dense matrix peak for `dtype`."""
        if dtype not in self._peak_flops:
            self._peak_flops[dtype] = sum(d.compute.peak(dtype, "matrix") for d in self.devices)
        return self._peak_flops[dtype]


__all__ = [
    "ClusterSpec",
    "DeviceLocation",
    "GroupSpan",
    "Level",
    "LinkKind",
    "NodeGroup",
    "NodeSpec",
    "Path",
    "Tier",
    "WanLink",
]
