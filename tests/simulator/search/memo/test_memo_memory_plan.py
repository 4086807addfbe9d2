"""MEMO's bi-level memory plan (simulator.search.memo.memory_plan): placements are valid, the MIP is never worse
than greedy best-fit and never below the lower bound, time limits return the best found, the transformer
tensor builder matches the workload's saved bytes, and the model plan reuses addresses across layers."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hwmodel.errors import UserError
from simulator.search.memo.memory_plan import (
    GREEDY_NOT_STACKABLE,
    OPTIMAL,
    TIME_LIMIT,
    LayerMemoryPlan,
    LayerTensors,
    MemoryPlanError,
    TensorLife,
    check_plan,
    greedy_best_fit,
    lower_bound,
    online_best_fit,
    plan_layer,
    plan_model,
    stack_layers,
    transformer_layer_tensors,
    transformer_model_tensors,
)
from workloads import load_workload
from workloads.ops import ShardShape
from workloads.transformer import layer_profile

KB = 512


@st.composite
def tensor_sets(draw, max_tensors: int = 12, steps: int = 10):
    n = draw(st.integers(1, max_tensors))
    out = []
    for i in range(n):
        start = draw(st.integers(0, steps - 1))
        end = draw(st.integers(start, steps - 1))
        size = draw(st.integers(0, 6 * KB))  # unaligned sizes, zero included
        out.append(TensorLife(f"t{i}", size, start, end))
    return out


@settings(max_examples=40, deadline=None)
@given(tensor_sets())
def test_mip_never_worse_than_greedy_nor_below_lower_bound(tensors):
    plan = plan_layer(tensors, time_limit_s=2.0)
    check_plan(tensors, plan.offsets, alignment=512)
    _, greedy_peak = greedy_best_fit(tensors)
    assert plan.greedy_peak_bytes == greedy_peak
    assert plan.lower_bound_bytes == lower_bound(tensors)
    assert plan.lower_bound_bytes <= plan.peak_bytes <= plan.greedy_peak_bytes
    assert plan.peak_bytes == max(plan.offsets[t.name] + -(-t.size // 512) * 512 for t in tensors)
    assert plan.solver_status in (OPTIMAL, TIME_LIMIT)
    assert plan.fragmentation_avoided_bytes >= 0


@settings(max_examples=40, deadline=None)
@given(tensor_sets(max_tensors=20))
def test_greedy_and_online_placements_are_valid(tensors):
    for offsets, peak in (greedy_best_fit(tensors), online_best_fit(tensors)):
        check_plan(tensors, offsets, alignment=512)
        assert peak >= lower_bound(tensors)


@settings(max_examples=25, deadline=None)
@given(tensor_sets(max_tensors=10), st.data())
def test_pinned_tensors_stay_at_the_bottom(tensors, data):
    bottom = {t.name for t in tensors if data.draw(st.booleans())}
    plan = plan_layer(tensors, time_limit_s=2.0, bottom=bottom)
    check_plan(tensors, plan.offsets, alignment=512)
    height = sum(-(-t.size // 512) * 512 for t in tensors if t.name in bottom)
    for t in tensors:
        if t.name in bottom:
            assert plan.offsets[t.name] + -(-t.size // 512) * 512 <= height
    assert plan.peak_bytes <= plan.greedy_peak_bytes


def test_mip_beats_greedy_where_largest_first_fragments():
    # Greedy puts the two 4-unit tensors at 0 and 4; the 2-unit one alive with the second no longer fits
    # beside the 3-unit one and lands on top (peak 10). Optimal: 9, the bytes alive at step 5.
    tensors = [
        TensorLife("a", 4 * KB, 3, 4),
        TensorLife("b", 3 * KB, 5, 5),
        TensorLife("c", 2 * KB, 5, 5),
        TensorLife("d", 4 * KB, 4, 5),
    ]
    plan = plan_layer(tensors, time_limit_s=5.0)
    assert plan.greedy_peak_bytes == 10 * KB
    assert plan.peak_bytes == plan.lower_bound_bytes == 9 * KB
    assert plan.solver_status == OPTIMAL
    assert plan.fragmentation_avoided_bytes == KB
    assert plan.fragmentation_avoided_pct == pytest.approx(10.0)
    check_plan(tensors, plan.offsets, alignment=512)


def _hard_set(seed: int, n: int = 30, steps: int = 12) -> list[TensorLife]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        start = rng.randrange(steps)
        end = rng.randrange(start, min(steps, start + rng.randrange(1, 6)))
        out.append(TensorLife(f"t{i}", rng.choice([1, 2, 3, 4, 5, 6, 8]) * KB, start, end))
    return out


def test_time_limit_returns_best_found_with_that_status():
    # 30 tensors whose optimum CBC cannot prove in 0.3 s (it takes more than 5 s on a laptop core).
    tensors = _hard_set(0)
    plan = plan_layer(tensors, time_limit_s=0.3)
    assert plan.solver_status == TIME_LIMIT
    assert plan.solve_time_s < 10
    check_plan(tensors, plan.offsets, alignment=512)
    assert plan.lower_bound_bytes <= plan.peak_bytes <= plan.greedy_peak_bytes


def test_check_plan_rejects_collisions_missing_and_misaligned_offsets():
    tensors = [TensorLife("a", 1000, 0, 2), TensorLife("b", 1000, 2, 3), TensorLife("c", 1000, 3, 4)]
    check_plan(tensors, {"a": 0, "b": 1000, "c": 0})  # a and c never meet: they may share bytes
    with pytest.raises(MemoryPlanError, match=r"'a'.*'b'.*overlap"):
        check_plan(tensors, {"a": 0, "b": 999, "c": 2000})
    with pytest.raises(MemoryPlanError, match="no offset"):
        check_plan(tensors, {"a": 0, "b": 1000})
    with pytest.raises(MemoryPlanError, match="multiples of 512"):
        check_plan(tensors, {"a": 0, "b": 1000, "c": 2000}, alignment=512)
    with pytest.raises(MemoryPlanError, match="non-negative"):
        check_plan(tensors, {"a": -512, "b": 1000, "c": 2000})


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: TensorLife("a", -1, 0, 1), "size must be >= 0"),
        (lambda: TensorLife("a", 10, 3, 1), "0 <= start <= end"),
        (lambda: TensorLife("a", 10, -1, 1), "0 <= start <= end"),
        (lambda: TensorLife("", 10, 0, 1), "non-empty"),
        (lambda: TensorLife("a", 1.5, 0, 1), "size must be an integer"),
        (lambda: plan_layer([TensorLife("a", 1, 0, 1), TensorLife("a", 2, 0, 1)]), "appears twice"),
        (lambda: plan_layer([TensorLife("a", 1, 0, 1)], alignment=0), "alignment"),
        (lambda: plan_layer([TensorLife("a", 1, 0, 1)], time_limit_s=0), "time_limit_s"),
        (lambda: plan_layer([TensorLife("a", 1, 0, 1)], bottom={"b"}), "bottom names"),
        (lambda: plan_model([], []), "at least one layer"),
        (lambda: transformer_layer_tensors("llama2-7b", 1, 4096, recompute="tokenwise"), "recompute must be one of"),
        (lambda: transformer_layer_tensors("llama2-7b", 0, 4096), "micro_batch"),
        (lambda: transformer_layer_tensors("llama2-7b", 1, 4096, tp=3), "tp=3 must divide"),
        (lambda: transformer_layer_tensors("mixtral-8x7b", 1, 4096), "dense transformers"),
        (lambda: stack_layers(transformer_layer_tensors("gpt3-350m", 1, 1024), 0), "num_layers"),
    ],
)
def test_bad_input_is_a_user_error(make, message):
    with pytest.raises(UserError, match=message):
        make()


@pytest.mark.parametrize("name, seq", [("llama2-7b", 4096), ("gpt3-350m", 2048)])
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_layer_tensors_match_the_workloads_saved_bytes(name, seq, tp, recompute):
    cfg = load_workload(name)
    layer = transformer_layer_tensors(cfg, 2, seq, tp, recompute)
    intra, cross = layer
    profile = layer_profile(cfg.with_seq_len(seq), "decoder", ShardShape(2, seq, tp, sequence_parallel=tp > 1))
    assert sum(t.size for t in cross) == pytest.approx(profile.saved_bytes[recompute], abs=1)
    assert all(t.start < layer.forward_steps <= t.end for t in cross)
    assert not any(t.start < layer.forward_steps <= t.end for t in intra)
    assert {"x_in", "resid_grad", "x_out"} <= {t.name for t in intra + cross}


def test_model_plan_is_valid_optimal_and_reuses_addresses_across_layers():
    layers, cross = transformer_model_tensors("llama2-7b", 1, 4096)
    assert len(layers) == load_workload("llama2-7b").num_layers  # the workload's stack by default
    plan = plan_model(layers, cross, time_limit_s=60)
    everything = [t for layer in layers for t in layer] + cross
    check_plan(everything, plan.offsets, alignment=512)
    assert plan.lower_bound_bytes <= plan.peak_bytes <= plan.greedy_peak_bytes
    assert plan.solver_status == OPTIMAL
    assert plan.distinct_layer_plans <= 3  # first, middle and last layers differ only at the ends
    assert plan.solve_time_s < 60
    # Identical middle layers share one level-one plan, shifted to their base.
    assert plan.layer_plans[5] is not plan.layer_plans[6]
    assert plan.layer_plans[5].offsets["layer5.dm"] == plan.layer_plans[6].offsets["layer6.dm"]
    assert plan.layer_bases[6] > plan.layer_bases[5]
    # Neighbouring layers' workspaces share bytes: layer 30's backward gradients and layer 31's (they are
    # never alive together).
    overlaps = [
        (a.name, b.name)
        for a in layers[30]
        for b in layers[31]
        if plan.offsets[a.name] < plan.offsets[b.name] + b.size and plan.offsets[b.name] < plan.offsets[a.name] + a.size
    ]
    assert overlaps


def test_model_plan_falls_back_to_greedy_when_layers_overlap_in_time():
    # Two "layers" whose workspaces are alive at the same steps cannot share an address range.
    layers = [[TensorLife("l0.w", 4 * KB, 0, 3)], [TensorLife("l1.w", 4 * KB, 1, 2)]]
    cross = [TensorLife("c0", 2 * KB, 0, 5), TensorLife("c1", 1 * KB, 1, 4)]
    plan = plan_model(layers, cross, time_limit_s=5)
    assert plan.solver_status == GREEDY_NOT_STACKABLE
    check_plan([t for layer in layers for t in layer] + cross, plan.offsets, alignment=512)
    assert plan.peak_bytes <= plan.greedy_peak_bytes


def test_stacked_layers_share_input_and_residual_gradient_buffers():
    layer = transformer_layer_tensors("gpt3-350m", 1, 1024)
    layers, cross = stack_layers(layer, 3)
    names = [t.name for layer_ in layers for t in layer_] + [t.name for t in cross]
    assert len(names) == len(set(names))
    by_name = {t.name: t for t in cross}
    # Layer 1's input is written by layer 0's last forward op and read in layer 1's backward.
    assert by_name["layer1.x_in"].start == layer.forward_steps - 1
    assert "layer0.x_out" not in names and "layer2.x_out" in names
    resid = by_name["resid_grad"]
    assert resid.start == 3 * layer.forward_steps
    assert resid.end == max(t.end for layer_ in layers for t in layer_)
    plan = plan_model(layers, cross, time_limit_s=20)
    assert isinstance(plan.layer_plans[0], LayerMemoryPlan)
    check_plan([t for layer_ in layers for t in layer_] + cross, plan.offsets, alignment=512)


@st.composite
def random_layers(draw):
    """A random block: workspace tensors inside its forward or its backward, saved tensors from forward
    to backward, the hand-off input/output and the carried residual gradient."""
    nf, nb = draw(st.integers(2, 5)), draw(st.integers(2, 5))
    tensors = [
        TensorLife("x_in", draw(st.integers(1, 4)) * KB, 0, nf + nb - 1),
        TensorLife("x_out", draw(st.integers(1, 4)) * KB, nf - 1, nf - 1),
        TensorLife("resid_grad", draw(st.integers(1, 4)) * KB, nf, nf + nb - 1),
    ]
    for i in range(draw(st.integers(0, 5))):
        start = draw(st.integers(0, nf - 1))
        tensors.append(TensorLife(f"saved{i}", draw(st.integers(1, 6)) * KB, start, draw(st.integers(nf, nf + nb - 1))))
    for i in range(draw(st.integers(0, 6))):
        lo, hi = (0, nf - 1) if draw(st.booleans()) else (nf, nf + nb - 1)
        start = draw(st.integers(lo, hi))
        tensors.append(TensorLife(f"work{i}", draw(st.integers(1, 6)) * KB, start, draw(st.integers(start, hi))))
    cross = tuple(t for t in tensors if t.start < nf <= t.end)
    intra = tuple(t for t in tensors if not t.start < nf <= t.end)
    return LayerTensors(intra, cross, nf), draw(st.integers(1, 6))


@settings(max_examples=25, deadline=None)
@given(random_layers())
def test_model_plan_of_random_stacks_is_valid_and_never_worse_than_greedy(case):
    layer, num_layers = case
    layers, cross = stack_layers(layer, num_layers)
    plan = plan_model(layers, cross, time_limit_s=1)
    everything = [t for layer_ in layers for t in layer_] + cross
    check_plan(everything, plan.offsets, alignment=512)
    assert plan.lower_bound_bytes <= plan.peak_bytes <= plan.greedy_peak_bytes
    assert plan.lower_bound_bytes == lower_bound(everything)
