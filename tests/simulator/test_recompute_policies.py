"""Recompute policies as the stacks define them (issue 15): every policy keeps activations and costs
recompute time between none and full, every-N falls toward none as N grows, op-selective saves what
torchtitan's policy saves, and a stack refuses a policy it lacks, by name."""

from __future__ import annotations

from itertools import pairwise

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from hwmodel.catalog import load_stack, stack_names
from hwmodel.errors import UserError
from simulator.analytic import evaluate
from simulator.plan import Plan, every_n, parse_shorthand, recompute_policy
from simulator.report import Report
from tests.simulator.test_properties import SETTINGS, Case, cases, run
from workloads import ShardShape, WorkloadConfig, layer_profile, load_workload
from workloads.ops import OP_SELECTIVE
from workloads.transformer import layer_kinds

BETWEEN = ("selective", OP_SELECTIVE, "every-1", "every-2", "every-3", "every-5")
TOL = 1 + 1e-12


def _stage_figures(report: Report) -> list[tuple[float, float]]:
    return [(s.memory_bytes.activations, s.backward_s) for s in report.stages]


@SETTINGS
@given(case=cases(), policy=st.sampled_from(BETWEEN))
def test_every_policy_lies_between_none_and_full(case: Case, policy: str):
    none, full, this = (run(case.with_plan(recompute=r)) for r in ("none", "full", policy))
    # Per stage: activations kept (full <= policy <= none) and backward time, recompute included
    # (none <= policy <= full); and the iteration's recompute time.
    for (a_none, b_none), (a_full, b_full), (a, b) in zip(
        _stage_figures(none), _stage_figures(full), _stage_figures(this), strict=True
    ):
        assert a_full <= a * TOL and a <= a_none * TOL, (policy, a_full, a, a_none)
        assert b_none <= b * TOL and b <= b_full * TOL, (policy, b_none, b, b_full)
    assert none.time_breakdown_s.recompute == 0.0
    assert this.time_breakdown_s.recompute <= full.time_breakdown_s.recompute * TOL


@SETTINGS
@given(case=cases(schedules=("1f1b", "interleaved")))
def test_every_n_is_monotone_in_n(case: Case):
    """Fewer blocks recompute as N grows: each stage keeps no less and recomputes no more. Where a chunk
    mixes block kinds (T5's encoder and larger decoder blocks) the number recomputed still falls, but which
    blocks does not, so the bytes need not: those workloads are left out."""
    assume(len(set(layer_kinds(case.workload)[1:-1])) == 1)
    reports = [run(case.with_plan(recompute=f"every-{n}")) for n in (1, 2, 3, 4, 6, 8)]
    for smaller, larger in pairwise(reports):
        for (a_small, b_small), (a_large, b_large) in zip(_stage_figures(smaller), _stage_figures(larger), strict=True):
            assert a_small <= a_large * TOL and b_large <= b_small * TOL
        assert larger.time_breakdown_s.recompute <= smaller.time_breakdown_s.recompute * TOL


def test_every_one_is_full_and_every_n_past_the_stage_is_none():
    w = load_workload("gpt3-350m")  # 24 blocks; pp=2: 12 a stage
    base = "tp=1,pp=2,dp=4,micro_batch=1,global_batch=16"
    full, every1, every13, none = (
        evaluate(parse_shorthand(f"{base},recompute={r}"), w, _cluster())
        for r in ("full", "every-1", "every-13", "none")
    )
    assert every1.iteration_time_s == full.iteration_time_s and every1.peak_memory_bytes == full.peak_memory_bytes
    assert every13.iteration_time_s == none.iteration_time_s and every13.peak_memory_bytes == none.peak_memory_bytes


def test_every_two_recomputes_half_of_what_full_does():
    # Every stage recomputes 6 of its 12 blocks: the recompute FLOPs of the report are half of full's.
    w = load_workload("gpt3-350m")
    base = "tp=1,pp=2,dp=4,micro_batch=1,global_batch=16"
    full, half = (evaluate(parse_shorthand(f"{base},recompute={r}"), w, _cluster()) for r in ("full", "every-2"))
    extra = half.hardware_flops_per_iteration - half.model_flops_per_iteration
    assert extra == pytest.approx((full.hardware_flops_per_iteration - full.model_flops_per_iteration) / 2)


LLAMA = WorkloadConfig(
    name="t",
    family="llama",
    num_layers=2,
    hidden_size=256,
    ffn_hidden_size=512,
    num_heads=8,
    num_kv_heads=2,
    vocab_size=1000,
    seq_len=128,
)


def test_op_selective_saves_the_block_input_every_other_matmul_and_the_attention_output():
    """By hand, a Llama block (tp=1, bf16): torchtitan's seven matmuls wq, wk, wv, wo, w1, w3, w2 save the
    1st, 3rd, 5th, 7th outputs (q, v, gate, the down projection), SDPA its output and fp32 log-sum-exp."""
    mb, s, h, f, e = 2, LLAMA.seq_len, LLAMA.hidden_size, LLAMA.ffn, 2
    heads, kv, d = LLAMA.num_heads, LLAMA.kv_heads, LLAMA.head_dim
    t = mb * s
    prof = layer_profile(LLAMA, "decoder", ShardShape(micro_batch=mb, seq_len=s))
    expected = (
        t * h * e + t * heads * d * e + t * kv * d * e + t * f * e + t * h * e + t * heads * d * e + t * heads * 4
    )
    assert prof.saved_bytes[OP_SELECTIVE] == pytest.approx(expected)
    assert prof.saved_bytes["full"] < prof.saved_bytes[OP_SELECTIVE] < prof.saved_bytes["none"]
    # Re-run: wk (of the fused q/k/v projection), wo, w3 (of the fused gate/up) and every vector op.
    names = list(prof.op_names)
    matmul = dict(zip(names, prof.fwd_flops, strict=True))
    rerun = (
        matmul["qkv_proj"] * kv / (heads + 2 * kv)
        + matmul["out_proj"]
        + matmul["gate_up_proj"] / 2
        + sum(fl for n, fl, u in zip(names, prof.fwd_flops, prof.unit, strict=True) if u == 2)
    )
    assert prof.recompute_flops(OP_SELECTIVE) == pytest.approx(rerun)
    assert prof.recompute_flops("selective") < prof.recompute_flops(OP_SELECTIVE) < prof.recompute_flops("full")


POLICIES = ("none", "selective", OP_SELECTIVE, "full", "every-2", "every-7")


@pytest.mark.parametrize("stack", stack_names())
@pytest.mark.parametrize("policy", POLICIES)
def test_a_stack_refuses_by_name_the_policies_it_lacks(stack: str, policy: str):
    offered = recompute_policy(policy) in load_stack(stack).recompute_policies
    plan = parse_shorthand(f"tp=1,dp=8,micro_batch=1,global_batch=8,recompute={policy},stack={stack}")
    if offered:
        assert evaluate(plan, load_workload("gpt3-350m"), _cluster()).stack == stack
    else:
        with pytest.raises(UserError, match=f"no recompute policy {policy!r}"):
            evaluate(plan, load_workload("gpt3-350m"), _cluster())


def test_the_stacks_offer_what_they_really_do():
    # torchtitan: op-level selective and every-N block checkpointing, no Megatron-style attention core.
    assert {OP_SELECTIVE, "every-n"} <= set(load_stack("torchtitan").recompute_policies)
    assert "selective" not in load_stack("torchtitan").recompute_policies
    # Megatron-LM: --recompute-granularity selective, and full with --recompute-method block.
    assert {"selective", "full", "every-n"} <= set(load_stack("megatron-lm").recompute_policies)
    assert OP_SELECTIVE not in load_stack("megatron-lm").recompute_policies


@pytest.mark.parametrize("text", ["every-0", "every-", "every-x", "every--2", "some"])
def test_a_bad_recompute_value_is_refused(text: str):
    with pytest.raises(Exception, match="recompute"):
        parse_shorthand(f"recompute={text}")


def test_every_n_reads_back():
    assert every_n("every-12") == 12 and every_n("full") is None
    assert Plan(recompute="every-3").shorthand().count("recompute=every-3") == 1


def _cluster():
    from hwmodel import load_cluster

    return load_cluster("dgx-a100-80g")
