"""The spec catalog: named devices and clusters read from YAML.

Built-in specs ship in the `specs` package (`specs/devices/*.yaml`, `specs/clusters/*.yaml`,
`specs/stacks/*.yaml`). Extra
directories with the same layout can be added with the HETPLAN_SPECS environment variable (paths joined
by ':'). Anywhere a name is accepted, a path to a YAML file works too. Duplicate names are an error;
unknown names suggest the nearest ones. A cluster file names its devices (``device: a100-80g``) or
writes them inline.
"""

from __future__ import annotations

import os
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from hwmodel.cluster import ClusterSpec
from hwmodel.components import DeviceSpec
from hwmodel.errors import SpecError, UnknownNameError
from hwmodel.loading import read_mapping, validate
from hwmodel.stack import StackSpec

ENV_VAR = "HETPLAN_SPECS"


def spec_dirs() -> list[Path]:
    """Directories searched for specs, built-in first."""
    dirs = [Path(str(resources.files("specs")))]
    for extra in os.environ.get(ENV_VAR, "").split(os.pathsep):
        if extra.strip():
            dirs.append(Path(extra).expanduser())
    return dirs


def _looks_like_path(name: str) -> bool:
    return name.endswith((".yaml", ".yml", ".json")) or os.sep in name


@lru_cache(maxsize=8)
def _index(kind: str, dirs: tuple[Path, ...]) -> dict[str, Path]:
    """name -> file for every spec of `kind` ('devices', 'clusters' or 'stacks')."""
    index: dict[str, Path] = {}
    for directory in dirs:
        folder = directory / kind
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.y*ml")):
            data = read_mapping(path)
            name = data.get("name")
            if not isinstance(name, str) or not name:
                raise SpecError(f"{path}: name: every catalog spec needs a 'name'")
            if name in index:
                raise SpecError(
                    f"{path}: name: {name!r} is already defined in {index[name]}; catalog names must be unique"
                )
            index[name] = path
    return index


def device_names() -> list[str]:
    return sorted(_index("devices", tuple(spec_dirs())))


def cluster_names() -> list[str]:
    return sorted(_index("clusters", tuple(spec_dirs())))


def stack_names() -> list[str]:
    return sorted(_index("stacks", tuple(spec_dirs())))


def stack_file(name: str) -> Path:
    index = _index("stacks", tuple(spec_dirs()))
    if name not in index:
        raise UnknownNameError("stack", name, index)
    return index[name]


@lru_cache(maxsize=32)
def _load_stack_file(path: Path) -> StackSpec:
    return validate(StackSpec, read_mapping(path), str(path), {"strict_units": True})


def load_stack(name_or_path: str) -> StackSpec:
    """A software stack from the catalog by name (`specs/stacks/`), or from a YAML file."""
    if _looks_like_path(name_or_path):
        return _load_stack_file(Path(name_or_path))
    return _load_stack_file(stack_file(name_or_path))


def device_file(name: str) -> Path:
    index = _index("devices", tuple(spec_dirs()))
    if name not in index:
        raise UnknownNameError("device", name, index)
    return index[name]


def cluster_file(name: str) -> Path:
    index = _index("clusters", tuple(spec_dirs()))
    if name not in index:
        raise UnknownNameError("cluster", name, index)
    return index[name]


@lru_cache(maxsize=64)
def _load_device_file(path: Path) -> DeviceSpec:
    return validate(DeviceSpec, read_mapping(path), str(path), {"strict_units": True})


def load_device(name_or_path: str) -> DeviceSpec:
    """A device from the catalog by name, or from a YAML file."""
    if _looks_like_path(name_or_path):
        return _load_device_file(Path(name_or_path))
    return _load_device_file(device_file(name_or_path))


def _resolve_devices(data: dict[str, Any], source: str, base: Path | None = None) -> dict[str, Any]:
    """Replace ``device: NAME`` in node groups by the catalog's DeviceSpec; a path is read relative to
    the cluster file's folder (`base`)."""
    groups = data.get("node_groups")
    if not isinstance(groups, list):
        return data
    resolved = []
    for i, group in enumerate(groups):
        node = group.get("node") if isinstance(group, dict) else None
        if isinstance(node, dict) and isinstance(node.get("device"), str):
            name = node["device"]
            if base is not None and _looks_like_path(name) and not Path(name).is_absolute():
                name = str(base / name)
            try:
                device = load_device(name)
            except UnknownNameError as exc:
                raise SpecError(f"{source}: node_groups[{i}].node.device: {exc}") from None
            group = {**group, "node": {**node, "device": device}}
        resolved.append(group)
    return {**data, "node_groups": resolved}


@lru_cache(maxsize=64)
def _load_cluster_file(path: Path) -> ClusterSpec:
    data = _resolve_devices(read_mapping(path), str(path), path.parent)
    return validate(ClusterSpec, data, str(path), {"strict_units": True})


def load_cluster(name_or_path: str, nodes: int | None = None, devices_per_node: int | None = None) -> ClusterSpec:
    """A cluster from the catalog by name, or from a YAML file.

    Args:
        nodes: resize a cluster made of one kind of node to this many nodes.
        devices_per_node: give every node this many devices (e.g. ranks of a CPU box).
    """
    if _looks_like_path(name_or_path):
        cluster = _load_cluster_file(Path(name_or_path))
    else:
        cluster = _load_cluster_file(cluster_file(name_or_path))
    if nodes is not None:
        cluster = cluster.with_num_nodes(nodes)
    if devices_per_node is not None:
        cluster = cluster.with_devices_per_node(devices_per_node)
    return cluster


def clear_caches() -> None:
    """Forget loaded specs (tests that edit spec files or HETPLAN_SPECS call this)."""
    _index.cache_clear()
    _load_device_file.cache_clear()
    _load_cluster_file.cache_clear()
    _load_stack_file.cache_clear()
