"""MEMO in the simulator: the saved-tensor split, alpha choice, stalls, host memory and the search command."""

from __future__ import annotations

import json

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from hwmodel.catalog import load_cluster
from hwmodel.whatif import with_link_bandwidth
from simulator.analytic import evaluate
from simulator.des import evaluate_des
from simulator.errors import InfeasiblePlan
from simulator.plan import Plan, parse_shorthand
from simulator.search.memo.cli import with_host_memory
from simulator.search.memo.search import choose_alpha, search_memo
from workloads.activations import block_activations
from workloads.catalog import load_workload
from workloads.ops import ShardShape
from workloads.transformer import layer_profile

CLUSTER = load_cluster("hgx-a800")


@pytest.mark.parametrize("name", ["llama2-7b", "gpt-tiny", "llama3-8b"])
@pytest.mark.parametrize(
    "shape",
    [
        ShardShape(1, 8192),
        ShardShape(2, 8192, tp=4, sequence_parallel=True, cp=2),
        ShardShape(1, 8192, attention="naive"),
    ],
)
def test_saved_tensors_sum_to_the_profile(name, shape):
    cfg = load_workload(name, 8192)
    acts = block_activations(cfg, "decoder", shape)
    assert acts.total == pytest.approx(layer_profile(cfg, "decoder", shape).saved_bytes["none"])
    assert acts.core + acts.tokenwise == pytest.approx(acts.total)
    assert acts.host_bytes(1.0) == pytest.approx(acts.total)


def test_tokenwise_alpha_zero_equals_plain_token_recompute_and_offload_zero_equals_plain():
    wl = load_workload("llama2-7b", 65536)
    for recompute in ("none", "selective", "full"):
        plain = evaluate(parse_shorthand(f"tp=8,sequence_parallel=true,recompute={recompute}"), wl, CLUSTER)
        zero = evaluate(parse_shorthand(f"tp=8,sequence_parallel=true,recompute={recompute},offload=0"), wl, CLUSTER)
        assert zero.iteration_time_s == plain.iteration_time_s and zero.peak_memory_bytes == plain.peak_memory_bytes
    memo0 = evaluate(parse_shorthand("tp=8,sequence_parallel=true,recompute=tokenwise,offload=0"), wl, CLUSTER)
    assert memo0.time_breakdown_s.recompute > 0 and memo0.time_breakdown_s.offload_stall == 0


def test_host_memory_overflow_is_infeasible_with_reason():
    wl = load_workload("llama2-7b", 1048576)
    with pytest.raises(InfeasiblePlan, match="host memory"):
        evaluate(parse_shorthand("tp=8,sequence_parallel=true,recompute=tokenwise,offload=1"), wl, CLUSTER)


def test_des_sees_the_copies_and_the_stall():
    wl = load_workload("llama2-7b", 65536)
    slow = with_link_bandwidth(CLUSTER, "host_link_bandwidth", 2e9)
    plan = parse_shorthand("tp=8,sequence_parallel=true,recompute=tokenwise,offload=1")
    analytic = evaluate(plan, wl, slow)
    des = evaluate_des(plan, wl, slow)
    assert analytic.time_breakdown_s.offload_stall > 0
    assert des.time_breakdown_s.offload_stall > 0
    assert des.iteration_time_s == pytest.approx(analytic.iteration_time_s, rel=0.05)


SEQS = st.sampled_from([16384, 65536, 262144])
PCIE = st.sampled_from([4e9, 16e9, 32e9, 64e9])


@settings(max_examples=12, deadline=None)
@given(seq=SEQS, pcie=PCIE)
def test_alpha_never_exceeds_what_pcie_hides_unless_memory_forces_it(seq, pcie):
    wl = load_workload("llama2-7b", seq)
    cl = with_link_bandwidth(CLUSTER, "host_link_bandwidth", pcie)
    result = search_memo(wl, cl, (1,), top=1, baselines=False)
    plan, report = result.best.plan, result.best.report
    if plan.recompute == "tokenwise":
        choice = choose_alpha(plan, wl, cl)
        assert plan.offload <= max(0.0, min(1.0, choice.alpha_pcie)) + 1e-9
        assert report.time_breakdown_s.offload_stall <= 1e-9 * report.iteration_time_s + 1e-12
    else:
        # Plain swapping saves no recompute: its alpha is above zero only because device memory needs it.
        assert plan.recompute == "none"
        if plan.offload > 0:
            lower = plan.model_copy(update={"offload": max(0.0, round(plan.offload - 0.05, 3))})
            assert not evaluate(lower, wl, cl).fits_memory


@settings(max_examples=10, deadline=None)
@given(seq=SEQS, pcie=PCIE, factor=st.sampled_from([1.5, 2.0, 4.0]))
def test_more_host_memory_or_faster_pcie_never_lowers_mfu(seq, pcie, factor):
    wl = load_workload("llama2-7b", seq)
    cl = with_link_bandwidth(CLUSTER, "host_link_bandwidth", pcie)
    base = search_memo(wl, cl, (1,), top=1, baselines=False).best.report.mfu
    faster = search_memo(
        wl, with_link_bandwidth(CLUSTER, "host_link_bandwidth", pcie * factor), (1,), top=1, baselines=False
    ).best.report.mfu
    bigger = search_memo(
        wl, with_host_memory(cl, cl.node_groups[0].node.host.memory * factor), (1,), top=1, baselines=False
    ).best.report.mfu
    assert faster >= base - 1e-9 and bigger >= base - 1e-9


GAP = 0.05  # alpha this far from alpha_pcie is clearly on one side of it


@settings(max_examples=15, deadline=None)
@given(seq=st.sampled_from([4096, 16384, 65536]), pcie=st.sampled_from([1e9, 4e9, 16e9, 32e9, 64e9]), data=st.data())
def test_stall_appears_exactly_when_alpha_exceeds_what_pcie_hides(seq, pcie, data):
    wl = load_workload("llama2-7b", seq)
    cl = with_link_bandwidth(with_host_memory(CLUSTER, 64 * 2**40), "host_link_bandwidth", pcie)
    layout = Plan(tp=8, sequence_parallel=True)
    limit = choose_alpha(layout, wl, cl).alpha_pcie
    # alpha drawn inside [0, 1], below alpha_pcie (no stall) or above it (a stall), on a side that exists.
    sides = {"hidden": (0.0, limit - GAP), "stalls": (limit + GAP, 1.0)}
    open_sides = sorted(name for name, (lo, hi) in sides.items() if lo <= hi)
    assert open_sides, f"alpha_pcie={limit} leaves no room on either side"
    side = data.draw(st.sampled_from(open_sides), label="side")
    event(f"alpha {side}")
    alpha = data.draw(st.floats(*sides[side]), label="alpha")
    report = evaluate(layout.model_copy(update={"recompute": "tokenwise", "offload": alpha}), wl, cl)
    assert (report.time_breakdown_s.offload_stall > 0) == (side == "stalls")


def test_memo_alpha_zero_is_full_recompute_without_the_attention_core():
    wl = load_workload("llama2-7b", 32768)
    one_gpu = load_cluster("hgx-a800", devices_per_node=1)
    memo = evaluate(Plan(recompute="tokenwise", offload=0.0), wl, one_gpu).time_breakdown_s.recompute
    full = evaluate(Plan(recompute="full"), wl, one_gpu).time_breakdown_s.recompute
    core = evaluate(Plan(recompute="selective"), wl, one_gpu).time_breakdown_s.recompute
    assert memo == pytest.approx(full - core, rel=1e-9)


def test_search_memo_cli_json_shape_and_out(simulate, tmp_path):
    out = tmp_path / "plan.yaml"
    result = simulate(
        "search",
        "memo",
        "--workload",
        "llama2-7b",
        "--cluster",
        "hgx-a800",
        "--seq-len",
        "131072",
        "--json",
        "--out",
        str(out),
    )
    assert result.code == 0, result.out + result.err
    data = json.loads(result.out)
    assert set(data) >= {"best", "candidates", "baselines", "search_time_s"}
    assert {b["name"] for b in data["baselines"]} >= {
        "megatron-tp-sp-cp-full",
        "megatron-tp-sp-cp-selective",
        "deepspeed-ulysses-zero3-full",
    }
    assert data["best"]["plan"]["recompute"] in ("tokenwise", "none")
    again = simulate(
        "search", "memo", "--workload", "llama2-7b", "--cluster", "hgx-a800", "--seq-len", "131072", "--out", str(out)
    )
    assert again.code == 2 and "already exists" in (again.out + again.err)
    assert out.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sweep", "bogus=1"], "unknown key"),
        (["--sweep", "seq_len=abc"], "not an integer"),
        (["--micro-batch", "x"], "comma-separated integers"),
        (["--top", "0"], "--top"),
    ],
)
def test_search_memo_bad_input(simulate, args, message):
    result = simulate("search", "memo", "--workload", "llama2-7b", "--cluster", "hgx-a800", "--seq-len", "65536", *args)
    assert result.code == 2 and message in (result.out + result.err)


def test_sweep_seq_len_table(simulate):
    result = simulate(
        "search",
        "memo",
        "--workload",
        "llama2-7b",
        "--cluster",
        "hgx-a800",
        "--sweep",
        "seq_len=32768,131072",
        "--json",
    )
    assert result.code == 0, result.out + result.err
    rows = json.loads(result.out)
    assert [r["seq_len"] for r in rows] == ["32768", "131072"] and all("alpha" in r for r in rows)
