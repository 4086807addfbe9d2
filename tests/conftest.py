"""Shared fixtures: catalog specs are loaded once per session (they are immutable)."""

from __future__ import annotations

import pytest

from hwmodel import load_cluster
from workloads import load_workload


@pytest.fixture(scope="session")
def dgx_a100():
    return load_cluster("dgx-a100-80g")


@pytest.fixture(scope="session")
def llama7b():
    return load_workload("llama2-7b")


@pytest.fixture(scope="session")
def gpt_medium():
    return load_workload("gpt3-350m")
