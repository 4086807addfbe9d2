"""What-if sweeps of `simulate search angel-ptm`: rerun the search once per value of one node field (SSD
drives and bandwidth, PCIe generation or host-link bandwidth, host memory) or of the prefetch depth."""

from __future__ import annotations

from dataclasses import dataclass

from hwmodel.cluster import ClusterSpec
from hwmodel.errors import UserError
from hwmodel.units import check_range, parse_quantity
from hwmodel.whatif import with_link_bandwidth
from simulator.errors import InfeasiblePlan
from simulator.search.angel_ptm.search import (
    AngelReport,
    search_angel,
    single_node,
)
from simulator.search.result import SearchResult
from workloads.config import WorkloadConfig

# PCIe x16 per direction, rounded as the brief and vendors quote it: gen3 ~16, gen4 ~32, gen5 ~64 GB/s.
PCIE_GEN_BANDWIDTH = {3: 16e9, 4: 32e9, 5: 64e9}
SWEEP_KEYS = {
    "ssd_drives": "NVMe drives per node (capacity and bandwidth scale with the count)",
    "ssd_read_bandwidth": "read bandwidth per drive, e.g. 3.5GB/s",
    "ssd_write_bandwidth": "write bandwidth per drive, e.g. 3GB/s",
    "pcie_gen": "3, 4 or 5: host link per GPU of 16, 32 or 64 GB/s per direction (x16)",
    "host_link_bandwidth": "host link per GPU per direction, e.g. 32GB/s",
    "host_memory": "host DRAM per node, e.g. 1TiB",
    "prefetch_depth": "the deepest prefetch the search may choose (max-model still sizes at depth 1)",
}
SWEEP_HELP = "; ".join(f"{k}: {v}" for k, v in SWEEP_KEYS.items())


def parse_sweep(text: str) -> tuple[str, list[str]]:
    """(key, values) of `KEY=V1,V2,...`; a bandwidth's or size's last unit applies to bare numbers before it."""
    if "=" not in text:
        raise UserError(f"--sweep: expected KEY=V1,V2,...; got {text!r} (e.g. 'ssd_drives=1,2,4,8')")
    key, values = (part.strip() for part in text.split("=", 1))
    if key == "page_size":
        # Pages are scheduled per operator in costs.py, so no figure depends on the page size: a sweep of it
        # would print identical rows and suggest it does not matter when it is simply not modelled.
        raise UserError(
            f"--sweep: page_size is not modelled by the angel-ptm cost model; accepted: {', '.join(SWEEP_KEYS)}"
        )
    if key not in SWEEP_KEYS:
        raise UserError(f"--sweep: unknown key {key!r}; accepted: {', '.join(SWEEP_KEYS)}")
    items = [v.strip() for v in values.split(",") if v.strip()]
    if not items:
        raise UserError(f"--sweep: no values given for {key}")
    if key in ("ssd_drives", "pcie_gen", "prefetch_depth"):
        allowed = {"ssd_drives": "positive integers", "pcie_gen": "3, 4 or 5", "prefetch_depth": "integers >= 0"}
        bad = [v for v in items if not v.isdigit() or not _int_ok(key, int(v))]
        if bad:
            raise UserError(f"--sweep: {key} takes {allowed[key]}; got {', '.join(repr(v) for v in bad)}")
        return key, items
    unit = "".join(ch for ch in items[-1] if not (ch.isdigit() or ch in ". "))
    items = [v if any(c.isalpha() for c in v) else v + unit for v in items]
    dimension = "bytes" if key == "host_memory" else "bandwidth"
    for v in items:  # every value is read before the first search, so a typo costs nothing
        quantity(key, v, dimension)
    return key, items


def _int_ok(key: str, value: int) -> bool:
    if key == "pcie_gen":
        return value in PCIE_GEN_BANDWIDTH
    return value >= (0 if key == "prefetch_depth" else 1)


def quantity(key: str, text: str, dimension: str) -> float:
    """`text` as a positive quantity of `dimension`, in range; errors name the key."""
    try:
        number = parse_quantity(text, dimension, allow_bare_number=False)
        check_range(text, number, dimension, positive=True)
    except UserError as exc:
        raise UserError(f"--sweep {key}: {exc}") from None
    return number


def with_value(cluster: ClusterSpec, key: str, value: str) -> ClusterSpec:
    """`cluster` (one node) with the swept node field set to `value`; prefetch_depth leaves it alone."""
    node = single_node(cluster)
    if key == "pcie_gen":
        return with_link_bandwidth(cluster, "host_link_bandwidth", PCIE_GEN_BANDWIDTH[int(value)])
    if key == "host_link_bandwidth":
        return with_link_bandwidth(cluster, key, quantity(key, value, "bandwidth"))
    if key == "host_memory":
        node = node.model_copy(update={"host": node.host.model_copy(update={"memory": quantity(key, value, "bytes")})})
    elif key.startswith("ssd_"):
        storage = node.storage
        if storage is None:
            raise UserError(f"--sweep {key}: cluster {cluster.name!r} has no storage to change")
        drives = storage.drives
        if key == "ssd_drives":
            scale = int(value) / drives  # the volume is `drives` identical drives; add or remove some
            update = {
                "drives": int(value),
                "capacity": storage.capacity * scale,
                "read_bandwidth": storage.read_bandwidth * scale,
                "write_bandwidth": storage.write_bandwidth * scale,
            }
        else:
            field = "read_bandwidth" if key == "ssd_read_bandwidth" else "write_bandwidth"
            update = {field: quantity(key, value, "bandwidth") * drives}
        node = node.model_copy(update={"storage": storage.model_copy(update=update)})
    elif key != "prefetch_depth":
        raise UserError(f"--sweep: unknown key {key!r}; accepted: {', '.join(SWEEP_KEYS)}")
    group = cluster.node_groups[0].model_copy(update={"node": node})
    return cluster.replaced(node_groups=(group,))


def search_depth_capped(wl: WorkloadConfig, cluster: ClusterSpec, objective: str, top: int, depth: int) -> SearchResult:
    """`search_angel` with every system's prefetch depth limited to 1..`depth` (0 alone when `depth` is 0)."""
    return search_angel(wl, cluster, objective, top, depths=range(1, depth + 1) if depth > 0 else range(1))


@dataclass(frozen=True)
class SweepPoint:
    """One value of the sweep: its search result, or why the search found nothing."""

    key: str
    value: str
    result: SearchResult | None
    reason: str | None = None

    def to_dict(self) -> dict[str, object]:
        if self.result is None:
            return {"sweep": {"key": self.key, "value": self.value}, "infeasible": self.reason}
        data = self.result.model_dump(mode="json")
        data["details"]["sweep"] = {"key": self.key, "value": self.value}
        return data


def run_sweep(
    wl: WorkloadConfig, cluster: ClusterSpec, objective: str, top: int, key: str, values: list[str]
) -> list[SweepPoint]:
    """The search once per value; a value under which nothing fits is a row, not the end of the sweep."""
    points = []
    for value in values:
        try:
            if key == "prefetch_depth":
                result = search_depth_capped(wl, cluster, objective, top, int(value))
            else:
                result = search_angel(wl, with_value(cluster, key, value), objective, top)
        except InfeasiblePlan as exc:
            points.append(SweepPoint(key, value, None, str(exc)))
            continue
        points.append(SweepPoint(key, value, result))
    return points


def binding(report: AngelReport) -> str:
    """The resource whose time sets the step: compute, PCIe, SSD, or the CPU optimizer step."""
    times = {"compute": report.compute_s, "pcie": report.pcie_s, "ssd": report.ssd_s, "cpu-step": report.cpu_step_s}
    return max(times, key=lambda k: times[k])
