"""Moving activations between per-layer layouts (simulator/cost/relayout.py): the collectives mirror the
executor's three redistribution steps, the gradient path of a change mirrors the forward of the opposite
change, both engines charge the moves once per run boundary, and the Galvatron search costs a transition
with the same function."""

from __future__ import annotations

from typing import ClassVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hwmodel.catalog import load_cluster
from simulator.analytic import evaluate
from simulator.binding import BoundStage, bind
from simulator.cost.relayout import Layout, relayout
from simulator.cost.stage import stage_cost
from simulator.des import evaluate_des
from simulator.plan import LayerStrategy, Plan
from simulator.search.galvatron.costs import CostTables
from simulator.search.galvatron.space import StageGroup, Strategy
from workloads.catalog import load_workload

CLUSTER = load_cluster("dgx-a100-40g", nodes=1)  # 8 GPUs on NVSwitch
STAGE = BoundStage(0, range(8), 1, (), 16)  # 16 sequences per micro-step over the stage's 8 devices
PER_SEQUENCE = 4096 * 4096 * 2.0  # one sequence of llama2-7b activations in bf16
LAYOUTS = [Layout(1, False), Layout(2, False), Layout(2, True), Layout(4, False), Layout(4, True), Layout(8, True)]


def _moves(src: Layout, dst: Layout):
    move = relayout(CLUSTER, STAGE, 0, src, dst, PER_SEQUENCE)
    return (
        [(k, n / PER_SEQUENCE, s.size) for k, n, s in move.forward],
        [(k, n / PER_SEQUENCE, s.size) for k, n, s in move.backward],
    )


def test_the_executors_three_steps():
    # dp8 (2 sequences each) -> tp2 (4 replicas of 4 sequences): the slices of 2 ranks merge.
    assert _moves(Layout(1, False), Layout(2, False)) == ([("all_gather", 4, 2)], [])
    # ... and back: forward keeps a part, backward gathers the gradient of the 4 sequences.
    assert _moves(Layout(2, False), Layout(1, False)) == ([], [("all_gather", 4, 2)])
    # Leaving sequence parallelism gathers the sequence over the tp group; entering it gathers gradients.
    assert _moves(Layout(2, True), Layout(2, False)) == ([("all_gather", 4, 2)], [])
    assert _moves(Layout(2, False), Layout(2, True)) == ([], [("all_gather", 4, 2)])
    # tp2+sp -> tp4+sp: gather the sequence, merge two slices, keep a chunk (its gradient gathered back).
    assert _moves(Layout(2, True), Layout(4, True)) == (
        [("all_gather", 4, 2), ("all_gather", 8, 2)],
        [("all_gather", 8, 4)],
    )
    assert _moves(Layout(4, False), Layout(4, False)) == ([], [])


# 60 of the layout pairs; no deadline: a loaded machine can pause any example past hypothesis' 200 ms
# default, and a deadline would time the machine.
@settings(max_examples=60, deadline=None)
@given(st.sampled_from(LAYOUTS), st.sampled_from(LAYOUTS))
def test_the_gradient_path_mirrors_the_opposite_change(a, b):
    # What a -> b gathers forward, b -> a gathers backward (its autograd steps undo each other).
    forward_ab, _ = _moves(a, b)
    _, backward_ba = _moves(b, a)
    assert sorted(forward_ab) == sorted(backward_ba)


def test_groups_are_the_ranks_whose_slices_merge():
    # Rank 5 of 8 going tp2 -> tp4 (2 replicas of 8 sequences): the slices of ranks 5 and 7 merge.
    move = relayout(CLUSTER, STAGE, 5, Layout(2, False), Layout(4, False), PER_SEQUENCE)
    ((kind, nbytes, span),) = move.forward
    assert kind == "all_gather" and span.size == 2 and nbytes == 8 * PER_SEQUENCE


LLAMA = load_workload("llama2-7b")
MIXED = Plan(tp=2, micro_batch=2, global_batch=16, layers=(LayerStrategy(layers=(16, 31), tp=1),))


def test_engines_charge_each_boundary_once_and_agree():
    bound = bind(MIXED, LLAMA, CLUSTER)
    stage = bound.stages[0]
    cost = stage_cost(bound, stage, stage.ranks[0], None)
    moves = [(rc.run.kind, rc.run.tp, bool(rc.relayout_in), bool(rc.relayout_out)) for rc in cost.runs]
    # tp2 blocks -> tp1 blocks, tp1 blocks -> the head in the home layout (tp2): two moves, nothing else.
    assert moves == [
        ("embedding", 2, False, False),
        ("decoder", 2, False, False),
        ("decoder", 1, True, False),
        ("head", 2, True, False),
    ]
    runs_only = sum(rc.count * (rc.forward + rc.backward) for rc in cost.runs)
    moved = sum(m.forward_s + m.backward_s for rc in cost.runs for m in (rc.relayout_in, rc.relayout_out))
    assert moved > 0 and cost.per_micro_batch == pytest.approx(runs_only + moved, rel=1e-12)
    analytic, des = evaluate(MIXED, LLAMA, CLUSTER), evaluate_des(MIXED, LLAMA, CLUSTER)
    assert des.iteration_time_s == pytest.approx(analytic.iteration_time_s, rel=2e-3)


def test_uniform_plans_move_nothing():
    for plan in (Plan(tp=2, micro_batch=2, global_batch=16), Plan(tp=2, pp=2, micro_batch=1, global_batch=8)):
        bound = bind(plan, LLAMA, CLUSTER)
        for stage in bound.stages:
            cost = stage_cost(bound, stage, stage.ranks[0], None)
            assert not any(rc.relayout_in or rc.relayout_out for rc in cost.runs)


def test_galvatron_prices_a_transition_as_the_engines_do():
    tables = CostTables(LLAMA, CLUSTER, "bf16")
    group = StageGroup(0, 8, 8)
    a, b = Strategy(2, True, "ddp", "none"), Strategy(1, False, "zero3", "none")
    move = relayout(
        CLUSTER,
        BoundStage(0, range(8), 1, (), 16),
        0,
        Layout(2, True),
        Layout(1, False),
        LLAMA.seq_len * LLAMA.hidden_size * 2,
    )
    assert tables.transition(group, 16, a, b) == pytest.approx(move.forward_s + move.backward_s, rel=1e-12)
    assert tables.transition(group, 16, a, a) == 0.0


@pytest.mark.parametrize("src, dst", [(a, b) for a in LAYOUTS[:5] for b in LAYOUTS[:5] if a != b])
def test_the_cost_is_what_the_executors_redistribution_gathers(monkeypatch, src, dst):
    # Run executor.parallel.mixed_layout.relayout forward and backward on one rank with the collectives recorded
    # (groups stand in as their sizes): every all-gather it makes, the simulator charges, same size.
    import torch

    from executor.parallel import mixed_layout

    calls = []

    def all_gather(x, group, dim):
        out = torch.cat([x] * group, dim=dim)
        calls.append(("all_gather", float(out.numel() * out.element_size()), group))
        return out

    monkeypatch.setattr(mixed_layout, "_all_gather", all_gather)
    monkeypatch.setattr(mixed_layout.dist, "get_world_size", lambda group: group)

    class Meshes:
        exchange: ClassVar[dict[tuple[int, int], int]] = {(s, b): b // s for s in (1, 2, 4) for b in (1, 2, 4) if s < b}

        @staticmethod
        def tp_group(tp):
            return tp

    seq, hidden, rank = 8, 4, 0
    sequences = STAGE.micro_batch_of(rank, src.tp)
    x = torch.randn(sequences, seq // src.tp if src.sp else seq, hidden, dtype=torch.float64, requires_grad=True)
    y = mixed_layout.relayout(
        x, mixed_layout.ActLayout(src.tp, src.sp), mixed_layout.ActLayout(dst.tp, dst.sp), Meshes, rank
    )
    forward = list(calls)
    calls.clear()
    y.backward(torch.ones_like(y))
    backward = list(calls)
    move = relayout(CLUSTER, STAGE, rank, src, dst, seq * hidden * 8.0)
    assert forward == [(k, n, s.size) for k, n, s in move.forward]
    assert backward == [(k, n, s.size) for k, n, s in move.backward]
