"""The discrete-event engine: agreement with the analytic model where nothing contends, properties of
its timeline (lower bounds, contention, memory, determinism), traces and plots."""

from __future__ import annotations

import json
from collections import Counter
from itertools import pairwise

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hwmodel import load_cluster
from simulator.analytic import evaluate
from simulator.binding import bind
from simulator.des import des_report, simulate
from simulator.des.engine import Simulation
from simulator.des.trace import trace_events, write_trace
from simulator.plan import Plan
from workloads import load_workload

SETTINGS = settings(
    max_examples=40,
    # One simulation takes under 1 ms to tens of ms, mostly by how warm the model's caches are: a deadline
    # would measure the cache, not the engine.
    deadline=None,
    # The same examples on every run keep the suite's verdict and time the same on every machine; CI keeps no
    # example database to replay a random failure from.
    derandomize=True,
)
DP_TYPES = ["ddp", "zero1", "zero2", "zero3"]
WORKLOADS = {
    name: load_workload(name) for name in ("gpt3-350m", "llama2-7b", "bert-large", "t5-large-32", "vit-huge-32")
}
CLUSTERS = {
    "dgx1": load_cluster("dgx-a100-80g"),
    "dgx2": load_cluster("dgx-a100-80g", nodes=2),
    "h100x4": load_cluster("dgx-h100", nodes=4),
    "mixed": load_cluster("mixed-a100-v100"),
}


@st.composite
def plans(draw, max_pp: int = 4, schedules=("1f1b", "gpipe", "interleaved"), one_kind_of_traffic: bool = False):
    """A plan that binds (degrees divide the cluster and the model, the batch splits). With
    `one_kind_of_traffic` (and max_pp=1) only one kind of communication runs: tensor parallelism alone
    (dp=1), or data-parallel gradient reduction alone (tp=1, no ZeRO-3, whose gathers overlap compute)."""
    workload = WORKLOADS[draw(st.sampled_from(sorted(WORKLOADS)))]
    cluster_key = draw(st.sampled_from(sorted(CLUSTERS)))
    cluster = CLUSTERS[cluster_key]
    n = cluster.num_devices
    tps = [t for t in (1, 2, 4, 8) if n % t == 0 and workload.num_heads % t == 0]
    if one_kind_of_traffic:
        tps = [t for t in tps if t == 1 or t == n]
    tp = draw(st.sampled_from(tps))
    pp = draw(st.sampled_from([p for p in (1, 2, 4) if p <= max_pp and n % (tp * p) == 0]))
    dp = n // (tp * pp)
    schedule = draw(st.sampled_from(schedules)) if pp > 1 else "1f1b"
    micro_batch = draw(st.sampled_from([1, 2]))
    num_micro = draw(st.sampled_from([1, 2, 4])) * (pp if schedule == "interleaved" else 1)
    plan = Plan(
        tp=tp,
        pp=pp,
        dp=dp,
        micro_batch=micro_batch,
        global_batch=micro_batch * dp * num_micro,
        dp_type=draw(st.sampled_from(["ddp", "zero1", "zero2"] if one_kind_of_traffic and dp > 1 else DP_TYPES)),
        recompute=draw(st.sampled_from(["none", "selective", "full"])),
        # Sequence parallelism cuts the sequence over tp (vit-huge-32's 256 patches + 1 class token cut no way).
        sequence_parallel=draw(st.booleans()) and tp > 1 and workload.seq_len % tp == 0,
        schedule=schedule,
        virtual_stages=2 if schedule == "interleaved" else 1,
    )
    return workload, cluster, plan


def _bind(workload, cluster, plan):
    """`plans` draws only plans that bind: InfeasiblePlan here fails the test (strategy or binding is wrong)."""
    return bind(plan, workload, cluster)


# ---- agreement with the analytic model ----------------------------------------------------------
@SETTINGS
@given(case=plans(max_pp=1, one_kind_of_traffic=True))
def test_single_stage_without_contention_agrees_with_analytic(case):
    # One stage, and one kind of communication on the links: tensor parallel alone, or data-parallel
    # gradient reduction alone (ZeRO-3 gathers overlap compute by design and are excluded).
    workload, cluster, plan = case
    dp = cluster.num_devices // plan.tp
    assert (dp == 1) or (plan.tp == 1 and plan.dp_type != "zero3")
    bound = _bind(workload, cluster, plan)
    analytic = evaluate(plan, workload, cluster)
    des = des_report(Simulation(bound).run())
    assert des.iteration_time_s == pytest.approx(analytic.iteration_time_s, rel=0.01)
    assert des.peak_memory_bytes == pytest.approx(analytic.peak_memory_bytes, rel=1e-9)


@SETTINGS
@given(case=plans(schedules=("1f1b", "gpipe")))
def test_peak_memory_equals_analytic_for_gpipe_and_1f1b(case):
    # The analytic peak is the closed form of the same memory timeline (not for interleaving, where
    # the analytic model assumes equal model chunks).
    workload, cluster, plan = case
    bound = _bind(workload, cluster, plan)
    analytic = evaluate(plan, workload, cluster)
    des = des_report(Simulation(bound).run())
    assert des.peak_memory_bytes == pytest.approx(analytic.peak_memory_bytes, rel=1e-9)


def test_a_uniform_pipeline_agrees_with_the_closed_form():
    workload, cluster = WORKLOADS["llama2-7b"], CLUSTERS["dgx2"]
    plan = Plan(tp=4, pp=4, micro_batch=1, global_batch=32)
    analytic = evaluate(plan, workload, cluster)
    des = des_report(simulate(plan, workload, cluster))
    assert des.iteration_time_s == pytest.approx(analytic.iteration_time_s, rel=0.01)


# ---- timeline properties ------------------------------------------------------------------------
@SETTINGS
@given(case=plans())
def test_iteration_is_at_least_the_critical_path_lower_bounds(case):
    workload, cluster, plan = case
    result = Simulation(_bind(workload, cluster, plan)).run()
    for rep in result.reps:
        # A stream cannot run its tasks faster than their uncontended durations, one after the other.
        serial = rep.busy.get("compute", 0.0) + rep.busy.get("recompute", 0.0) + rep.busy.get("optimizer", 0.0)
        assert result.iteration_time >= serial * (1 - 1e-12)
    # The first micro-batch must go forward through every stage and back before the last stage's
    # backward of it: a chain of the stages' uncontended compute.
    chain = sum(
        max(r.cost.runs and sum(rc.count * rc.times.forward for rc in r.cost.runs) for r in reps)
        for reps in result.stage_reps
    )
    chain += sum(
        max(sum(rc.count * (rc.times.backward + rc.recompute) for rc in r.cost.runs) for r in reps)
        for reps in result.stage_reps
    )
    assert result.iteration_time >= chain * (1 - 1e-12)


@SETTINGS
@given(
    case=plans(),
    port=st.sampled_from(["intra.tx", "intra.rx", "nic.tx", "nic.rx", "pcie.tx"]),
    start_fraction=st.floats(0.0, 0.9),
    gigabytes=st.floats(0.01, 50.0),
    rep_choice=st.integers(0, 100),
)
@example(
    case=(WORKLOADS["gpt3-350m"], CLUSTERS["dgx2"], Plan(tp=2, pp=2, global_batch=64)),
    port="nic.tx",
    start_fraction=0.5,
    gigabytes=5.0,
    rep_choice=0,
)
def test_a_competing_flow_never_makes_the_iteration_finish_earlier(case, port, start_fraction, gigabytes, rep_choice):
    workload, cluster, plan = case
    bound = _bind(workload, cluster, plan)
    base = Simulation(bound).run()
    rep = rep_choice % len(base.reps)
    busy = Simulation(bound, background=((rep, port, start_fraction * base.iteration_time, gigabytes * 1e9),)).run()
    assert busy.iteration_time >= base.iteration_time * (1 - 1e-12)
    for before, after in zip(base.reps, busy.reps):
        assert after.finish >= before.finish * (1 - 1e-12)

    # Task by task: each compute task (its n-th occurrence on its representative) ends no earlier.
    def ends(result):
        seen, out = Counter(), {}
        for rep_index, name, _, end in result.compute_tasks:
            seen[(rep_index, name)] += 1
            out[(rep_index, name, seen[(rep_index, name)])] = end
        return out

    before, after = ends(base), ends(busy)
    assert before.keys() == after.keys()
    for key, end in before.items():
        assert after[key] >= end - 1e-9 * max(1.0, end), key


@SETTINGS
@given(case=plans())
def test_memory_returns_to_its_steady_level_after_the_iteration(case):
    workload, cluster, plan = case
    result = Simulation(_bind(workload, cluster, plan)).run()
    for rep in result.reps:
        assert rep.memory_now == pytest.approx(rep.memory_base, rel=1e-9, abs=1.0)
        assert min(b for _, b in rep.memory_events) >= rep.memory_base * (1 - 1e-9)
        assert rep.memory_peak == pytest.approx(max(b for _, b in rep.memory_events))


@SETTINGS
@given(case=plans())
def test_deterministic(case):
    workload, cluster, plan = case
    bound = _bind(workload, cluster, plan)
    first = Simulation(bound, record_trace=True).run()
    second = Simulation(bind(plan, workload, cluster), record_trace=True).run()
    assert des_report(first).model_dump() == des_report(second).model_dump()
    assert trace_events(first) == trace_events(second)


# ---- symmetry and scale -------------------------------------------------------------------------
def test_uniform_plans_collapse_to_one_representative_per_stage():
    workload = load_workload("gpt3-175b")
    cluster = load_cluster("dgx-a100-80g", nodes=128)
    plan = Plan(tp=8, pp=16, dp=8, micro_batch=1, global_batch=512, schedule="1f1b")
    result = simulate(plan, workload, cluster)
    assert len(result.reps) == 16
    assert [r.num_ranks for r in result.reps] == [64] * 16


def test_heterogeneous_stages_keep_their_device_types_apart():
    workload = load_workload("llama2-7b").with_seq_len(2048)
    cluster = CLUSTERS["mixed"]
    mixed_stage = simulate(Plan(tp=8, micro_batch=1, global_batch=8, dtype="fp16"), workload, cluster)
    assert sorted(r.cost.device.name for r in mixed_stage.reps) == ["a100-40g", "v100-32g"]
    # The slower V100s set the pace: the A100 representative waits for them.
    a100 = next(r for r in mixed_stage.reps if r.cost.device.name == "a100-40g")
    assert a100.busy.get("idle", 0.0) > 0


# ---- trace and plot -------------------------------------------------------------------------------
def test_trace_matches_the_task_graph(tmp_path):
    workload, cluster = WORKLOADS["gpt3-350m"], CLUSTERS["dgx2"]
    plan = Plan(tp=2, pp=2, dp=4, micro_batch=1, global_batch=32, dp_type="zero1")
    result = Simulation(bind(plan, workload, cluster), record_trace=True).run()
    path = tmp_path / "trace.json"
    write_trace(result, path)
    data = json.loads(path.read_text())
    assert isinstance(data["traceEvents"], list)
    complete = [e for e in data["traceEvents"] if e["ph"] == "X"]
    for event in complete:
        assert {"ph", "ts", "dur", "pid", "tid", "name"} <= set(event)
        assert event["dur"] > 0 and event["ts"] >= 0
    # Every compute task of the task graph appears exactly once on its representative's compute track.
    compute = [e for e in complete if e["tid"] == 0]
    expected = Counter((rep, name) for rep, name, start, end in result.compute_tasks if end > start)
    assert Counter((e["pid"], e["name"]) for e in compute) == expected
    # A compute stream runs one task at a time.
    for pid in {e["pid"] for e in compute}:
        spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in compute if e["pid"] == pid)
        for (_, end), (start, _) in pairwise(spans):
            assert start >= end - 1e-6
    # Named processes and a memory counter per representative.
    names = [e for e in data["traceEvents"] if e["ph"] == "M" and e["name"] == "process_name"]
    assert len(names) == len(result.reps)
    assert any(e["ph"] == "C" and e["name"] == "memory" for e in data["traceEvents"])


def test_plot_writes_a_png(tmp_path):
    from simulator.des.plot import plot_timeline

    workload, cluster = WORKLOADS["gpt3-350m"], CLUSTERS["dgx1"]
    result = Simulation(bind(Plan(pp=2, global_batch=16), workload, cluster), record_trace=True).run()
    path = tmp_path / "timeline.png"
    plot_timeline(result, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000


def test_contention_slows_a_shared_nic():
    # The data-parallel gradient reduction of this plan crosses nodes: the event engine puts it on each
    # NIC, and traffic sharing that NIC makes the whole iteration longer.
    workload, cluster = WORKLOADS["llama2-7b"], load_cluster("dgx-a100-80g", nodes=4)
    plan = Plan(tp=8, pp=2, dp=2, micro_batch=1, global_batch=16)
    bound = bind(plan, workload, cluster)
    quiet = Simulation(bound, record_trace=True).run()
    assert any(e.track == "nic" and e.category == "reduce" for e in quiet.trace)
    report = des_report(quiet)
    assert any("nic" in name for name in report.link_utilization)
    assert all(0 < u <= 1 + 1e-9 for u in report.link_utilization.values())
    # 20 GB more on every representative's NIC, sent while the gradients are reduced.
    start = 0.9 * quiet.iteration_time
    busy = Simulation(bound, background=tuple((r.index, "nic.tx", start, 20e9) for r in quiet.reps)).run()
    assert busy.iteration_time > quiet.iteration_time * 1.01
