"""Galvatron-BMW search: the pruned strategy space, the two dynamic programs against brute force, the search's
invariants (budget, baselines, monotone in budget, deterministic), heterogeneous stages, errors and the CLI."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hwmodel.catalog import load_cluster
from hwmodel.errors import UserError
from simulator.analytic import evaluate
from simulator.plan import load_plan
from simulator.search.galvatron.dp import ChainElement, chain_dp, partition
from simulator.search.galvatron.search import search_galvatron, uniform_view
from simulator.search.galvatron.space import (
    StageGroup,
    Strategy,
    is_power_of_two,
    layer_strategies,
    prune_dominated,
    stage_layouts,
)
from workloads.catalog import load_workload

GiB = 2**30


@pytest.fixture(scope="module")
def gpt30m():
    return load_workload("gpt-30m")


@pytest.fixture(scope="module")
def small_cluster():
    """4 TITAN RTX on PCIe: small enough for many searches per test."""
    return load_cluster("titan-rtx-8", devices_per_node=4)


_cache: dict = {}


def _search(workload, cluster, budget_gib: float, batch: int = 16):
    """Analytic-only search, memoized: hypothesis revisits the same budgets."""
    key = (workload.name, cluster.name, cluster.num_devices, budget_gib, batch)
    if key not in _cache:
        _cache[key] = search_galvatron(workload, cluster, budget_gib * GiB, global_batch=batch, rerank_with_des=False)
    return _cache[key]


# ---- the decision tree ---------------------------------------------------------------------------
def test_layer_strategies_are_powers_of_two_inside_a_node(gpt30m):
    group = StageGroup(first=0, size=16, node_size=8)
    strategies = layer_strategies(gpt30m, group, micro_step=16)
    assert strategies
    for s in strategies:
        assert is_power_of_two(s.tp) and s.tp <= 8, s
        assert gpt30m.num_heads % s.tp == 0
        assert not (s.sequence_parallel and s.tp == 1)
    assert {s.tp for s in strategies} == {1, 2, 4, 8}
    # dp = 1 makes ddp/zero2/zero3 the same strategy: only ddp is kept.
    one = layer_strategies(gpt30m, StageGroup(0, 2, 8), micro_step=4)
    assert {s.dp_type for s in one if s.tp == 2} == {"ddp"}


def test_layer_strategies_respect_the_micro_step(gpt30m):
    # 8 devices and 2 sequences per micro-step: only tp >= 4 leaves dp replicas that each get a sequence.
    strategies = layer_strategies(gpt30m, StageGroup(0, 8, 8), micro_step=2)
    assert {s.tp for s in strategies} == {4, 8}


def test_stage_layouts_on_a_mixed_cluster_keep_groups_apart(mixed):
    layouts = stage_layouts(mixed, num_layers=32)
    sizes = {tuple(g.size for g in layout) for layout in layouts}
    assert (16, 16) in sizes and (8, 8, 16) in sizes and (16, 8, 8) in sizes
    for layout in layouts:
        assert sum(g.size for g in layout) == 32
        for g in layout:
            assert is_power_of_two(g.size)
            kinds = {mixed.device(r).name for r in g.ranks}
            if g.size <= 16:  # a stage larger than a node group must straddle; no other may
                assert len(kinds) == 1, f"stage {g} straddles {kinds}"


def test_prune_dominated_keeps_the_pareto_front_per_layout():
    a = Strategy(1, False, "ddp", "none")
    b = Strategy(1, False, "zero3", "none")
    c = Strategy(1, False, "zero2", "full")
    d = Strategy(2, True, "ddp", "none")
    keep = prune_dominated([a, b, c, d], time=[1.0, 1.2, 1.5, 5.0], memory=[10, 5, 6, 50], reserve=[0, 0, 0, 0])
    # c is slower and bigger than b; d is dominated by a but has another layout, so it stays.
    assert keep == [0, 1, 3]


# ---- the dynamic programs against brute force ------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 4),
    data=st.data(),
    capacity=st.integers(0, 12),
)
def test_chain_dp_matches_brute_force(n, data, capacity):
    num_layouts = 2
    elements, options = [], []
    for _ in range(n):
        k = data.draw(st.integers(1, 3))
        times = data.draw(st.lists(st.floats(0.1, 10.0), min_size=k, max_size=k))
        weights = data.draw(st.lists(st.integers(0, 5), min_size=k, max_size=k))
        layouts = data.draw(st.lists(st.integers(0, num_layouts - 1), min_size=k, max_size=k))
        elements.append(ChainElement(np.array(times), np.array(weights), np.array(layouts)))
        options.append(list(zip(times, weights, layouts)))
    transition = np.array([[0.0, 0.7], [0.7, 0.0]])
    result = chain_dp(elements, transition, capacity)
    for length in range(1, n + 1):
        best = np.inf
        for combo in itertools.product(*options[:length]):
            if sum(w for _, w, _ in combo) > capacity:
                continue
            cost = sum(t for t, _, _ in combo) + sum(transition[a[2], b[2]] for a, b in zip(combo, combo[1:]))
            best = min(best, cost)
        assert result.best[length] == pytest.approx(best) if np.isfinite(best) else not np.isfinite(result.best[length])
        if np.isfinite(best):
            picks = result.choices(length)
            combo = [options[i][s] for i, s in enumerate(picks)]
            assert sum(w for _, w, _ in combo) <= capacity
            cost = sum(t for t, _, _ in combo) + sum(transition[a[2], b[2]] for a, b in zip(combo, combo[1:]))
            assert cost == pytest.approx(best)


@settings(max_examples=30, deadline=None)
@given(layers=st.integers(2, 7), stages=st.integers(1, 3), m=st.integers(1, 8), data=st.data())
def test_partition_finds_the_best_bottleneck(layers, stages, m, data):
    stages = min(stages, layers)
    per_layer = data.draw(st.lists(st.floats(0.5, 3.0), min_size=stages, max_size=stages))
    limit = data.draw(st.lists(st.integers(1, layers), min_size=stages, max_size=stages))  # memory: most layers
    tables = []
    for j in range(stages):
        t = np.full((layers + 1, layers + 1), np.inf)
        for a in range(layers + 1):
            for n in range(1, min(limit[j], layers - a) + 1):
                t[a, n] = n * per_layer[j]
        tables.append(t)
    found = partition(tables, layers, m)
    options = [
        cs
        for cs in itertools.product(range(1, layers + 1), repeat=stages)
        if sum(cs) == layers and all(c <= limit[j] for j, c in enumerate(cs))
    ]
    if not options:
        assert found == []
        return

    def estimate(cs):
        times = [c * per_layer[j] for j, c in enumerate(cs)]
        return sum(times) + (m - 1) * max(times)

    assert found
    counts = found[0][1]
    assert sum(counts) == layers and all(c <= limit[j] for j, c in enumerate(counts))
    assert found[0][0] == pytest.approx(estimate(counts))
    # At least as good as the best partition with the smallest possible bottleneck.
    bottleneck = min(max(c * per_layer[j] for j, c in enumerate(cs)) for cs in options)
    at_bottleneck = [
        cs for cs in options if max(c * per_layer[j] for j, c in enumerate(cs)) <= bottleneck * (1 + 1e-12)
    ]
    assert found[0][0] <= min(estimate(cs) for cs in at_bottleneck) * (1 + 1e-9)


# ---- the search's invariants -----------------------------------------------------------------------
BUDGETS = [0.9, 1.0, 1.25, 2.0, 4.0]


@settings(max_examples=6, deadline=None)
@given(low=st.sampled_from(BUDGETS), high=st.sampled_from(BUDGETS))
def test_more_budget_never_gives_a_slower_plan(gpt30m, small_cluster, low, high):
    low, high = min(low, high), max(low, high)
    slow = _search(gpt30m, small_cluster, low).best.report.samples_per_s
    fast = _search(gpt30m, small_cluster, high).best.report.samples_per_s
    assert fast >= slow * (1 - 1e-12)


@settings(max_examples=5, deadline=None)
@given(budget=st.sampled_from(BUDGETS))
def test_best_fits_the_budget_and_beats_every_feasible_baseline(gpt30m, small_cluster, budget):
    result = _search(gpt30m, small_cluster, budget)
    best = result.best.report
    assert best.peak_memory_bytes <= budget * GiB and best.fits_memory
    assert result.candidates[0] == result.best
    speeds = [c.report.samples_per_s for c in result.candidates]
    assert speeds == sorted(speeds, reverse=True)
    assert len(result.baselines) == 7
    for baseline in result.baselines:
        if baseline.report is not None:
            assert baseline.report.peak_memory_bytes <= budget * GiB
            assert best.samples_per_s >= baseline.report.samples_per_s * (1 - 1e-12), baseline.name
        else:
            assert baseline.reason
    # Re-evaluating the chosen plan reproduces its report: the plan is self-contained.
    again = evaluate(result.best.plan, gpt30m, small_cluster)
    assert again.samples_per_s == pytest.approx(best.samples_per_s)


def test_out_of_memory_baselines_say_what_they_need(gpt30m, small_cluster):
    result = _search(gpt30m, small_cluster, 0.9)
    oom = [b for b in result.baselines if b.report is None and b.reason and b.reason.startswith("out of memory")]
    assert oom, [b.reason for b in result.baselines]
    assert all("GiB > budget" in b.reason or "MiB > budget" in b.reason for b in oom)


def test_search_is_deterministic(gpt30m, small_cluster):
    a = search_galvatron(gpt30m, small_cluster, 1.25 * GiB, global_batch=16, rerank_with_des=False)
    b = search_galvatron(gpt30m, small_cluster, 1.25 * GiB, global_batch=16, rerank_with_des=False)
    assert a.best.plan == b.best.plan
    assert [c.plan for c in a.candidates] == [c.plan for c in b.candidates]
    assert a.best.report.iteration_time_s == b.best.report.iteration_time_s


def test_event_engine_rerank_keeps_the_invariants(gpt30m, small_cluster):
    result = search_galvatron(gpt30m, small_cluster, 1.25 * GiB, global_batch=16, top_k=2)
    assert result.details["engine"] == "des"
    assert result.best.report.engine == "des"
    assert len(result.candidates) <= 2
    for baseline in result.baselines:
        if baseline.report is not None:
            assert baseline.report.engine == "des"
            assert result.best.report.samples_per_s >= baseline.report.samples_per_s * (1 - 1e-12)


def test_max_global_batch_searches_the_batch(gpt30m, small_cluster):
    result = search_galvatron(gpt30m, small_cluster, 2 * GiB, max_global_batch=32, rerank_with_des=False)
    assert result.details["global_batches"][0] == 32
    assert result.best.report.global_batch in result.details["global_batches"]


# ---- heterogeneous -----------------------------------------------------------------------------------
def test_mixed_cluster_gets_uneven_stages_that_beat_a_uniform_view(gpt30m, mixed):
    """The search that knows V100s are slower beats the plan found assuming A100s everywhere."""
    aware = search_galvatron(gpt30m, mixed, 8 * GiB, global_batch=64, rerank_with_des=False)
    view = uniform_view(mixed)
    assert view.num_devices == mixed.num_devices and view.is_homogeneous
    naive = search_galvatron(
        gpt30m, view, 8 * GiB, global_batch=64, rerank_with_des=False, dtype=aware.details["dtype"]
    )
    naive_on_real = evaluate(naive.best.plan, gpt30m, mixed)
    assert aware.best.report.samples_per_s >= 1.2 * naive_on_real.samples_per_s
    stages = aware.best.plan.stages
    assert stages and len({s.num_layers for s in stages}) > 1, aware.best.plan


# ---- errors ----------------------------------------------------------------------------------------------
def test_budget_below_every_plan_names_the_smallest_that_works(gpt30m, small_cluster):
    with pytest.raises(UserError, match=r"smallest budget that works is about [\d.]+ MiB"):
        search_galvatron(gpt30m, small_cluster, 0.1 * GiB, global_batch=16, rerank_with_des=False)


def test_batch_that_cannot_split_names_batches_that_can(gpt30m):
    cluster = load_cluster("titan-rtx-8", devices_per_node=6)
    with pytest.raises(UserError, match=r"global batches that work here: 3, 6, 9.*cluster of 4 or 8 devices"):
        search_galvatron(gpt30m, cluster, 4 * GiB, global_batch=5, rerank_with_des=False)


def test_conflicting_batch_options_are_refused(gpt30m, small_cluster):
    with pytest.raises(UserError, match="not both"):
        search_galvatron(gpt30m, small_cluster, GiB, global_batch=16, max_global_batch=32)


# ---- CLI -------------------------------------------------------------------------------------------------
ARGS = (
    "search",
    "galvatron",
    "--workload",
    "gpt-30m",
    "--cluster",
    "titan-rtx-8",
    "--devices-per-node",
    "4",
    "--global-batch",
    "16",
)


def test_cli_json_has_the_shared_shape(simulate):
    result = simulate(*ARGS, "--memory-budget", "1.25GiB", "--json", "--top", "2", "--no-engine-rerank")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert set(data) >= {"best", "candidates", "baselines", "search_time_s"}
    assert data["best"]["plan"] and data["best"]["report"]["samples_per_s"] > 0
    assert 1 <= len(data["candidates"]) <= 2
    names = [b["name"] for b in data["baselines"]]
    assert "Megatron 3D" in names and "DeepSpeed ZeRO-3 + recompute" in names
    for b in data["baselines"]:
        assert b["report"] is not None or b["reason"]


def test_cli_out_writes_a_plan_that_runs(simulate, tmp_path):
    out = tmp_path / "plan.yaml"
    result = simulate(*ARGS, "--memory-budget", "1 GiB", "--out", out)
    assert result.code == 0, result.err
    assert "chosen" in result.out and "Megatron" in result.out
    plan = load_plan(str(out))
    run = simulate(
        "run",
        "--workload",
        "gpt-30m",
        "--cluster",
        "titan-rtx-8",
        "--devices-per-node",
        "4",
        "--plan",
        out,
        "--engine",
        "analytic",
        "--json",
    )
    assert run.code == 0, run.err
    assert json.loads(run.out)["peak_memory_bytes"] <= GiB
    assert plan.global_batch == 16
    again = simulate(*ARGS, "--memory-budget", "1 GiB", "--out", out)
    assert again.code == 2 and "--force" in again.err


def test_cli_budget_without_unit_is_refused(simulate):
    result = simulate(*ARGS, "--memory-budget", "16")
    assert result.code == 2
    assert "no unit" in result.err and "GiB" in result.err


def test_cli_infeasible_budget_says_the_smallest(simulate):
    result = simulate(*ARGS, "--memory-budget", "100MiB", "--no-engine-rerank")
    assert result.code == 2
    assert "smallest budget" in result.err and "Traceback" not in result.err
