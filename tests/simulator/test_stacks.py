"""The stack as an input of a prediction: it changes what it should, names itself, and a faster kernel or
collective never slows an iteration under any stack."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hwmodel.catalog import load_cluster, load_stack, stack_names
from hwmodel.curves import EfficiencyCurve
from hwmodel.errors import UserError
from hwmodel.stack import KernelFactors
from simulator.analytic import evaluate
from simulator.plan import Plan
from simulator.stacks import DEFAULT_STACK, stacked_cluster
from workloads.config import WorkloadConfig

WORKLOAD = WorkloadConfig(
    name="small",
    family="gpt",
    num_layers=4,
    hidden_size=1024,
    ffn_hidden_size=4096,
    num_heads=16,
    vocab_size=32000,
    seq_len=1024,
    dropout=False,
)
PLAN = Plan(tp=2, dp=4, dp_type="zero3", micro_batch=2, global_batch=32)


def cluster():
    return load_cluster("dgx-a100-80g")


def test_two_stacks_that_differ_predict_differently_and_name_themselves():
    megatron = evaluate(PLAN.model_copy(update={"stack": "megatron-lm"}), WORKLOAD, cluster())
    hetplan = evaluate(PLAN.model_copy(update={"stack": "hetplan"}), WORKLOAD, cluster())
    assert (megatron.stack, hetplan.stack) == ("megatron-lm", "hetplan")
    # megatron-lm's GEMM factor is below 1, hetplan's is 1: the same plan runs slower under megatron-lm.
    assert megatron.iteration_time_s > hetplan.iteration_time_s
    # Memory does not depend on kernel speed: the two stacks differ only where they differ.
    assert megatron.peak_memory_bytes == pytest.approx(hetplan.peak_memory_bytes)


def test_a_plan_without_a_stack_assumes_the_default_and_says_so():
    report = evaluate(PLAN, WORKLOAD, cluster())
    assert report.stack == DEFAULT_STACK and report.plan.stack is None


def test_an_already_stacked_cluster_is_not_stacked_twice():
    stack = load_stack("megatron-lm")
    once = stacked_cluster(cluster(), stack)
    named = evaluate(PLAN.model_copy(update={"stack": "megatron-lm"}), WORKLOAD, cluster())
    carried = evaluate(PLAN, WORKLOAD, once)
    assert carried.stack == "megatron-lm"
    assert carried.iteration_time_s == pytest.approx(named.iteration_time_s)


def test_a_recompute_policy_the_named_stack_lacks_is_refused_by_name():
    plan = PLAN.model_copy(update={"stack": "llm-foundry", "recompute": "selective"})
    with pytest.raises(UserError) as info:
        evaluate(plan, WORKLOAD, cluster())
    assert "selective" in str(info.value) and "none, full" in str(info.value)


@settings(max_examples=15, deadline=None)
@given(
    st.sampled_from(sorted(stack_names())),
    st.floats(min_value=0.1, max_value=0.9),
    st.floats(min_value=1.0, max_value=2.0),
    st.floats(min_value=0.0, max_value=1.0),
)
def test_a_faster_kernel_or_collective_never_slows_an_iteration(name, gemm, speedup, sigma):
    base = load_stack(name)
    slow = base.model_copy(
        update={
            "kernels": KernelFactors(matrix_efficiency=EfficiencyCurve.flat(gemm), comm_overlap_slowdown=sigma),
            "devices": {},
        }
    )
    fast_kernels = KernelFactors(
        matrix_efficiency=EfficiencyCurve.flat(min(1.0, gemm * speedup)), comm_overlap_slowdown=sigma / speedup
    )
    fast = base.model_copy(update={"kernels": fast_kernels, "devices": {}})
    t_slow = evaluate(PLAN, WORKLOAD, stacked_cluster(cluster(), slow)).iteration_time_s
    t_fast = evaluate(PLAN, WORKLOAD, stacked_cluster(cluster(), fast)).iteration_time_s
    assert t_fast <= t_slow * (1 + 1e-12)


def test_validate_megatron_meets_its_bars(simulate):
    result = simulate("validate", "megatron", "--json")
    assert result.code == 0, result.err
    summary = json.loads(result.out)
    assert len(summary["rows"]) == 10 and summary["stack"] == "megatron-lm"
    assert summary["mean_abs_pct_error"] <= 3
    assert summary["predicted_not_to_fit"] == 0


def test_run_with_an_unknown_stack_exits_2_naming_it(simulate):
    result = simulate("run", "-w", "gpt3-1.3b", "-c", "dgx-a100-80g", "--stack", "megatron", "-e", "analytic")
    assert result.code == 2 and "megatron-lm" in result.err


def test_run_names_the_stack_in_its_header_and_json(simulate):
    result = simulate(
        "run", "-w", "gpt3-1.3b", "-c", "dgx-a100-80g", "--stack", "torchtitan", "-e", "analytic", "--json"
    )
    assert result.code == 0 and json.loads(result.out)["stack"] == "torchtitan"
    human = simulate("run", "-w", "gpt3-1.3b", "-c", "dgx-a100-80g", "-e", "analytic")
    assert human.code == 0 and f"stack {DEFAULT_STACK} (default)" in " ".join(human.out.split())
