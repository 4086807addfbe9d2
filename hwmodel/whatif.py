"""What-if edits of a cluster: another link bandwidth, another device type, another node count.

Each returns a new, validated ClusterSpec; specs are immutable.
"""

from __future__ import annotations

from hwmodel.catalog import load_device
from hwmodel.cluster import ClusterSpec
from hwmodel.errors import UserError
from hwmodel.units import check_range

LINK_FIELDS = {
    "intra_node_bandwidth": "intra_node",
    "host_link_bandwidth": "host_link",
    "inter_node_bandwidth": "network",
}
WHATIF_KEYS = tuple(LINK_FIELDS) + ("wan_bandwidth", "device", "nodes")


def with_link_bandwidth(cluster: ClusterSpec, key: str, bandwidth: float) -> ClusterSpec:
    """Set one link tier's per-direction bandwidth (bytes/s) in every node group (or every WAN link)."""
    if bandwidth <= 0:
        raise UserError(f"{key} must be positive, got {bandwidth}")
    try:
        # The copies below skip validation, so the range a spec file is held to is checked here.
        check_range(f"{bandwidth:g} B/s", bandwidth, "bandwidth", positive=True)
    except UserError as exc:
        raise UserError(f"{key}: {exc}") from None
    if key == "wan_bandwidth":
        if not cluster.wan:
            raise UserError(f"cluster {cluster.name!r} has no WAN links to change")
        wan = tuple(
            w.model_copy(update={"link": w.link.model_copy(update={"bandwidth": bandwidth})}) for w in cluster.wan
        )
        return cluster.replaced(wan=wan)
    field = LINK_FIELDS.get(key)
    if field is None:
        raise UserError(f"unknown link {key!r}; accepted: {', '.join(list(LINK_FIELDS) + ['wan_bandwidth'])}")
    groups = []
    for group in cluster.node_groups:
        link = getattr(group.node, field)
        if link is None:
            raise UserError(f"node group {group.name!r} of cluster {cluster.name!r} has no {field} link")
        node = group.node.model_copy(update={field: link.model_copy(update={"bandwidth": bandwidth})})
        groups.append(group.model_copy(update={"node": node}))
    return cluster.replaced(node_groups=tuple(groups))


def with_device_everywhere(cluster: ClusterSpec, device_name: str) -> ClusterSpec:
    """Every node group with `device_name` devices instead (same node layout and links)."""
    device = load_device(device_name)
    groups = [g.model_copy(update={"node": g.node.model_copy(update={"device": device})}) for g in cluster.node_groups]
    return cluster.replaced(node_groups=tuple(groups))
