"""What several test modules share that is not a fixture: the repository root, a CLI run's outcome and the
test clusters of tests/specs (figures the tests chose, so their expected numbers are worked out by hand)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hwmodel import ClusterSpec, load_cluster

REPO_ROOT = Path(__file__).resolve().parents[1]
TOY_SPECS = Path(__file__).resolve().parent / "specs"


def toy_cluster(name: str, nodes: int | None = None, devices_per_node: int | None = None) -> ClusterSpec:
    """A test cluster of tests/specs (toy-fabric, toy-mixed, toy-wan), resized like `load_cluster`."""
    return load_cluster(str(TOY_SPECS / f"{name}.yaml"), nodes=nodes, devices_per_node=devices_per_node)


@dataclass
class CliResult:
    """Exit status, stdout and stderr of one in-process run of a console entry point."""

    code: int
    out: str
    err: str
