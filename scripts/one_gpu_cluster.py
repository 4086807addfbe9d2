"""Write a one-GPU cluster spec for the GPU this machine has: `python scripts/one_gpu_cluster.py OUT.yaml`.

The node is a one-device cut of `dgx-h100` with the catalog device matching the GPU's name, so MFU and
predictions use that device's peaks; unknown GPUs fall back to h100-sxm, said on stdout. The host memory
is 60% of this machine's RAM, not the DGX's 2 TiB: MEMO's alpha is bounded by the host memory that really
holds the swapped activations, and pinned pages cannot be swapped out, so the process, the data and the
page cache keep the rest.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hwmodel.catalog import cluster_file

# Substrings of torch.cuda.get_device_name, most specific first.
_RULES = [
    ("H200", "h200"),
    ("H800", "h800"),
    ("H100 PCIE", "h100-pcie"),
    ("H100", "h100-sxm"),
    ("B200", "b200"),
    ("A800", "a800-80g"),
    ("A100", None),
    ("L40S", "l40s"),
    ("A10", "a10"),
    ("4090", "rtx-4090"),
    ("3090", "rtx-3090"),
    ("TITAN RTX", "titan-rtx"),
    ("V100", "v100-32g"),
    ("MI300X", "mi300x"),
    ("MI250X", "mi250x"),
]


def catalog_device(name: str, memory_gib: float) -> str | None:
    upper = name.upper()
    for key, device in _RULES:
        if key in upper:
            return device or ("a100-80g" if memory_gib > 48 else "a100-40g")
    return None


HOST_SHARE = 0.6


def host_memory_bytes() -> int:
    return int(HOST_SHARE * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def main(out: str) -> None:
    name = torch.cuda.get_device_name(0)
    memory_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    device = catalog_device(name, memory_gib)
    if device is None:
        device = "h100-sxm"
        print(f"note: no catalog device for {name!r}; using h100-sxm peaks for MFU and the prediction")
    data = yaml.safe_load(cluster_file("dgx-h100").read_text())
    data["name"] = f"one-{device}"
    data["description"] = f"one {name} ({memory_gib:.0f} GiB) as found on this machine"
    node = data["node_groups"][0]["node"]
    data["node_groups"][0]["count"] = 1
    node["device"] = device
    node["num_devices"] = 1
    node["host"]["memory"] = f"{host_memory_bytes() / 2**30:.0f} GiB"
    node["host"]["num_cores"] = os.cpu_count() or 1
    data.setdefault("sources", {})["host"] = f"{HOST_SHARE:.0%} of this machine's RAM, its cores (os.sysconf) [M]"
    Path(out).write_text(yaml.safe_dump(data, sort_keys=False))
    print(f"GPU: {name} ({memory_gib:.0f} GiB) -> catalog device {device}; host memory {node['host']['memory']}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/one_gpu_cluster.py OUT.yaml")
    main(sys.argv[1])
