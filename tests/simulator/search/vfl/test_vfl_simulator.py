"""The VFL simulator: known round and epoch times, properties of the timeline (links, local updates, bounds,
determinism), the statistical-efficiency model and its fits, and `simulate search vfl` / `simulate run`."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hwmodel import load_cluster
from simulator.binding import bind
from simulator.errors import UnsupportedPlan
from simulator.plan import FederatedSpec, Plan
from simulator.search.vfl.costs import timing_model
from simulator.search.vfl.efficiency import (
    AucCurve,
    EfficiencyModel,
    LocalValue,
    fit_curve,
    fit_local_value,
    load_efficiency,
)
from simulator.search.vfl.engine import Direction, PartyCompute, TimingModel, simulate_mode
from simulator.search.vfl.search import search_vfl, with_wan
from workloads import load_workload
from workloads.vfl import activation_bytes, batches_per_epoch, load_vfl_workload

SETTINGS = settings(max_examples=30, deadline=None)
CLUSTER = load_cluster("two-sites-wan")
WDL = load_vfl_workload("vfl-wdl")
SMALL_GRID = dict(worksets=(1, 2, 4), updates=(2, 4))


TOY_ACTIVE = PartyCompute(0.004, 0.006, 0.01)
TOY_PASSIVE = PartyCompute(0.003, 0.005, 0.008)


def toy(
    bandwidth: float = 10e6,
    latency: float = 0.02,
    nbytes: float = 1e6,
    rounds: int = 50,
    active: PartyCompute = TOY_ACTIVE,
    passive: PartyCompute = TOY_PASSIVE,
) -> TimingModel:
    link = Direction(bandwidth, latency)
    return TimingModel(active, passive, nbytes, nbytes, link, link, rounds)


def vanilla_round(m: TimingModel) -> float:
    compute = m.active.forward_s + m.active.backward_s + m.passive.forward_s + m.passive.backward_s
    return compute + m.to_active.message_time(m.forward_bytes) + m.to_passive.message_time(m.backward_bytes)


# ---- known values -----------------------------------------------------------------------------------------
def test_vanilla_epoch_is_rounds_times_compute_plus_two_messages():
    m = toy()
    timeline = simulate_mode(m, "vanilla", 1, 1)
    expected_round = 0.004 + 0.006 + 0.003 + 0.005 + 2 * (0.02 + 1e6 / 10e6)
    assert timeline.round_time_s == pytest.approx(expected_round, rel=1e-9)
    assert timeline.epoch_time_s == pytest.approx(50 * expected_round, rel=1e-9)
    assert timeline.local_updates_per_round == {"active": 0.0, "passive": 0.0}


def test_vanilla_on_two_sites_wan_uses_the_spec_link():
    m = timing_model(WDL, CLUSTER)
    # The WAN link's bandwidth at its efficiency and its one-way latency (the slowest hop between the sites),
    # and the workload's float32 activations: one row of the interface per sample of the batch.
    wan = CLUSTER.wan[0].link
    assert m.to_active.bandwidth == pytest.approx(wan.bandwidth * wan.efficiency)
    assert m.to_active.latency == pytest.approx(wan.latency)
    assert m.forward_bytes == activation_bytes(WDL) == WDL.batch_size * WDL.interface_dim * 4
    assert m.rounds_per_epoch == batches_per_epoch(WDL)
    timeline = simulate_mode(m, "vanilla")
    assert timeline.epoch_time_s == pytest.approx(m.rounds_per_epoch * vanilla_round(m), rel=1e-9)
    # The WAN dominates this workload: the two messages are most of a round.
    assert timeline.communication_s > 0.7 * timeline.round_time_s


def test_fedbcd_round_adds_the_passive_local_steps():
    # R=4 uses: the fresh update and 3 local steps. The active party's (3 x 1 ms) hide behind the passive's.
    m = toy(active=PartyCompute(0.004, 0.006, 0.001))
    timeline = simulate_mode(m, "fedbcd", 1, 4)
    assert timeline.round_time_s == pytest.approx(vanilla_round(m) + 3 * 0.008, rel=1e-9)
    assert timeline.local_updates_per_round == {"active": 3.0, "passive": 3.0}
    assert set(timeline.staleness["passive"]) == {1, 2, 3}
    assert simulate_mode(m, "fedbcd", 1, 1).round_time_s == pytest.approx(vanilla_round(m), rel=1e-9)


def test_celu_local_updates_hide_behind_a_slow_link():
    # Each party idles ~0.2 s per round on the network; 3 local updates of <= 10 ms fit in it.
    m = toy(rounds=200)
    celu = simulate_mode(m, "celu", 4, 4, full=True)
    for party in ("active", "passive"):
        assert 2.9 <= celu.local_updates_per_round[party] <= 3.0
        assert max(celu.staleness[party]) <= 4 * 4  # the W x R staleness bound
    assert celu.room_wait_per_round_s == {"active": 0.0, "passive": 0.0}
    assert celu.round_time_s < vanilla_round(m) * 1.05


def test_celu_stalls_the_round_when_local_work_cannot_keep_up():
    slow = PartyCompute(0.004, 0.006, 0.05)
    m = toy(bandwidth=1e9, latency=0.0001, active=slow, passive=slow, rounds=120)
    celu = simulate_mode(m, "celu", 2, 8, full=True)
    # Each batch still gets its 7 local updates: the next batch waits for room, so the round is compute-bound.
    assert celu.local_updates_per_round["passive"] == pytest.approx(7.0, abs=2 * 7 / 120)
    assert celu.room_wait_per_round_s["passive"] > 0
    assert celu.round_time_s >= 0.99 * (0.004 + 0.006 + 7 * 0.05)


# ---- properties -------------------------------------------------------------------------------------------
party = st.builds(PartyCompute, st.floats(1e-4, 0.05), st.floats(1e-4, 0.05), st.floats(1e-4, 0.1))
modes = st.sampled_from(
    [
        ("vanilla", 1, 1),
        ("fedbcd", 1, 2),
        ("fedbcd", 1, 4),
        ("celu", 1, 2),
        ("celu", 3, 3),
        ("celu", 5, 5),
        ("celu", 8, 3),
    ]
)


@SETTINGS
@given(
    active=party,
    passive=party,
    bw=st.floats(1e5, 1e9),
    lat=st.floats(0, 0.1),
    factor=st.floats(1.0, 10.0),
    mode=modes,
    nbytes=st.floats(1e3, 1e7),
)
def test_a_better_link_never_slows_a_mode(active, passive, bw, lat, factor, mode, nbytes):
    name, w, r = mode
    slow = simulate_mode(toy(bw, lat, nbytes, 200, active, passive), name, w, r)
    wider = simulate_mode(toy(bw * factor, lat, nbytes, 200, active, passive), name, w, r)
    nearer = simulate_mode(toy(bw, lat / factor, nbytes, 200, active, passive), name, w, r)
    for better in (wider, nearer):
        assert better.round_time_s <= slow.round_time_s * (1 + 1e-9)
        assert better.epoch_time_s <= slow.epoch_time_s * (1 + 1e-9)


@SETTINGS
@given(
    active=party, passive=party, bw=st.floats(1e5, 1e9), lat=st.floats(0, 0.1), w=st.integers(1, 8), r=st.integers(1, 8)
)
def test_celu_costs_at_most_its_local_work_and_never_beats_vanilla_per_round(active, passive, bw, lat, w, r):
    m = toy(bw, lat, 1e6, 60, active, passive)
    vanilla = simulate_mode(m, "vanilla")
    celu = simulate_mode(m, "celu", w, r, full=True)
    # Local updates never speed the exchange; at worst they all run in the critical path, one after the other.
    local_work = m.rounds_per_epoch * (r - 1) * (active.local_s + passive.local_s)
    assert vanilla.epoch_time_s * (1 - 1e-9) <= celu.epoch_time_s <= (vanilla.epoch_time_s + local_work) * (1 + 1e-9)
    for name in ("active", "passive"):
        assert celu.local_updates_per_round[name] <= r - 1 + 1e-9
        assert all(s <= w * r for s in celu.staleness[name])  # never older than W x R updates (the executor asserts it)
    fedbcd = simulate_mode(m, "fedbcd", 1, r)
    assert (
        vanilla.round_time_s * (1 - 1e-9)
        <= fedbcd.round_time_s
        <= vanilla.round_time_s + (r - 1) * (active.local_s + passive.local_s) + 1e-9
    )


@SETTINGS
@given(
    active=party, passive=party, bw=st.floats(1e5, 1e9), lat=st.floats(0, 0.1), w=st.integers(1, 6), r=st.integers(1, 8)
)
def test_speedup_over_vanilla_is_bounded_by_the_local_updates(active, passive, bw, lat, w, r):
    m = toy(bw, lat, 1e6, 60, active, passive)
    model = load_efficiency("vfl-wdl")
    vanilla, celu = simulate_mode(m, "vanilla"), simulate_mode(m, "celu", w, r)
    worth = model.round_worth(celu)
    assert 1.0 <= worth <= 1.0 + (r - 1) * model.local.rho + 1e-9
    target = model.default_target()
    assert model.mode_rounds_to(target, vanilla) == pytest.approx(model.curve.rounds_to(target))
    celu_rounds = model.mode_rounds_to(target, celu)
    assert celu_rounds <= model.curve.rounds_to(target) + 1e-9
    # Every round of CELU-VFL is worth at most 1 + (R-1) rho fresh ones and takes at least vanilla's round.
    speedup = vanilla.time_for(model.curve.rounds_to(target)) / celu.time_for(celu_rounds)
    assert speedup <= (1 + (r - 1) * model.local.rho) * (1 + 1e-9)


def test_same_inputs_same_prediction_bit_for_bit():
    a = search_vfl(WDL, CLUSTER, **SMALL_GRID).model_dump(exclude={"search_time_s"})
    b = search_vfl(WDL, CLUSTER, **SMALL_GRID).model_dump(exclude={"search_time_s"})
    assert a == b


def test_search_beats_its_baselines_and_carries_w_and_r():
    result = search_vfl(WDL, CLUSTER, **SMALL_GRID)
    best = result.best.report
    assert result.best.plan.federated.workset == best.workset
    assert result.best.plan.federated.local_updates == best.local_updates
    assert result.best.plan.federated.parties == tuple(CLUSTER.sites[:2])  # the default: the first two sites
    assert all(c.report.time_to_target_s >= best.time_to_target_s for c in result.candidates)
    for baseline in result.baselines[:2]:  # vanilla and FedBCD (the ablation may win: weighting is not free)
        assert baseline.report.time_to_target_s >= best.time_to_target_s * (1 - 1e-12)
    assert result.details["speedup_over_vanilla"] >= 1.0 and result.details["speedup_over_fedbcd"] >= 1.0


def test_a_faster_link_shrinks_celu_s_advantage_per_epoch():
    slow = search_vfl(WDL, with_wan(CLUSTER, 10e6 / 8, 0.05), **SMALL_GRID)
    fast = search_vfl(WDL, with_wan(CLUSTER, 10e9 / 8, 0.001), **SMALL_GRID)
    # On a fast link there is little network wait to hide local updates behind.
    assert fast.best.report.round_worth <= slow.best.report.round_worth + 1e-9


# ---- statistical efficiency -------------------------------------------------------------------------------
@SETTINGS
@given(limit=st.floats(0.6, 0.95), scale=st.floats(0.01, 5), power=st.floats(0.2, 3), frac=st.floats(0.01, 0.99))
def test_rounds_to_inverts_the_curve(limit, scale, power, frac):
    curve = AucCurve(auc_start=0.5, auc_limit=limit, scale_rounds=scale, power=power)
    target = 0.5 + frac * (limit - 0.5)
    assert float(curve.auc(curve.rounds_to(target))) == pytest.approx(target, abs=1e-9)
    assert curve.rounds_to(limit) == math.inf


def test_fits_recover_the_parameters_that_made_the_data():
    truth = AucCurve(auc_start=0.5, auc_limit=0.8, scale_rounds=40, power=1.3)
    rounds = [25 * k for k in range(1, 21)]
    fitted = fit_curve(rounds, truth.auc(rounds).tolist())
    assert fitted.auc_limit == pytest.approx(0.8, abs=2e-3)
    assert float(fitted.auc(200)) == pytest.approx(float(truth.auc(200)), abs=1e-4)

    local = LocalValue(rho=0.6, tau=15.0, kappa=0.8)
    m = toy()
    runs = []
    for mode, w, r in (("fedbcd", 1, 5), ("celu", 4, 4), ("celu", 8, 9)):
        timeline = simulate_mode(m, mode, w, r)
        model = EfficiencyModel(workload="toy", curve=truth, local=local, reference_rounds=500, fitted=True)
        runs.append((timeline, rounds[:8], model.auc_after(rounds[:8], timeline).tolist()))
    got = fit_local_value(truth, runs)
    for timeline, _, _ in runs:  # what matters: each run's worth is reproduced
        want = EfficiencyModel(workload="t", curve=truth, local=local, reference_rounds=500, fitted=True).round_worth(
            timeline
        )
        have = EfficiencyModel(workload="t", curve=truth, local=got, reference_rounds=500, fitted=True).round_worth(
            timeline
        )
        assert have == pytest.approx(want, rel=0.02)


# ---- CLI --------------------------------------------------------------------------------------------------
FAST = ("--workset", "1,2,4", "--local-updates", "2,4")


def test_search_json_has_the_shared_shape(simulate):
    r = simulate("search", "vfl", "--workload", "vfl-wdl", "--cluster", "two-sites-wan", "--json", *FAST)
    assert r.code == 0, r.err
    data = json.loads(r.out)
    assert {"best", "candidates", "baselines", "search_time_s"} <= set(data)
    assert set(data["best"]) == {"plan", "report"}
    assert data["best"]["plan"]["federated"]["workset"] in (1, 2, 4)
    assert data["best"]["report"]["mode"] == "celu"
    assert {b["report"]["mode"] for b in data["baselines"]} >= {"vanilla", "fedbcd"}
    # The plan tells the executor which mode to run.
    assert data["best"]["plan"]["federated"]["mode"] == "celu"
    assert [b["plan"]["federated"]["mode"] for b in data["baselines"][:2]] == ["vanilla", "fedbcd"]
    assert data["details"]["speedup_over_vanilla"] >= 1.0


def test_search_table_names_the_speedups(simulate):
    r = simulate("search", "vfl", "-w", "vfl-wdl", "-c", "two-sites-wan", "--target-auc", "0.7", *FAST)
    assert r.code == 0, r.err
    assert "CELU-VFL" in r.out and "vanilla VFL" in r.out and "FedBCD" in r.out
    assert "faster to the target than vanilla VFL" in r.out


@pytest.mark.parametrize("target", ["0.3", "1.5", "0.99"])
def test_bad_target_auc_exits_2(simulate, target):
    r = simulate("search", "vfl", "--workload", "vfl-wdl", "--cluster", "two-sites-wan", "--target-auc", target)
    assert r.code == 2
    assert "--target-auc" in r.err


def test_unknown_workload_suggests_the_vfl_ones(simulate):
    r = simulate("search", "vfl", "--workload", "vfl-wd", "--cluster", "two-sites-wan")
    assert r.code == 2
    assert "unknown VFL workload 'vfl-wd'" in r.err and "vfl-wdl" in r.err
    r = simulate("search", "vfl", "--workload", "llama2-7b", "--cluster", "two-sites-wan")
    assert r.code == 2 and "transformer workload" in r.err


def test_one_site_cluster_and_unknown_party_site_exit_2(simulate):
    r = simulate("search", "vfl", "--workload", "vfl-wdl", "--cluster", "dgx-a100-80g")
    assert r.code == 2 and "two parties" in r.err
    r = simulate("search", "vfl", "--workload", "vfl-wdl", "--cluster", "two-sites-wan", "--parties", "dc-a,dc-z")
    assert r.code == 2 and "'dc-z' is not a site" in r.err


def test_sweep_prints_one_row_per_link(simulate):
    r = simulate(
        "search",
        "vfl",
        "-w",
        "vfl-wdl",
        "-c",
        "two-sites-wan",
        "--sweep-bandwidth",
        "10,1000Mbit/s",
        "--sweep-latency",
        "5ms,50ms",
        "--json",
        *FAST,
    )
    assert r.code == 0, r.err
    rows = json.loads(r.out)["rows"]
    assert [(row["bandwidth"], row["latency_s"]) for row in rows] == [
        (1.25e6, 0.005),
        (1.25e6, 0.05),
        (1.25e8, 0.005),
        (1.25e8, 0.05),
    ]
    assert all(row["speedup_over_vanilla"] >= 1.0 for row in rows)
    r = simulate("search", "vfl", "-w", "vfl-wdl", "-c", "two-sites-wan", "--sweep-latency", "5GB", *FAST)
    assert r.code == 2 and "--sweep-latency" in r.err


def test_out_writes_a_plan_that_simulate_run_predicts(simulate, tmp_path):
    plan = tmp_path / "plan.yaml"
    r = simulate("search", "vfl", "-w", "vfl-wdl", "-c", "two-sites-wan", "--out", plan, "--json", *FAST)
    assert r.code == 0, r.err
    chosen = json.loads(r.out)["best"]["report"]
    r = simulate("search", "vfl", "-w", "vfl-wdl", "-c", "two-sites-wan", "--out", plan, *FAST)
    assert r.code == 2 and "--force" in r.err
    r = simulate("run", "--workload", "vfl-wdl", "--cluster", "two-sites-wan", "--plan", plan, "--json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    assert (report["mode"], report["workset"], report["local_updates"]) == (
        "celu",
        chosen["workset"],
        chosen["local_updates"],
    )
    # run simulates the whole epoch; the search screens to the steady state and extrapolates.
    assert report["epoch_time_s"] == pytest.approx(chosen["epoch_time_s"], rel=0.02)
    r = simulate("run", "--workload", "vfl-wdl", "--cluster", "two-sites-wan")
    assert r.code == 0 and "vanilla VFL" in r.out and "simulate search vfl" in r.out
    r = simulate("run", "--workload", "vfl-wdl", "--cluster", "two-sites-wan", "--engine", "analytic")
    assert r.code == 2 and "event engine" in r.err


def test_transformer_plan_with_federated_section_points_to_vfl(dgx_a100):
    plan = Plan(federated=FederatedSpec(parties=("a", "b")))
    with pytest.raises(UnsupportedPlan, match="simulate search vfl"):
        bind(plan, load_workload("gpt3-350m"), dgx_a100)


def test_compare_sweeps_the_wan_for_a_vfl_workload(simulate, tmp_path):
    out = tmp_path / "sweep.csv"
    r = simulate(
        "compare", "-w", "vfl-wdl", "-c", "two-sites-wan", "--sweep", "wan_bandwidth=10,1000Mbit/s", "--csv", out
    )
    assert r.code == 0, r.err
    assert "10 Mbit/s" in r.out and "1 Gbit/s" in r.out
    assert len(out.read_text().strip().splitlines()) == 3  # header and two rows
    r = simulate("compare", "-w", "vfl-wdl", "-c", "two-sites-wan", "--sweep", "tp=1,2")
    assert r.code == 2 and "wan_bandwidth or wan_latency" in r.err


def test_run_predicts_the_plan_s_mode_and_refuses_a_vanilla_plan_with_local_updates(simulate):
    fedbcd = '{"federated": {"parties": ["dc-a", "dc-b"], "mode": "fedbcd", "workset": 1, "local_updates": 4}}'
    r = simulate("run", "-w", "vfl-wdl", "-c", "two-sites-wan", "--plan", fedbcd, "--json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    assert (report["mode"], report["local_updates"]) == ("fedbcd", 4)
    assert report["active"]["local_updates_per_round"] == pytest.approx(3.0)
    bad = '{"federated": {"parties": ["dc-a", "dc-b"], "mode": "vanilla", "workset": 2, "local_updates": 4}}'
    r = simulate("run", "-w", "vfl-wdl", "-c", "two-sites-wan", "--plan", bad)
    assert r.code == 2 and "vanilla VFL has W=1 and R=1" in r.err
