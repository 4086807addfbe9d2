"""Property-based validation of the analytic model (simulator.analytic.evaluate) and of layer profiles.

Random but valid plans on small catalog workloads and clusters; each property is one the model must keep
whatever the plan: more bandwidth or FLOP/s never slows an iteration, deeper ZeRO never holds more model
state, more recompute never keeps more activations, utilizations lie in (0, 1], the time breakdown sums to
the iteration, and the same inputs give the same report.
"""

from __future__ import annotations

from itertools import pairwise

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hwmodel import ClusterSpec, load_cluster
from hwmodel.catalog import clear_caches as clear_spec_caches
from hwmodel.whatif import LINK_FIELDS, with_link_bandwidth
from simulator.analytic import evaluate
from simulator.cost.collectives import collective_time
from simulator.plan import Plan
from simulator.report import Report
from workloads import ShardShape, WorkloadConfig, layer_profile, load_workload

SETTINGS = settings(
    max_examples=50,
    # The first examples fill the model's caches (layer profiles, collective times), so one example takes
    # from under 1 ms to tens of ms: a deadline would measure the cache, not the code.
    deadline=None,
    # Each example evaluates a whole plan; the same examples on every run keep the suite's verdict and
    # time the same on every machine, and CI keeps no example database to replay a random failure from.
    derandomize=True,
)

WORKLOAD_NAMES = ("gpt3-350m", "llama2-7b", "bert-large", "t5-large-32", "vit-huge-32", "mixtral-8x7b")
CLUSTER_KEYS = (
    ("dgx-a100-80g", 1),
    ("dgx-a100-80g", 2),
    ("dgx-a100-80g", 4),
    ("dgx-h100", None),
    ("mixed-a100-v100", None),
)
WORKLOADS = {name: load_workload(name) for name in WORKLOAD_NAMES}
CLUSTERS = {key: load_cluster(key[0], nodes=key[1]) for key in CLUSTER_KEYS}

DP_TYPES = ("ddp", "zero1", "zero2", "zero3")
RECOMPUTES = ("none", "selective", "full")


class Case:
    """A workload, a cluster and a plan, by name (hypothesis prints its repr when a property fails)."""

    def __init__(self, workload_name: str, cluster_key: tuple[str, int | None], plan: Plan):
        self.workload_name = workload_name
        self.cluster_key = cluster_key
        self.plan = plan

    @property
    def workload(self) -> WorkloadConfig:
        return WORKLOADS[self.workload_name]

    @property
    def cluster(self) -> ClusterSpec:
        return CLUSTERS[self.cluster_key]

    def with_plan(self, **changes) -> Case:
        return Case(self.workload_name, self.cluster_key, self.plan.model_copy(update=changes))

    def __repr__(self) -> str:
        name, nodes = self.cluster_key
        cluster = name if nodes is None else f"{name} --nodes {nodes}"
        return f"<{self.workload_name} on {cluster}: {self.plan.shorthand()}>"


def _divisors(n: int, limit: int) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


@st.composite
def cases(draw, schedules=("gpipe", "1f1b", "interleaved"), max_pp: int = 8, min_dp: int = 1) -> Case:
    """A plan that binds: degrees that divide the cluster and the model, a batch that splits; at most
    `max_pp` pipeline stages and at least `min_dp` data-parallel replicas (every cluster here has 8 or
    more devices, so tp=1 always leaves at least 8)."""
    workload_name = draw(st.sampled_from(WORKLOAD_NAMES))
    cluster_key = draw(st.sampled_from(CLUSTER_KEYS))
    cfg, cluster = WORKLOADS[workload_name], CLUSTERS[cluster_key]
    n = cluster.num_devices
    tp = draw(
        st.sampled_from(
            [
                t
                for t in (1, 2, 4, 8)
                if n % t == 0
                and n // t >= min_dp
                and cfg.num_heads % t == 0
                and cfg.kv_heads % t == 0
                and cfg.ffn % t == 0
            ]
        )
    )
    pp = draw(
        st.sampled_from([p for p in _divisors(n // tp, max_pp) if p <= cfg.num_layers and n // (tp * p) >= min_dp])
    )
    dp = n // (tp * pp)
    schedule = draw(st.sampled_from([s for s in schedules if pp > 1 or s != "interleaved"]))
    virtual_stages = 1
    if schedule == "interleaved":
        virtual_stages = draw(st.sampled_from([v for v in (2, 3, 4) if pp * v <= cfg.num_layers]))
        num_micro_batches = pp * draw(st.integers(1, 3))
    else:
        num_micro_batches = draw(st.integers(1, 8))
    micro_batch = draw(st.sampled_from((1, 2, 4)))
    sequence_parallel = draw(st.booleans()) and cfg.seq_len % tp == 0
    ep = 1
    if cfg.family == "moe":
        ep = draw(st.sampled_from([e for e in _divisors(dp, 8) if cfg.num_experts % e == 0]))
    plan = Plan(
        tp=tp,
        pp=pp,
        ep=ep,
        dp_type=draw(st.sampled_from(DP_TYPES)),
        recompute=draw(st.sampled_from(RECOMPUTES)),
        sequence_parallel=sequence_parallel,
        micro_batch=micro_batch,
        global_batch=micro_batch * dp * num_micro_batches,
        schedule=schedule,
        virtual_stages=virtual_stages,
        attention=draw(st.sampled_from(("flash", "flash_triton", "naive"))),
    )
    return Case(workload_name, cluster_key, plan)


def run(case: Case, cluster: ClusterSpec | None = None) -> Report:
    """Evaluate a case. `cases` draws only plans that bind, so InfeasiblePlan here is a failure (of the
    strategy or of the model), not a reason to discard the example."""
    return evaluate(case.plan, case.workload, cluster if cluster is not None else case.cluster)


def _model_states(memory) -> float:
    return memory.weights + memory.gradients + memory.optimizer


# ---- hardware monotonicity -------------------------------------------------------------------------------


@SETTINGS
@given(case=cases(), factors=st.fixed_dictionaries({key: st.floats(1.0, 4.0) for key in LINK_FIELDS}))
def test_more_bandwidth_never_slows_an_iteration(case, factors):
    base = run(case)
    faster = case.cluster
    for key, factor in factors.items():
        field = LINK_FIELDS[key]
        # One value for every node group: the largest of their bandwidths, scaled up, is >= each of them.
        current = max(getattr(g.node, field).bandwidth for g in faster.node_groups)
        faster = with_link_bandwidth(faster, key, current * factor)
    improved = run(case, faster)
    assert improved.iteration_time_s <= base.iteration_time_s * (1 + 1e-12)


def _scaled_device(device, factor: float):
    compute = device.compute
    return device.model_copy(
        update={
            "compute": compute.model_copy(
                update={
                    "matrix": {k: v * factor for k, v in compute.matrix.items()},
                    "vector": {k: v * factor for k, v in compute.vector.items()},
                }
            )
        }
    )


@SETTINGS
@given(case=cases(), factors=st.lists(st.floats(1.0, 8.0), min_size=2, max_size=2))
@example(
    case=Case(
        "gpt3-350m",
        ("mixed-a100-v100", None),
        Plan(pp=2, global_batch=32, schedule="interleaved", virtual_stages=2),
    ),
    factors=[2.0, 1.0],  # faster A100s (stage 0), same V100s (stage 1)
)
def test_more_flops_never_slows_an_iteration(case, factors):
    base = run(case)
    faster = case.cluster
    for name, factor in zip(case.cluster.device_types(), factors):
        device = next(g.node.device for g in faster.node_groups if g.node.device.name == name)
        faster = faster.with_device(name, _scaled_device(device, factor))
    improved = run(case, faster)
    assert improved.iteration_time_s <= base.iteration_time_s * (1 + 1e-12)


# ---- memory orderings --------------------------------------------------------------------------------------


def _zero_ladder(case: Case) -> list[Report]:
    return [run(case.with_plan(dp_type=d)) for d in DP_TYPES]  # ddp, zero1, zero2, zero3


def _recompute_ladder(case: Case) -> list[Report]:
    return [run(case.with_plan(recompute=r)) for r in RECOMPUTES]  # none, selective, full


@SETTINGS
@given(case=cases())
def test_deeper_zero_never_holds_more_model_state(case):
    reports = _zero_ladder(case)
    for shallower, deeper in pairwise(reports):
        # Weights + gradients + optimizer states of every stage's devices, and of the device with the peak.
        for s_shallow, s_deep in zip(shallower.stages, deeper.stages):
            assert _model_states(s_deep.memory_bytes) <= _model_states(s_shallow.memory_bytes) * (1 + 1e-12)
        assert _model_states(deeper.memory_bytes) <= _model_states(shallower.memory_bytes) * (1 + 1e-12)


@SETTINGS
@given(case=cases(max_pp=1, min_dp=4))
@example(case=Case("gpt3-350m", ("dgx-a100-80g", 1), Plan(tp=2, global_batch=8)))
def test_deeper_zero_never_raises_peak_memory(case):
    # Peak memory also holds ZeRO's transient buffers: a layer's unsharded gradients (ZeRO-2/3) and the
    # gathered weights of two layers (ZeRO-3). When one layer dominates a stage that is sharded only
    # two ways (bert-large's embedding alone on a stage, dp=2) they outweigh what sharding saves, as
    # with real FSDP. Where the stage's sharded share exceeds that layer (no pipeline, dp >= 4) the
    # peak must fall with every ZeRO stage; the strategy draws only such plans.
    assert case.plan.pp == 1 and case.cluster.num_devices // (case.plan.tp * case.plan.cp) >= 4
    reports = _zero_ladder(case)
    for shallower, deeper in pairwise(reports):
        assert deeper.peak_memory_bytes <= shallower.peak_memory_bytes * (1 + 1e-12), (
            f"{deeper.plan.dp_type} peak {deeper.peak_memory_bytes:.6g} B > {shallower.plan.dp_type} peak "
            f"{shallower.peak_memory_bytes:.6g} B ({deeper.memory_bytes} vs {shallower.memory_bytes})"
        )


@SETTINGS
@given(case=cases())
@example(case=Case("gpt3-350m", ("dgx-a100-80g", 1), Plan(pp=4, global_batch=2, schedule="gpipe", attention="naive")))
def test_more_recompute_never_keeps_more_activations(case):
    reports = _recompute_ladder(case)
    for less, more in pairwise(reports):
        pair = f"recompute={more.plan.recompute} vs {less.plan.recompute}"
        for s_less, s_more in zip(less.stages, more.stages):
            assert s_more.memory_bytes.activations <= s_less.memory_bytes.activations * (1 + 1e-12), (
                f"stage {s_more.index}, {pair}: {s_more.memory_bytes.activations:.6g} B > "
                f"{s_less.memory_bytes.activations:.6g} B"
            )
        assert more.memory_bytes.activations <= less.memory_bytes.activations * (1 + 1e-12), pair


# ---- report invariants -------------------------------------------------------------------------------------


@SETTINGS
@given(case=cases())
def test_utilization_bounds(case):
    report = run(case)
    assert 0 < report.mfu <= 1
    assert report.hfu > 0
    assert report.hfu >= report.mfu
    if case.plan.recompute == "none":
        assert report.hfu == report.mfu
    else:
        assert report.hfu > report.mfu
    # Counting causal score matrices in full (Megatron-LM's convention) only ever adds FLOPs, at most doubling
    # the attention share; encoders (no causal mask) read the same in both conventions.
    assert report.mfu <= report.mfu_causal_in_full < 2 * report.mfu
    if WORKLOADS[case.workload_name].family in ("bert", "vit"):
        assert report.mfu_causal_in_full == report.mfu


@SETTINGS
@given(case=cases())
@example(
    case=Case(
        "gpt3-350m",
        ("dgx-a100-80g", 1),
        Plan(tp=8, sequence_parallel=True, micro_batch=2, global_batch=12, schedule="gpipe"),
    )
)
def test_time_breakdown_sums_to_iteration_time(case):
    report = run(case)
    parts = report.time_breakdown_s.model_dump()
    assert set(parts) == {
        "compute",
        "recompute",
        "exposed_communication",
        "pipeline_bubble",
        "offload_stall",
        "optimizer",
    }
    for name, value in parts.items():
        assert value >= 0, f"{name} = {value}"
    assert report.time_breakdown_s.compute > 0
    assert sum(parts.values()) == pytest.approx(report.iteration_time_s, rel=1e-9)
    if case.plan.recompute == "none":
        assert report.time_breakdown_s.recompute == 0


@SETTINGS
@given(case=cases())
def test_throughput_matches_iteration_time(case):
    report = run(case)
    w = case.workload
    assert report.global_batch == case.plan.global_batch
    assert report.tokens_per_s == pytest.approx(
        report.global_batch * w.tokens_per_sample / report.iteration_time_s, rel=1e-12
    )
    assert report.samples_per_s == pytest.approx(report.global_batch / report.iteration_time_s, rel=1e-12)


@settings(SETTINGS, max_examples=25)  # the slowest property: every example reloads specs with cold caches
@given(case=cases())
def test_same_inputs_same_report(case):
    first = run(case).model_dump()
    assert run(case).model_dump() == first
    # Freshly loaded specs and workload (new objects, cold caches) give the same report, bit for bit.
    clear_spec_caches()
    for cached in (layer_profile, collective_time):
        cached.cache_clear()
    cluster = load_cluster(case.cluster_key[0], nodes=case.cluster_key[1])
    workload = WorkloadConfig(**case.workload.model_dump())
    plan = Plan(**case.plan.model_dump())
    assert evaluate(plan, workload, cluster).model_dump() == first


@SETTINGS
@given(case=cases(schedules=("1f1b",)), extra=st.integers(1, 16))
def test_more_micro_batches_never_lowers_throughput(case, extra):
    report = run(case)
    # global_batch * (1 + extra) keeps it a multiple of micro_batch * dp, at the same micro_batch.
    bigger = run(case.with_plan(global_batch=case.plan.global_batch * (1 + extra)))
    assert bigger.num_micro_batches == report.num_micro_batches * (1 + extra)
    assert bigger.tokens_per_s >= report.tokens_per_s * (1 - 1e-12)


# ---- layer profiles ----------------------------------------------------------------------------------------


@st.composite
def llama_shapes(draw):
    """A random LLaMA-style (no biases) config and a shard shape that tp divides."""
    num_kv_heads = draw(st.sampled_from((1, 2, 4, 8)))
    num_heads = num_kv_heads * draw(st.sampled_from((1, 2, 4)))
    head_dim = draw(st.sampled_from((16, 32, 64, 128)))
    hidden = num_heads * head_dim
    tp = draw(st.sampled_from([t for t in (1, 2, 4, 8) if num_heads % t == 0 and num_kv_heads % t == 0]))
    ffn = tp * draw(st.integers(1, 512)) * 8
    seq_len = tp * draw(st.integers(1, 256)) * 4
    cfg = WorkloadConfig(
        family="llama",
        num_layers=draw(st.integers(1, 8)),
        hidden_size=hidden,
        ffn_hidden_size=ffn,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        vocab_size=draw(st.integers(100, 70000)),
        seq_len=seq_len,
    )
    shape = ShardShape(
        micro_batch=draw(st.integers(1, 8)),
        seq_len=seq_len,
        tp=tp,
        sequence_parallel=draw(st.booleans()),
        dtype_bytes=draw(st.sampled_from((2, 4))),
        attention=draw(st.sampled_from(("flash", "naive"))),
    )
    return cfg, shape


@st.composite
def any_family_shapes(draw):
    """A random config of any family (with its defaults) and a micro-batch shape."""
    family = draw(st.sampled_from(("gpt", "llama", "bert", "t5", "vit", "moe")))
    num_heads = draw(st.sampled_from((2, 4, 8, 16)))
    hidden = num_heads * draw(st.sampled_from((16, 32, 64)))
    tp = draw(st.sampled_from([t for t in (1, 2, 4) if num_heads % t == 0]))
    data = dict(
        family=family,
        num_layers=draw(st.integers(2, 8)),
        hidden_size=hidden,
        ffn_hidden_size=tp * draw(st.integers(1, 256)) * 4,
        num_heads=num_heads,
        vocab_size=draw(st.integers(100, 50000)),
        seq_len=tp * draw(st.integers(1, 128)) * 2,
    )
    if family == "moe":
        data.update(num_experts=draw(st.sampled_from((2, 4, 8))), experts_top_k=draw(st.sampled_from((1, 2))))
    if family == "vit":
        patch = draw(st.sampled_from((8, 16, 32)))
        data.update(
            image_size=patch * draw(st.integers(1, 8)), patch_size=patch, num_classes=draw(st.integers(2, 1000))
        )
        data.pop("seq_len")
    cfg = WorkloadConfig(**data)
    seq_len = cfg.seq_len
    shape = ShardShape(
        micro_batch=draw(st.integers(1, 4)),
        seq_len=seq_len,
        tp=tp,
        sequence_parallel=draw(st.booleans()) and seq_len % tp == 0,
        dtype_bytes=draw(st.sampled_from((2, 4))),
        attention=draw(st.sampled_from(("flash", "naive"))),
    )
    kinds = {"t5": ("encoder", "cross_decoder"), "vit": ("encoder",), "bert": ("encoder",)}.get(family, ("decoder",))
    return cfg, shape, draw(st.sampled_from(kinds))


@settings(SETTINGS, max_examples=80)
@given(args=any_family_shapes())
def test_layer_profile_orderings(args):
    cfg, shape, kind = args
    prof = layer_profile(cfg, kind, shape)
    saved = prof.saved_bytes
    assert saved["none"] >= saved["selective"] >= saved["full"] >= 0
    assert prof.fwd_flops.sum() > 0
    assert prof.bwd_flops.sum() >= prof.fwd_flops.sum()
    assert prof.params_total > 0
    assert 0 < prof.params_local <= prof.params_total
    assert prof.model_fwd_flops > 0
    assert 0 <= prof.model_fwd_flops_selective <= prof.model_fwd_flops


@settings(SETTINGS, max_examples=80)
@given(args=llama_shapes())
def test_llama_block_params_split_over_tp(args):
    cfg, shape = args
    prof = layer_profile(cfg, "decoder", shape)
    h, t = cfg.hidden_size, shape.tp
    # Exactly: everything is split over tp but the two RMSNorm weights (h each), which every rank keeps.
    assert prof.params_local * t == pytest.approx(prof.params_total + (t - 1) * 2 * h, rel=1e-12)
    q, kv = cfg.num_heads * cfg.head_dim, 2 * cfg.kv_heads * cfg.head_dim
    assert prof.params_total == h * (q + kv) + q * h + 3 * h * cfg.ffn + 2 * h
    assert prof.bwd_flops.sum() >= prof.fwd_flops.sum() > 0
    saved = prof.saved_bytes
    assert saved["none"] >= saved["selective"] >= saved["full"] >= 0
