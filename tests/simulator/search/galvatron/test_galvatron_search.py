"""Galvatron-BMW search: the pruned strategy space, the two dynamic programs against brute force, the search's
invariants (budget, monotone in budget, deterministic), the search alone against the baselines where a better
plan than every baseline is known, what one strategy of the space is worth, heterogeneous stages, errors and
the CLI."""

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
from simulator.plan import Plan, load_plan
from simulator.search.galvatron.dp import ChainElement, chain_dp, partition
from simulator.search.galvatron.search import search_galvatron, uniform_view
from simulator.search.galvatron.space import (
    SearchSpace,
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


def _search(workload, cluster, budget_gib: float, batch: int = 16, *, alone: bool = False, space=None):
    """Analytic-only search, memoized: hypothesis revisits the same budgets. `alone`: the baselines are
    evaluated and reported but kept out of the candidates, so the chosen plan is the search's own."""
    key = (workload.name, cluster.name, cluster.num_devices, budget_gib, batch, alone, space)
    if key not in _cache:
        _cache[key] = search_galvatron(
            workload,
            cluster,
            budget_gib * GiB,
            global_batch=batch,
            rerank_with_des=False,
            baselines_in_pool=not alone,
            space=space or SearchSpace(),
        )
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
    # Every power of two up to the node that splits the model's heads, kv heads and FFN.
    divides = [gpt30m.num_heads, gpt30m.kv_heads, gpt30m.ffn]
    assert {s.tp for s in strategies} == {t for t in (1, 2, 4, 8) if all(v % t == 0 for v in divides)}
    assert 8 in {s.tp for s in strategies}  # a whole node: what the next assertion needs
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
    a, b = (g.count * g.node.num_devices for g in mixed.node_groups)  # devices of each node group
    # One stage per group, and either group cut in two while the other stays whole.
    assert (a, b) in sizes and (a // 2, a // 2, b) in sizes and (a, b // 2, b // 2) in sizes
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
            cost = sum(t for t, _, _ in combo) + sum(transition[a[2], b[2]] for a, b in itertools.pairwise(combo))
            best = min(best, cost)
        assert result.best[length] == pytest.approx(best) if np.isfinite(best) else not np.isfinite(result.best[length])
        if np.isfinite(best):
            picks = result.choices(length)
            combo = [options[i][s] for i, s in enumerate(picks)]
            assert sum(w for _, w, _ in combo) <= capacity
            cost = sum(t for t, _, _ in combo) + sum(transition[a[2], b[2]] for a, b in itertools.pairwise(combo))
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


# Every pair of neighbouring budgets (so, by transitivity, every pair): five searches in all, memoized.
@pytest.mark.parametrize(("low", "high"), list(itertools.pairwise(BUDGETS)))
def test_more_budget_never_gives_a_slower_plan(gpt30m, small_cluster, low, high):
    slow = _search(gpt30m, small_cluster, low).best.report.samples_per_s
    fast = _search(gpt30m, small_cluster, high).best.report.samples_per_s
    assert fast >= slow * (1 - 1e-12)


@pytest.mark.parametrize("budget", BUDGETS)
def test_best_fits_the_budget_and_is_self_contained(gpt30m, small_cluster, budget):
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
        else:
            assert baseline.reason
    # Re-evaluating the chosen plan reproduces its report: the plan is self-contained.
    again = evaluate(result.best.plan, gpt30m, small_cluster)
    assert again.samples_per_s == pytest.approx(best.samples_per_s)


# ---- the search alone against the baselines --------------------------------------------------------------
# A plan better than every baseline on 4 TITAN RTX (PCIe) for gpt-30m at a global batch of 16: ZeRO-2 data
# parallelism over the 4 devices, 4 sequences per micro-step, no recompute. No baseline family holds it (the
# data-parallel families are DDP and ZeRO-3, Megatron 3D keeps DDP), and by hand:
# - against pure DP at the same micro-batch: the same compute and the same gradient bytes on the wire (a
#   reduce-scatter then an all-gather move what one all-reduce moves), but each device's Adam step updates a
#   quarter of the parameters, and gradients and optimizer states take a quarter of the memory;
# - against ZeRO-3 DP: the same, without ZeRO-3's parameter all-gathers in forward and in backward;
# - against DeepSpeed ZeRO-3 + recompute: that, and no second forward;
# - against Megatron 3D, pure TP and pure PP: no tensor-parallel collectives over PCIe in every layer and no
#   pipeline bubble, for a model small enough that every device holds all of it.
# The witness is evaluated below, so the case checks itself: it must fit the budget and beat every baseline
# that fits, and then the search on its own must do at least as well.
WITNESS = Plan(dp=4, dp_type="zero2", micro_batch=4, global_batch=16, dtype="fp16")
WITNESS_BUDGETS = [1.25, 2.0, 4.0]  # GiB: the witness needs about 1.13 GiB


@pytest.mark.parametrize("budget", WITNESS_BUDGETS)
def test_search_alone_beats_the_best_baseline_where_a_better_plan_exists(gpt30m, small_cluster, budget):
    result = _search(gpt30m, small_cluster, budget, alone=True)
    witness = evaluate(WITNESS, gpt30m, small_cluster)
    feasible = [b for b in result.baselines if b.report is not None]
    assert feasible, [b.reason for b in result.baselines]
    best_baseline = max(b.report.samples_per_s for b in feasible)
    # The case is valid: the hand-derived plan fits and beats every baseline.
    assert witness.fits_memory and witness.peak_memory_bytes <= budget * GiB
    assert witness.samples_per_s > best_baseline
    # The search on its own finds a plan at least as good as the witness, hence better than every baseline,
    # and that plan is none of the baselines' (they are not in its pool).
    best = result.best.report
    assert best.peak_memory_bytes <= budget * GiB
    assert best.samples_per_s >= witness.samples_per_s * (1 - 1e-9)
    assert best.samples_per_s > best_baseline
    assert result.best.plan not in {b.plan for b in feasible}
    assert result.details["search_best_samples_per_s"] == pytest.approx(best.samples_per_s)


def test_baselines_kept_apart_are_still_evaluated_the_same(gpt30m, small_cluster):
    pooled = _search(gpt30m, small_cluster, 1.25)
    alone = _search(gpt30m, small_cluster, 1.25, alone=True)
    assert [(b.name, b.plan, b.reason) for b in alone.baselines] == [
        (b.name, b.plan, b.reason) for b in pooled.baselines
    ]
    # With the baselines in the pool the chosen plan can only be as fast or faster.
    assert pooled.best.report.samples_per_s >= alone.best.report.samples_per_s * (1 - 1e-12)


# ---- what one strategy of the space is worth ---------------------------------------------------------------
def _tps(plan: Plan) -> set[int]:
    return {plan.tp} | {s.tp for s in plan.layers if s.tp is not None} | {s.tp for s in plan.stages if s.tp}


def _dp_types(plan: Plan) -> set[str]:
    return {plan.dp_type} | {s.dp_type for s in plan.layers if s.dp_type is not None}


@pytest.mark.parametrize(
    ("space", "uses"),
    [
        (SearchSpace(dp_types=("ddp", "zero2")), lambda plan: "zero3" in _dp_types(plan)),
        (SearchSpace(max_tp=1), lambda plan: max(_tps(plan)) > 1),
    ],
    ids=["without ZeRO-3", "without tensor parallel"],
)
def test_removing_the_winning_strategy_changes_the_plan(gpt30m, small_cluster, space, uses):
    """At 1 GiB a plan without recompute fits only with parameters sharded or layers split: the full space's
    plan uses both ZeRO-3 and tensor parallelism. Without either the search must settle for a slower plan that
    does without it (here the budget forces recompute or a pipeline)."""
    full = _search(gpt30m, small_cluster, 1.0, alone=True)
    narrow = _search(gpt30m, small_cluster, 1.0, alone=True, space=space)
    assert uses(full.best.plan), full.best.plan.shorthand()
    assert not uses(narrow.best.plan), narrow.best.plan.shorthand()
    assert narrow.best.plan != full.best.plan
    assert narrow.best.report.samples_per_s < full.best.report.samples_per_s
    assert narrow.best.report.peak_memory_bytes <= GiB


def test_a_narrow_space_keeps_only_its_strategies(gpt30m):
    group = StageGroup(first=0, size=8, node_size=8)
    space = SearchSpace(dp_types=("zero2",), recompute=("none", "full"), max_tp=2)
    strategies = layer_strategies(gpt30m, group, micro_step=8, space=space)
    assert {s.tp for s in strategies} == {1, 2}
    assert {s.dp_type for s in strategies} == {"zero2"}
    assert {s.recompute for s in strategies} == {"none", "full"}
    assert set(strategies) < set(layer_strategies(gpt30m, group, micro_step=8))


@pytest.mark.parametrize(
    "fields", [{"dp_types": ()}, {"dp_types": ("zero1",)}, {"recompute": ("tokenwise",)}, {"max_tp": 3}]
)
def test_a_bad_space_is_refused(fields):
    with pytest.raises(UserError, match="search space"):
        SearchSpace(**fields)


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


def test_event_engine_rerank_keeps_baselines_kept_apart_out_of_the_ranking(gpt30m, small_cluster):
    # A top K larger than the pool: every plan the event engine re-ranks is returned, so a baseline that
    # joined the ranking would show.
    result = search_galvatron(gpt30m, small_cluster, 1.25 * GiB, global_batch=16, top_k=100, baselines_in_pool=False)
    assert result.best.report.engine == "des"
    baseline_plans = {b.plan for b in result.baselines if b.report is not None}
    assert baseline_plans and all(b.report.engine == "des" for b in result.baselines if b.report is not None)
    assert not baseline_plans & {c.plan for c in result.candidates}


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
