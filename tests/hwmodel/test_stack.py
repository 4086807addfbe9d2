"""Software stacks: loading, validation, and how a stack folds into a device (hwmodel.stack)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hwmodel.catalog import load_device, load_stack, stack_names
from hwmodel.curves import EfficiencyCurve
from hwmodel.errors import SpecError, UnknownNameError
from hwmodel.stack import KernelFactors, StackSpec, apply_stack, multiply

FACTOR = st.floats(min_value=0.05, max_value=1.0)


def test_the_catalog_lists_the_five_stacks_and_each_loads():
    assert {"megatron-lm", "deepspeed", "torchtitan", "llm-foundry", "hetplan"} <= set(stack_names())
    for name in stack_names():
        stack = load_stack(name)
        assert stack.name == name and "none" in stack.recompute_policies


def test_an_unknown_stack_names_the_ones_there_are():
    with pytest.raises(UnknownNameError) as info:
        load_stack("megatron")
    assert "megatron-lm" in str(info.value)


def test_a_typo_in_a_stack_file_is_an_error(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nkernels:\n  matrix_eficiency: 0.5\n")
    with pytest.raises(SpecError) as info:
        load_stack(str(path))
    assert "matrix_eficiency" in str(info.value)


def test_a_neutral_stack_leaves_the_device_as_it_is():
    device = load_device("a100-80g")
    same = apply_stack(device, StackSpec(name="neutral"))
    for size in (1e7, 1e8, 3e9, 1e11):
        assert same.compute.matrix_efficiency(size) == pytest.approx(device.compute.matrix_efficiency(size))
    assert same.compute.comm_overlap_slowdown == device.compute.comm_overlap_slowdown
    assert same.memory.reserved == device.memory.reserved


@given(FACTOR, FACTOR)
def test_the_product_of_two_curves_is_exact_at_their_points(a, b):
    left = EfficiencyCurve(sizes=(1e8, 1e10), efficiencies=(a, 1.0))
    right = EfficiencyCurve.flat(b)
    product = multiply(left, right)
    for size in left.sizes:
        assert product(size) == pytest.approx(min(1.0, left(size) * b))


def test_per_device_factors_replace_the_general_ones():
    stack = StackSpec(
        name="s",
        kernels=KernelFactors(matrix_efficiency=EfficiencyCurve.flat(0.5)),
        devices={"a100-80g": KernelFactors(matrix_efficiency=EfficiencyCurve.flat(0.25))},
    )
    a100, h100 = load_device("a100-80g"), load_device("h100-sxm")
    assert apply_stack(a100, stack).compute.matrix_efficiency(1e12) == pytest.approx(
        0.25 * a100.compute.matrix_efficiency(1e12)
    )
    assert apply_stack(h100, stack).compute.matrix_efficiency(1e12) == pytest.approx(
        0.5 * h100.compute.matrix_efficiency(1e12)
    )


def test_device_files_of_the_fitted_families_carry_no_framework_figures():
    # The llm-foundry-fitted triton kernel and overlap slowdown live in the llm-foundry stack now.
    for name in ("a100-40g", "a100-80g", "a800-80g", "h100-sxm", "h100-pcie", "h200", "h800"):
        device = load_device(name)
        assert device.compute.triton_attention_efficiency is None
        assert device.compute.comm_overlap_slowdown == 0.0
        assert not any("llm-foundry" in text for text in device.sources.values())
        assert name in load_stack("llm-foundry").devices
