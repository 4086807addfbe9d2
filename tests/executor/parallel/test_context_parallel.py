"""The context-parallel split (executor.parallel.context_parallel): which tokens each cp rank holds, and the mask
that lets its queries see exactly the keys a causal model lets them see. Training under cp against one
process is in tests/executor/parallel/test_parallel_plans.py."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from executor.parallel.context_parallel import SequenceContext, local_positions


@given(cp=st.integers(1, 8), chunk=st.integers(1, 16))
def test_the_ranks_hold_every_position_once(cp, chunk):
    seq_len = 2 * cp * chunk
    held = torch.cat([local_positions(seq_len, cp, r) for r in range(cp)])
    assert sorted(held.tolist()) == list(range(seq_len))
    assert all(len(local_positions(seq_len, cp, r)) == seq_len // cp for r in range(cp))


@given(cp=st.integers(1, 8), chunk=st.integers(1, 16))
def test_every_rank_gets_the_same_share_of_the_causal_work(cp, chunk):
    """Chunks r and 2cp-1-r: the query-key pairs a causal mask keeps are the same on every rank."""
    seq_len = 2 * cp * chunk
    work = {int((local_positions(seq_len, cp, r) + 1).sum()) for r in range(cp)}
    assert len(work) == 1


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_each_query_sees_exactly_the_keys_at_or_before_it(cp):
    """The blocks cover the rank's queries once; each sees a prefix of the keys in sequence order, masked to
    the causal mask of the whole sequence, and no block reaches past its own chunk."""
    seq_len = 4 * cp
    positions = [local_positions(seq_len, cp, r) for r in range(cp)]
    for rank in range(cp):
        context = SequenceContext(None, cp, positions, rank, causal=True)
        assert torch.equal(torch.cat(positions)[context.order], torch.arange(seq_len))  # sequence order
        rows_seen = []
        for rows, end, mask in context.blocks:
            queries = positions[rank][rows]
            assert end == int(queries.max()) + 1
            assert torch.equal(mask, torch.arange(end)[None, :] <= queries[:, None])
            rows_seen += list(range(rows.start, rows.stop))
        assert rows_seen == list(range(len(positions[rank])))
    whole = SequenceContext(None, cp, positions, 0, causal=False)
    assert [(end, mask) for _, end, mask in whole.blocks] == [(seq_len, None)]


@given(cp=st.integers(1, 8))
def test_every_rank_computes_the_same_number_of_chunk_pairs(cp):
    """2*cp + 1 chunk pairs per rank (against 2*cp*cp chunk pairs if every query met every key)."""
    seq_len = 2 * cp * 3
    positions = [local_positions(seq_len, cp, r) for r in range(cp)]
    work = {sum(end for _, end, _ in SequenceContext(None, cp, positions, r, causal=True).blocks) for r in range(cp)}
    assert work == {(2 * cp + 1) * 3}


def test_a_sequence_that_does_not_cut_into_2cp_chunks_is_refused():
    with pytest.raises(ValueError, match="not divisible by 2\\*cp=4"):
        local_positions(34, 2, 0)


# ---- the simulator: context-parallel ranks hold the same weights as data-parallel ones -----------------
def _stage_runs(plan: str, nodes: int = 1):
    from hwmodel.catalog import load_cluster
    from simulator.binding import bind
    from simulator.cost.stage import stage_cost
    from simulator.plan import parse_shorthand
    from workloads.catalog import load_workload

    bound = bind(parse_shorthand(plan), load_workload("llama2-7b", 32768), load_cluster("dgx-a100-80g", nodes))
    stage = bound.stages[0]
    return bound, stage_cost(bound, stage, stage.ranks[0]).runs


@pytest.mark.parametrize("dp_type", ["ddp", "zero1", "zero3"])
def test_gradients_are_averaged_and_sharded_over_dp_times_cp(dp_type):
    """cp=8 shares the weights among as many ranks as dp=8: the same gradient collectives, the same shards."""
    from simulator.analytic import evaluate_bound

    cp_bound, cp_runs = _stage_runs(f"cp=8,dp=1,dp_type={dp_type},recompute=full,global_batch=8")
    dp_bound, dp_runs = _stage_runs(f"cp=1,dp=8,dp_type={dp_type},recompute=full,global_batch=8")
    for cp_run, dp_run in zip(cp_runs, dp_runs):
        assert cp_run.dp == dp_run.dp == 8
        assert (cp_run.reduce, cp_run.gather, cp_run.scatter) == (dp_run.reduce, dp_run.gather, dp_run.scatter)
    assert any(run.reduce + run.scatter > 0 for run in cp_runs)  # dp=1 still reduces over the cp ranks
    cp_mem, dp_mem = evaluate_bound(cp_bound).memory_bytes, evaluate_bound(dp_bound).memory_bytes
    assert (cp_mem.weights, cp_mem.gradients, cp_mem.optimizer) == (dp_mem.weights, dp_mem.gradients, dp_mem.optimizer)
