"""Hardware models: devices, hosts, storage, links, nodes and clusters, with units and topology queries."""

from hwmodel.catalog import cluster_names, device_names, load_cluster, load_device
from hwmodel.cluster import ClusterSpec, GroupSpan, Level, NodeGroup, NodeSpec, Path, Tier, WanLink
from hwmodel.components import ComputeSpec, DeviceSpec, HostSpec, LinkKind, LinkSpec, MemorySpec, StorageSpec
from hwmodel.curves import EfficiencyCurve
from hwmodel.errors import SpecError, UnknownNameError, UserError

__all__ = [
    "ClusterSpec",
    "ComputeSpec",
    "DeviceSpec",
    "EfficiencyCurve",
    "GroupSpan",
    "HostSpec",
    "Level",
    "LinkKind",
    "LinkSpec",
    "MemorySpec",
    "NodeGroup",
    "NodeSpec",
    "Path",
    "SpecError",
    "StorageSpec",
    "Tier",
    "UnknownNameError",
    "UserError",
    "WanLink",
    "cluster_names",
    "device_names",
    "load_cluster",
    "load_device",
]
