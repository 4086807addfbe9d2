"""Device memory in the catalog is what the driver reports, not the datasheet's "GB" read as decimal.

HBM sizes in datasheets are binary-ish: an "80 GB" H100 reports 81559 MiB (79.6 GiB) to nvidia-smi and a
"141 GB" H200 reports 143771 MiB (140.4 GiB), not 131 GiB. So each GPU's capacity lies at most a few percent
below the datasheet figure read as GiB, and never above it; and its source names where the figure comes from.
"""

from __future__ import annotations

import pytest

from hwmodel.catalog import load_device

# The memory each datasheet prints, in its own "GB" (MI250X: per GCD, the device software sees).
DATASHEET_GB = {
    "a100-40g": 40,
    "a100-80g": 80,
    "a800-80g": 80,
    "h100-sxm": 80,
    "h100-pcie": 80,
    "h800": 80,
    "h200": 141,
    "b200": 180,
    "mi300x": 192,
    "mi250x": 64,
    "v100-32g": 32,
}


@pytest.mark.parametrize("name", sorted(DATASHEET_GB))
def test_capacity_is_the_binary_reading_of_the_datasheet_less_a_little(name):
    capacity = load_device(name).memory.capacity
    binary = DATASHEET_GB[name] * 2**30
    assert 0.97 * binary <= capacity <= binary, f"{name}: {capacity / 2**30:.2f} GiB for {DATASHEET_GB[name]} GB"
    assert capacity > 1.03 * DATASHEET_GB[name] * 1e9  # not the decimal reading


@pytest.mark.parametrize("name", sorted(DATASHEET_GB))
def test_capacity_source_says_where_the_figure_comes_from(name):
    source = load_device(name).sources["memory.capacity"]
    assert "MiB" in source or "GiB" in source, source  # the driver's figure, not only the datasheet's
    assert any(tag in source for tag in ("[V]", "[M]", "[E")), source
