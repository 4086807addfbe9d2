"""CELU-VFL workset rules: R uses then eviction, the W*R staleness bound, sampling that skips the last W-1
updates, and instance weights zeroed below the threshold."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from executor.vfl.workset import Workset, instance_weights


def _drive(workset: Workset, arrivals: list[bool], num_batches: int):
    """Run a workset as a party does: a new batch when one arrives and there is room, otherwise a local update.

    Returns each batch's uses, the staleness of every use and the batch ids in update order."""
    uses: dict[int, int] = {}
    staleness: list[int] = []
    order: list[int] = []
    next_batch = 0
    for arrive in arrivals:
        entry = None if arrive and workset.has_room() and next_batch < num_batches else workset.choose()
        if entry is None:
            if not workset.has_room() or next_batch >= num_batches:
                # nothing eligible and no new batch possible: only allowed when the cache is not full
                assert len(workset.entries) < workset.size
                continue
            workset.add(next_batch, payload=None)
            uses[next_batch] = 1
            staleness.append(0)
            order.append(next_batch)
            next_batch += 1
        else:
            staleness.append(workset.use(entry))
            uses[entry.batch_id] += 1
            order.append(entry.batch_id)
    return uses, staleness, order


# 200 interleavings of up to 600 arrivals: the rules' corner cases need many (pure Python, ~1 ms each); no
# deadline: a loaded machine can pause any example past hypothesis' 200 ms default: a deadline would time the machine.
@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(1, 7),
    reuse=st.integers(1, 7),
    sampling=st.sampled_from(["uniform", "latest"]),
    arrivals=st.lists(st.booleans(), min_size=1, max_size=600),
    seed=st.integers(0, 1000),
)
def test_workset_rules_hold_for_any_interleaving(size, reuse, sampling, arrivals, seed):
    workset = Workset(size, reuse, sampling, seed)
    uses, staleness, order = _drive(workset, arrivals, num_batches=120)
    cached = {e.batch_id for e in workset.entries}
    for batch, count in uses.items():
        assert count <= reuse
        if batch not in cached:  # evicted: used exactly R times, never fewer
            assert count == reuse, (batch, count)
    assert len(cached) <= size
    assert max(staleness) <= size * reuse  # nothing older than W*R updates is used
    for i, batch in enumerate(order):  # no batch reused within the last W-1 updates
        assert batch not in order[max(0, i - (size - 1)) : i]


# No deadline: a loaded machine can pause any example past hypothesis' 200 ms default, and a deadline
# would time the machine.
@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 6), reuse=st.integers(1, 6), seed=st.integers(0, 1000))
def test_full_workset_always_has_an_eligible_batch(size, reuse, seed):
    # With W batches cached and only W-1 excluded, a local update never waits: the party cannot deadlock.
    workset = Workset(size, reuse, "uniform", seed)
    uses, _, _ = _drive(workset, [True] * size + [False] * (size * reuse * 3), num_batches=size)
    assert all(count == reuse for count in uses.values())
    assert workset.entries == []


@pytest.mark.parametrize("seed", range(40))
def test_staleness_bound_under_random_arrival_rates(seed):
    # Random arrival rates over long runs: where a first version of the rules let W=4, R=5 reach 21 > W*R.
    import random

    rng = random.Random(seed)
    size, reuse, rate = rng.randint(1, 7), rng.randint(1, 7), rng.random()
    workset = Workset(size, reuse, rng.choice(["uniform", "latest"]), seed)
    uses, staleness, _ = _drive(workset, [rng.random() < rate for _ in range(1500)], num_batches=300)
    assert max(staleness) <= size * reuse
    cached = {e.batch_id for e in workset.entries}
    assert all(count == reuse for batch, count in uses.items() if batch not in cached)


def test_every_batch_used_exactly_r_times_in_a_steady_stream():
    workset = Workset(4, 3, "uniform", seed=1)
    # a batch arrives every third event: the WAN-bound regime where local updates fill the wait
    uses, staleness, _ = _drive(workset, [i % 3 == 0 for i in range(3000)], num_batches=500)
    finished = [b for b in uses if b not in {e.batch_id for e in workset.entries}]
    assert len(finished) >= 490 and all(uses[b] == 3 for b in finished)
    assert max(staleness) <= 12


def test_uniform_sampling_draws_every_eligible_batch_and_skips_recent():
    workset = Workset(3, 50, "uniform", seed=0)
    for b in range(3):
        workset.add(b, None)
    # right after adding 0, 1, 2 only batch 0 was not used in the last W-1 = 2 updates
    assert [e.batch_id for e in workset.eligible()] == [0]
    seen = set()
    for _ in range(60):
        entry = workset.choose()
        assert entry.batch_id not in list(workset.recent)
        seen.add(entry.batch_id)
        workset.use(entry)
    assert seen == {0, 1, 2}


def test_uniform_sampling_is_not_round_robin_when_several_are_eligible():
    # W=4 with 2 batches cached: both are eligible after 3 other updates, so draws vary with the seed
    draws = set()
    for seed in range(20):
        workset = Workset(4, 10, "uniform", seed)
        workset.add(0, None)
        workset.add(1, None)
        workset.recent.clear()  # as if W-1 other updates had happened
        draws.add(workset.choose().batch_id)
    assert draws == {0, 1}


def test_latest_sampling_takes_the_newest_batch():
    workset = Workset(3, 5, "latest")
    workset.add(0, None)
    workset.add(1, None)
    workset.recent.clear()
    assert workset.choose().batch_id == 1


def test_vanilla_counts_caches_nothing():
    workset = Workset(1, 1)
    workset.add(0, None)
    assert workset.entries == [] and workset.has_room() and workset.choose() is None


@pytest.mark.parametrize("size,reuse", [(0, 1), (1, 0)])
def test_bad_sizes_are_refused(size, reuse):
    with pytest.raises(ValueError, match="W and uses R"):
        Workset(size, reuse)


def test_weights_are_cosine_and_zero_below_threshold():
    stale = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    fresh = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.2, 1.0], [-1.0, 0.0]])
    w = instance_weights(stale, fresh, threshold=0.5)
    assert w[0] == pytest.approx(1.0)
    assert w[1] == pytest.approx(2**-0.5)
    assert w[2] == 0.0  # cos ~ 0.196 < 0.5
    assert w[3] == 0.0  # opposite direction
    assert torch.equal(instance_weights(stale, fresh, enabled=False), torch.ones(4))


# No deadline: the first call loads torch's kernels, and a loaded machine can pause any example past
# hypothesis' 200 ms default: a deadline would time the machine.
@settings(max_examples=50, deadline=None)
@given(threshold=st.floats(-1.0, 1.0), seed=st.integers(0, 10_000))
def test_weights_never_below_threshold_unless_zero(threshold, seed):
    gen = torch.Generator().manual_seed(seed)
    stale, fresh = torch.randn(32, 8, generator=gen), torch.randn(32, 8, generator=gen)
    w = instance_weights(stale, fresh, threshold)
    cos = torch.nn.functional.cosine_similarity(stale, fresh, dim=1)
    assert torch.all((w == 0) | (w >= threshold))
    assert torch.all(w <= 1.0 + 1e-6)
    assert torch.allclose(w[cos >= threshold], cos[cos >= threshold])
