"""Uneven micro-batch splits across data-parallel replicas (plan.batch_split) in the simulator: what binding
refuses, that an even split is the default, that the largest share sets the pace on uniform hardware and that
giving fast replicas more sequences pays on a mixed A100/V100 cluster, in both engines."""

from __future__ import annotations

from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hwmodel.catalog import load_cluster
from simulator.analytic import evaluate, representatives
from simulator.binding import bind
from simulator.des import Simulation, evaluate_des
from simulator.errors import InfeasiblePlan, UnsupportedPlan
from simulator.plan import LayerStrategy, Plan, StageSpec, parse_shorthand
from simulator.search.galvatron.split import speed_split, split_candidates
from workloads.catalog import load_workload


@pytest.fixture(scope="module")
def gpt30m():
    return load_workload("gpt-30m")


@pytest.fixture(scope="module")
def dgx():
    """8 identical A100s in one node."""
    return load_cluster("dgx-a100-40g")


# ---- binding refuses splits that do not match the replicas -----------------------------------------------
def test_split_length_must_match_dp(gpt30m, dgx):
    # dp is left out, so the plan itself cannot check: bind fills dp=4 and refuses two shares.
    with pytest.raises(InfeasiblePlan, match=r"batch_split 2\+2 lists 2 replicas, but the plan has dp=4"):
        bind(parse_shorthand("tp=2,micro_batch=2,batch_split=2+2"), gpt30m, dgx)


def test_split_sum_must_match_micro_step(gpt30m, dgx):
    with pytest.raises(InfeasiblePlan, match=r"sums to 9.*micro_batch\*dp = 2\*4 = 8"):
        bind(parse_shorthand("tp=2,micro_batch=2,batch_split=3+2+2+2"), gpt30m, dgx)


def test_per_layer_tp_that_changes_dp_is_refused(gpt30m, dgx):
    plan = Plan(tp=2, micro_batch=2, batch_split=(2, 2, 2, 2), layers=(LayerStrategy(layers=(0, 1), tp=4),))
    with pytest.raises(InfeasiblePlan, match=r"tp=4 gives the stage's 8 devices dp=2 replicas.*dp=4"):
        bind(plan, gpt30m, dgx)
    # The same per-layer layout without a split binds (the check is about the split only).
    bind(plan.model_copy(update={"batch_split": None}), gpt30m, dgx)
    # A per-layer override that keeps dp is accepted with a split.
    same_dp = Plan(
        tp=2, micro_batch=2, batch_split=(3, 1, 3, 1), layers=(LayerStrategy(layers=(0, 1), tp=2, recompute="full"),)
    )
    assert bind(same_dp, gpt30m, dgx).stages[0].replica_batches == (3, 1, 3, 1)


def test_stages_with_different_dp_are_refused(gpt30m, dgx):
    plan = Plan(
        pp=2,
        micro_batch=1,
        global_batch=8,
        batch_split=(1, 1),
        stages=(
            StageSpec(num_layers=4, devices="0-3", tp=2),  # dp=2
            StageSpec(num_layers=4, devices="4-7", tp=4),  # dp=1
        ),
    )
    with pytest.raises(InfeasiblePlan, match=r"stages\[1\]: 4 devices with tp=4, cp=1 make dp=1 replicas"):
        bind(plan, gpt30m, dgx)


def test_expert_parallel_split_is_unsupported(dgx):
    moe = load_workload("mixtral-8x7b")
    with pytest.raises(UnsupportedPlan, match="ep=2"):
        bind(parse_shorthand("tp=4,ep=2,micro_batch=1,batch_split=1+1"), moe, dgx)


# ---- an even split is the default --------------------------------------------------------------------------
@pytest.mark.parametrize("engine", [evaluate, evaluate_des])
@pytest.mark.parametrize(
    "base", ["tp=2,dp=4,micro_batch=2,global_batch=32", "tp=2,pp=2,dp=2,micro_batch=3,global_batch=24,dp_type=zero3"]
)
def test_even_split_is_the_default(gpt30m, dgx, engine, base):
    plan = parse_shorthand(base)
    even = plan.model_copy(update={"batch_split": (plan.micro_batch,) * plan.dp})
    a, b = engine(plan, gpt30m, dgx), engine(even, gpt30m, dgx)
    assert b.iteration_time_s == a.iteration_time_s
    assert b.peak_memory_bytes == a.peak_memory_bytes
    assert [s.model_dump() for s in b.stages] == [s.model_dump() for s in a.stages]


# ---- uniform hardware: the largest share is the critical path --------------------------------------------------
def test_uneven_split_costs_its_largest_share(gpt30m, dgx):
    even = evaluate(parse_shorthand("tp=2,dp=4,micro_batch=2,global_batch=32"), gpt30m, dgx)
    uneven = evaluate(parse_shorthand("tp=2,dp=4,micro_batch=2,global_batch=32,batch_split=5+1+1+1"), gpt30m, dgx)
    # Every replica running 5 sequences per micro-step, the same number of micro-steps (4).
    as_big = evaluate(parse_shorthand("tp=2,dp=4,micro_batch=5,global_batch=80"), gpt30m, dgx)
    assert uneven.iteration_time_s > 1.2 * even.iteration_time_s
    assert uneven.iteration_time_s == pytest.approx(as_big.iteration_time_s, rel=0.03)
    assert uneven.peak_memory_bytes == pytest.approx(as_big.peak_memory_bytes, rel=0.01)
    assert uneven.peak_memory_bytes > even.peak_memory_bytes


def test_each_device_keeps_its_own_share_of_activations(gpt30m, dgx):
    plan = parse_shorthand("tp=2,dp=4,micro_batch=2,global_batch=32,batch_split=5+1+1+1")
    sim = Simulation(bind(plan, gpt30m, dgx))
    result = sim.run()
    # One representative per distinct share, standing for its replicas' ranks (tp=2 each).
    assert sorted(rep.num_ranks for rep in result.reps) == [2, 6]
    big = next(rep for rep in result.reps if rep.num_ranks == 2)
    small = next(rep for rep in result.reps if rep.num_ranks == 6)
    assert big.memory_base == small.memory_base  # model states do not depend on the batch
    assert big.memory_peak - big.memory_base == pytest.approx(5 * (small.memory_peak - small.memory_base), rel=0.05)


# ---- mixed hardware: fast replicas take more -----------------------------------------------------------------
MIXED = "tp=8,dp=4,micro_batch=4,global_batch=256,dtype=fp16,recompute=full"


def test_representatives_cover_every_device_and_share(mixed):
    llama = load_workload("llama2-7b")
    for split, expected in [(None, 2), ((6, 6, 2, 2), 2), ((5, 7, 2, 2), 3), ((5, 7, 3, 1), 4), ((4, 4, 4, 4), 2)]:
        bound = bind(parse_shorthand(MIXED).model_copy(update={"batch_split": split}), llama, mixed)
        reps = representatives(mixed, bound.stages[0])
        assert len(reps) == expected, split
        assert sum(reps.values()) == 32


@pytest.mark.parametrize("engine", [evaluate, evaluate_des])
def test_mixed_cluster_split_favouring_a100_is_faster(mixed, engine):
    llama = load_workload("llama2-7b")
    even = engine(parse_shorthand(MIXED), llama, mixed)
    to_a100 = engine(parse_shorthand(MIXED + ",batch_split=6+6+2+2"), llama, mixed)  # replicas 0, 1 are A100s
    to_v100 = engine(parse_shorthand(MIXED + ",batch_split=2+2+6+6"), llama, mixed)
    assert to_a100.fits_memory and even.fits_memory
    assert to_a100.iteration_time_s < even.iteration_time_s / 1.3
    assert to_v100.iteration_time_s > even.iteration_time_s
    # The split moves the bottleneck off the V100s.
    assert even.stages[0].device == "v100-32g"
    assert to_a100.stages[0].device == "a100-40g"


@pytest.mark.parametrize("engine", [evaluate, evaluate_des])
def test_pipeline_stages_whose_replicas_mix_gpu_types(mixed, engine):
    """Two stages, each with one A100 replica (8 GPUs) and one V100 replica: the split holds across stages."""
    llama = load_workload("llama2-7b")
    stages = (
        StageSpec(num_layers=16, devices=tuple(range(0, 8)) + tuple(range(16, 24))),
        StageSpec(num_layers=16, devices=tuple(range(8, 16)) + tuple(range(24, 32))),
    )
    base = Plan(tp=8, pp=2, micro_batch=4, global_batch=128, dtype="fp16", recompute="full", stages=stages)
    even = engine(base, llama, mixed)
    to_a100 = engine(base.model_copy(update={"batch_split": (6, 2)}), llama, mixed)
    to_v100 = engine(base.model_copy(update={"batch_split": (2, 6)}), llama, mixed)
    assert to_a100.iteration_time_s < even.iteration_time_s / 1.2 < to_v100.iteration_time_s
    assert to_a100.peak_memory_bytes == to_v100.peak_memory_bytes > even.peak_memory_bytes


# ---- properties ---------------------------------------------------------------------------------------------
def _compositions(total: int, parts: int):
    """Splits of `total` sequences over `parts` replicas, each at least 1: `parts - 1` distinct cuts among the
    `total - 1` places between sequences (the first cuts of a shuffle: no draw is filtered out or retried)."""
    return st.permutations(range(1, total)).map(
        lambda places: tuple(b - a for a, b in pairwise([0, *sorted(places[: parts - 1]), total]))
    )


_evaluated: dict = {}


def _report(gpt30m, dgx, split):
    if split not in _evaluated:
        plan = parse_shorthand("tp=2,dp=4,micro_batch=3,global_batch=48,recompute=selective")
        _evaluated[split] = evaluate(plan.model_copy(update={"batch_split": split}), gpt30m, dgx)
    return _evaluated[split]


# Each new split evaluates a plan (cached by split, so a run costs at most the 165 splits of 12 over 4); no
# deadline: the first evaluation fills the model's caches, and a loaded machine pauses.
@settings(max_examples=40, deadline=None)
@given(a=_compositions(12, 4), b=_compositions(12, 4))
def test_no_split_beats_the_even_one_and_memory_follows_the_largest_share(gpt30m, dgx, a, b):
    even = _report(gpt30m, dgx, None)
    ra, rb = _report(gpt30m, dgx, a), _report(gpt30m, dgx, b)
    for r in (ra, rb):
        assert r.iteration_time_s >= even.iteration_time_s * (1 - 1e-12)
        assert r.peak_memory_bytes >= even.peak_memory_bytes
    # Only the largest share matters on identical devices: it sets both the pace and the peak.
    if max(a) < max(b):
        assert ra.peak_memory_bytes < rb.peak_memory_bytes
        assert ra.iteration_time_s < rb.iteration_time_s
    if max(a) == max(b):
        assert ra.peak_memory_bytes == rb.peak_memory_bytes
        assert ra.iteration_time_s == pytest.approx(rb.iteration_time_s, rel=1e-12)


# ---- Galvatron: splits by replica speed on mixed clusters -----------------------------------------------------
def test_speed_split_gives_a100_replicas_more_and_is_faster(mixed):
    llama = load_workload("llama2-7b")
    even = parse_shorthand(MIXED)
    even_report = evaluate(even, llama, mixed)
    found = split_candidates([(even_report.plan, even_report)], llama, mixed, 40 * 2**30)
    assert len(found) == 1
    plan, report = found[0]
    split = plan.batch_split
    assert sum(split) == 16 and min(split) >= 1
    assert split[0] == split[1] > split[2] == split[3]  # replicas 0, 1 on A100s, 2, 3 on V100s
    assert report.samples_per_s > 1.3 * even_report.samples_per_s
    assert "batch_split=" + "+".join(map(str, split)) in plan.shorthand()  # what the search tables show


def test_speed_split_stays_within_the_memory_budget(mixed):
    llama = load_workload("llama2-7b")
    even = evaluate(parse_shorthand(MIXED), llama, mixed)
    unbounded = evaluate(parse_shorthand(MIXED + ",batch_split=6+6+2+2"), llama, mixed)
    # Room for 5 sequences on a replica but not for 6 (the split the budget alone would give).
    budget = (even.peak_memory_bytes + unbounded.peak_memory_bytes) / 2
    bound = bind(even.plan.model_copy(update={"batch_split": (4, 4, 4, 4)}), llama, mixed)
    assert speed_split(bound, 40 * 2**30) == (6, 6, 2, 2)
    split = speed_split(bound, budget)
    assert split == (5, 5, 3, 3)
    assert evaluate(even.plan.model_copy(update={"batch_split": split}), llama, mixed).peak_memory_bytes <= budget
    # Not even one sequence more than the even share fits: no split.
    assert speed_split(bound, even.peak_memory_bytes * 1.001) is None


def test_no_split_where_replicas_are_alike(gpt30m, dgx, mixed):
    even = evaluate(parse_shorthand("tp=2,dp=4,micro_batch=2,global_batch=32"), gpt30m, dgx)
    assert split_candidates([(even.plan, even)], gpt30m, dgx, 40 * 2**30) == []  # one GPU type
    # Mixed cluster, but each replica of each stage on one type: tp=8, pp=2 puts stage 0 on the A100s.
    staged = evaluate(parse_shorthand("tp=8,pp=2,micro_batch=2,global_batch=32,dtype=fp16"), gpt30m, mixed)
    assert split_candidates([(staged.plan, staged)], gpt30m, mixed, 40 * 2**30) == []


def test_galvatron_search_picks_a_speed_split_on_a_small_mixed_cluster(gpt30m):
    """4 A100 + 4 V100: the best plan found keeps every layer on all 8 GPUs and gives A100 replicas more."""
    from simulator.search.galvatron.search import search_galvatron

    small_mixed = load_cluster("mixed-a100-v100", devices_per_node=2)  # ranks 0-3 A100, 4-7 V100
    budget = 8 * 2**30
    result = search_galvatron(gpt30m, small_mixed, budget, global_batch=64, rerank_with_des=False)
    assert result.details["batch_split_plans"] >= 1
    best = result.best.plan
    assert best.batch_split is not None, best.shorthand()
    bound = bind(best, gpt30m, small_mixed)
    devices = [small_mixed.device(bound.stages[0].ranks[d * best.tp]).name for d in range(best.dp)]
    a100 = [n for n, dev in zip(best.batch_split, devices) if dev.startswith("a100")]
    v100 = [n for n, dev in zip(best.batch_split, devices) if dev.startswith("v100")]
    assert a100 and v100 and min(a100) > max(v100)
    assert result.best.report.peak_memory_bytes <= budget
    even = evaluate(best.model_copy(update={"batch_split": None}), gpt30m, small_mixed)
    assert result.best.report.samples_per_s > 1.1 * even.samples_per_s
