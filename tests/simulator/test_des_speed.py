"""The discrete-event engine's shortcuts give the full simulation's answer, and the engine always ends.

Shortcuts: collectives alone on their ports as timers, the steady state of a long pipeline costed once
(simulator/des/steady.py). Termination: time advances on every timer, and a bound on events derived
from the plan's task count turns a runaway into a UserError (issue 20: the inputs that hung)."""

from __future__ import annotations

import math

import pytest
import simpy
from hypothesis import given, settings
from hypothesis import strategies as st

from hwmodel import load_cluster
from hwmodel.errors import UserError
from simulator.binding import bind
from simulator.des import des_report, steady
from simulator.des.engine import EventBoundExceeded, Simulation, run_bounded
from simulator.des.fluid import FluidNetwork, Port, resolution
from simulator.plan import Plan
from workloads import load_workload

SETTINGS = settings(
    max_examples=25,
    deadline=None,  # a simulation's time is not what these tests judge
    derandomize=True,  # the same examples everywhere; CI keeps no example database
)
WORKLOADS = {name: load_workload(name) for name in ("gpt3-350m", "llama2-7b", "bert-large")}
CLUSTERS = {"dgx2": load_cluster("dgx-a100-80g", nodes=2), "h100x4": load_cluster("dgx-h100", nodes=4)}


@st.composite
def pipelines(draw):
    """A pipeline plan that binds, with enough micro-batches for the steady state to be costed once."""
    workload = WORKLOADS[draw(st.sampled_from(sorted(WORKLOADS)))]
    cluster = CLUSTERS[draw(st.sampled_from(sorted(CLUSTERS)))]
    n = cluster.num_devices
    pp = draw(st.sampled_from([2, 4]))
    tp = draw(st.sampled_from([t for t in (1, 2, 4, 8) if n % (t * pp) == 0 and workload.num_heads % t == 0]))
    dp = n // (tp * pp)
    schedule = draw(st.sampled_from(["1f1b", "interleaved"]))
    # Past the two shorter runs' m1 + m2 (steady.run_sizes), so the extrapolation is taken when it holds.
    groups = draw(st.integers(6, 10))
    num_micro = groups * pp if schedule == "interleaved" else pp + 2 + 4 * groups + draw(st.integers(0, 3))
    plan = Plan(
        tp=tp,
        pp=pp,
        dp=dp,
        global_batch=dp * num_micro,
        dp_type=draw(st.sampled_from(["ddp", "zero1", "zero3"])),
        recompute=draw(st.sampled_from(["none", "selective", "full"])),
        schedule=schedule,
        virtual_stages=2 if schedule == "interleaved" else 1,
    )
    return workload, cluster, plan


def _compare(fast, full) -> None:
    """Iteration time, every representative's memory peak and busy time within 0.1% (the brief's bar;
    they agree to rounding)."""
    assert fast.iteration_time == pytest.approx(full.iteration_time, rel=1e-3)
    for a, b in zip(fast.reps, full.reps, strict=True):
        assert a.memory_peak == pytest.approx(b.memory_peak, rel=1e-3)
        assert a.finish == pytest.approx(b.finish, rel=1e-3)
        for key in set(a.busy) | set(b.busy):
            assert a.busy.get(key, 0.0) == pytest.approx(b.busy.get(key, 0.0), rel=1e-3, abs=1e-9 * b.finish)
    assert des_report(fast).peak_memory_bytes == pytest.approx(des_report(full).peak_memory_bytes, rel=1e-3)


@SETTINGS
@given(case=pipelines())
def test_the_steady_state_costed_once_matches_every_micro_batch_simulated(case):
    workload, cluster, plan = case
    bound = bind(plan, workload, cluster)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(steady, "MIN_OPERATIONS", 0)  # small plans take the shortcut too
        fast = Simulation(bound).run()
    full = Simulation(bound, fast=False).run()
    assert full.simulated_micro_batches == (bound.num_micro_batches,)
    _compare(fast, full)


def test_the_shortcut_is_taken_on_a_long_pipeline():
    # gpt3-350m on 16 GPUs, pp=4, 512 micro-batches: two runs of 6 + (506 % 4) and 4 more stand for 512.
    bound = bind(Plan(tp=2, pp=4, dp=2, global_batch=1024), WORKLOADS["gpt3-350m"], CLUSTERS["dgx2"])
    fast = Simulation(bound).run()
    assert len(fast.simulated_micro_batches) == 2 and sum(fast.simulated_micro_batches) < bound.num_micro_batches
    full = Simulation(bound, fast=False).run()
    _compare(fast, full)
    assert fast.events < full.events


@SETTINGS
@given(case=pipelines())
def test_collectives_alone_on_their_ports_as_timers_match_the_fluid_network(case):
    workload, cluster, plan = case
    bound = bind(plan, workload, cluster)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(steady, "MIN_OPERATIONS", math.inf)  # only the timer shortcut differs
        fast = Simulation(bound).run()
    assert fast.simulated_micro_batches == (bound.num_micro_batches,)
    _compare(fast, Simulation(bound, fast=False).run())


def test_a_job_shorter_than_the_clock_resolution_completes_and_time_advances():
    env = simpy.Environment(initial_time=1e9)  # one float step here is about 1.2e-7 s
    net = FluidNetwork(env)
    port = Port("link", capacity=1e9)
    tiny = net.transfer(1e-6, (port,))  # 1e-15 s of transfer: below the clock's resolution
    big = net.transfer(1e9, (port,))
    run_bounded(env, 100)
    assert tiny.processed and big.processed
    assert env.now > 1e9
    assert resolution(1e9) > 1e-12  # a fixed epsilon would leave the job running forever


def test_a_runaway_is_stopped_by_the_event_bound():
    env = simpy.Environment()

    def forever():
        while True:
            yield env.timeout(0)

    env.process(forever())
    with pytest.raises(EventBoundExceeded, match="bound derived from the plan's task count"):
        run_bounded(env, 1000)


def _hung_inputs():
    """The inputs of issue 20 that hung the engine on main, built programmatically (the parsers may
    refuse some of them; the engine must cope anyway)."""
    cluster = CLUSTERS["dgx2"]
    device = cluster.node_groups[0].node.device
    node = cluster.node_groups[0].node
    workload = WORKLOADS["gpt3-350m"]
    plan = Plan(tp=2, pp=2, global_batch=64)
    slow_kernels = cluster.with_device(
        device.name, device.model_copy(update={"compute": device.compute.model_copy(update={"kernel_overhead": 1e9})})
    )
    slow_link = node.model_copy(update={"intra_node": node.intra_node.model_copy(update={"bandwidth": 1e-21})})
    crawling = cluster.replaced(node_groups=(cluster.node_groups[0].model_copy(update={"node": slow_link}),))
    # Built past the parsers' bounds on purpose (model_copy skips validation): the engine must end on its own.
    deep = workload.model_copy(update={"num_layers": 10**6})
    return {
        "kernel overhead 1e9 s": (plan, workload, slow_kernels),
        "NVSwitch at 1e-30 GB/s": (plan, workload, crawling),
        "global_batch 1e15": (plan.model_copy(update={"global_batch": 10**15}), workload, cluster),
        "num_layers 1e6": (plan, deep, cluster),
    }


@pytest.mark.parametrize("name", list(_hung_inputs()))
def test_inputs_that_hung_finish_or_are_refused(name):
    plan, workload, cluster = _hung_inputs()[name]
    bound = bind(plan, workload, cluster)
    simulation = Simulation(bound)
    try:
        result = simulation.run()
    except EventBoundExceeded as error:
        assert isinstance(error, UserError)  # the CLI prints it in one line and exits 2
        assert "--engine analytic" in str(error)
        return
    assert math.isfinite(result.iteration_time) and result.iteration_time > 0
    assert result.events <= simulation.event_bound()
    # A slower input never gives a shorter iteration than the plan on the catalog cluster.
    baseline = Simulation(bind(Plan(tp=2, pp=2, global_batch=64), WORKLOADS["gpt3-350m"], CLUSTERS["dgx2"])).run()
    assert result.iteration_time >= baseline.iteration_time


def test_a_plan_too_large_for_the_event_engine_is_refused_before_it_runs():
    plan, workload, cluster = _hung_inputs()["num_layers 1e6"]
    simulation = Simulation(bind(plan, workload, cluster))
    with pytest.raises(EventBoundExceeded, match="1,000,000 layers"):
        simulation.run()
    assert simulation.env.now == 0  # refused up front: nothing ran


def test_the_cli_refuses_a_plan_beyond_the_event_bound_with_exit_2(simulate):
    # gpipe has no steady state to cost once: 16 million micro-batches over 8 stages would all be events
    # (the largest global batch the plan parser accepts).
    plan = "tp=2,pp=8,global_batch=16000000,schedule=gpipe"
    result = simulate("run", "-w", "gpt3-350m", "-c", "dgx-a100-80g", "--nodes", "2", "-p", plan, "--engine", "des")
    assert result.code == 2
    assert "events" in result.err and "--engine analytic" in result.err
    assert "Traceback" not in result.err


def test_a_transfer_that_would_end_beyond_any_float_is_refused_not_dropped():
    # 1e-300 B/s: the transfer's end is inf; the engine must not report the streams that never ended as
    # an iteration that finished early.
    cluster = CLUSTERS["dgx2"]
    node = cluster.node_groups[0].node
    slow = node.model_copy(update={"intra_node": node.intra_node.model_copy(update={"bandwidth": 1e-300})})
    crawling = cluster.replaced(node_groups=(cluster.node_groups[0].model_copy(update={"node": slow}),))
    simulation = Simulation(bind(Plan(tp=2, pp=2, global_batch=64), WORKLOADS["gpt3-350m"], crawling))
    with pytest.raises(EventBoundExceeded, match="cannot finish this iteration"):
        simulation.run()
