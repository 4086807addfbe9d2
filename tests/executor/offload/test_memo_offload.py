"""MEMO in the executor: swapping by token with saved-tensor hooks, token-wise recompute of the rest.

Gradients after one step equal the plain run's (fp32, CPU) within 1e-5 relative; the device-side bytes
held between forward and backward fall by alpha (measured through the hooks); plans compose with
data, tensor and pipeline parallelism (gloo ranks, losses equal one process).
"""

from __future__ import annotations

import copy

import pytest
import torch

from executor.checks import check_features
from executor.job import Job
from executor.launch import run_jobs
from executor.memory import SavedTensorTracker
from executor.offload.memo import STATS, MemoBlock, PlannedArena, apply_offload
from simulator.errors import UnsupportedPlan
from simulator.plan import parse_shorthand
from workloads import WorkloadConfig
from workloads.torch_models import build_model, loss_fn

GPT = WorkloadConfig(
    name="tiny-gpt", family="gpt", num_layers=3, hidden_size=64, num_heads=4, vocab_size=256, seq_len=48, dropout=False
)
LLAMA = WorkloadConfig(
    name="tiny-llama",
    family="llama",
    num_layers=3,
    hidden_size=64,
    ffn_hidden_size=96,
    num_heads=4,
    num_kv_heads=2,
    vocab_size=256,
    seq_len=48,
)  # GQA: k/v repeated in the core


def _grads(model, tokens, *, between=None):
    with SavedTensorTracker() as tracker:
        loss = loss_fn(model(tokens), tokens.roll(-1, 1))
        if between is not None:
            between(tracker)
        loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _relative(a: dict, b: dict) -> float:
    diff = torch.cat([(a[n] - b[n]).flatten() for n in b]).norm()
    return (diff / torch.cat([b[n].flatten() for n in b]).norm()).item()


@pytest.fixture(scope="module", params=[GPT, LLAMA], ids=["gpt", "llama-gqa"])
def setup(request):
    torch.manual_seed(0)
    cfg = request.param
    model = build_model(cfg, "cpu")
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    return cfg, model, tokens, _grads(copy.deepcopy(model), tokens)


@pytest.mark.parametrize("alpha", [0.25, 0.5, 1.0])
@pytest.mark.parametrize("recompute", ["tokenwise", "none"])
def test_gradients_equal_the_plain_run(setup, alpha, recompute):
    cfg, model, tokens, reference = setup
    memo = copy.deepcopy(model)
    assert apply_offload(memo, lambda block: (recompute, alpha)) == cfg.num_layers
    STATS.reset()
    grads = _grads(memo, tokens)
    assert list(grads) == list(reference)  # parameter names unchanged by the wrapping
    assert _relative(grads, reference) < 1e-5
    for name in reference:  # and parameter by parameter (absolute floor for gradients that are ~0)
        torch.testing.assert_close(
            grads[name], reference[name], rtol=1e-5, atol=1e-6 * reference[name].abs().max().item() + 1e-9
        )
    assert STATS.host_bytes > 0
    if recompute == "tokenwise":
        # Each block recomputes its two token-wise segments for the tokens it did not swap.
        assert STATS.recomputed_segments == (2 * cfg.num_layers if alpha < 1 else 0)


def _held_after_forward(model, tokens) -> int:
    held = {}
    _grads(model, tokens, between=lambda tracker: held.setdefault("bytes", tracker.live_bytes))
    return held["bytes"]


def test_device_bytes_held_between_forward_and_backward_fall_by_alpha(setup):
    _cfg, model, tokens, _ = setup

    def held(recompute, alpha):
        m = copy.deepcopy(model)
        if recompute != "plain":
            apply_offload(m, lambda block: (recompute, alpha))
        return _held_after_forward(m, tokens)

    plain, everything_swapped = held("plain", 0.0), held("none", 1.0)
    blocks = plain - everything_swapped  # what the blocks hold; the input and output layers are not swapped
    assert blocks > 0
    for alpha in (0.25, 0.5, 0.75):
        assert held("none", alpha) - everything_swapped == pytest.approx((1 - alpha) * blocks, rel=0.02)
    # MEMO keeps nothing of a block on the device: swapped or dropped for token-wise recompute.
    assert held("tokenwise", 0.5) <= everything_swapped


@pytest.mark.parametrize("recompute", ["tokenwise", "none"])
def test_autocast_weight_copies_stay_on_the_device(monkeypatch, recompute):
    """Under autocast the blocks save bf16 casts of their weights; those are weights, not activations: none
    is copied to host (autocast keeps them for the whole forward anyway), and gradients match the plain run."""
    from executor.offload import memo as offload

    torch.manual_seed(0)
    model = build_model(LLAMA, "cpu")
    # One sequence of 48 tokens: no activation (48 rows) has a weight's shape (rows 32, 64, 96 or 256).
    tokens = torch.randint(0, LLAMA.vocab_size, (1, LLAMA.seq_len))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = _grads(copy.deepcopy(model), tokens)
    weight_shapes = {tuple(p.shape) for p in model.parameters()} | {tuple(p.shape[::-1]) for p in model.parameters()}
    copied: list[tuple] = []
    original = offload._HostCopy.__init__

    def recording(self, t, *args, **kwargs):
        copied.append((tuple(t.shape), t.dtype))
        original(self, t, *args, **kwargs)

    monkeypatch.setattr(offload._HostCopy, "__init__", recording)
    memo = copy.deepcopy(model)
    apply_offload(memo, lambda block: (recompute, 0.5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grads = _grads(memo, tokens)
    assert copied, "nothing was swapped"
    assert not [shape for shape, dtype in copied if shape in weight_shapes and dtype == torch.bfloat16]
    assert _relative(grads, reference) < 1e-2  # bf16: recompute rounds as forward did, up to kernel order


@pytest.mark.parametrize("recompute", ["none", "tokenwise"])
def test_split_tensors_are_not_kept_alive_until_backward(recompute):
    """Saved tensors keep their pack hook, and what its closure holds, alive until backward: a registry of
    the whole tensors whose slices were swapped must be emptied when forward ends, or those tensors stay."""
    import gc
    import warnings

    torch.manual_seed(0)
    model = build_model(GPT, "cpu")
    apply_offload(model, lambda block: (recompute, 0.5))
    tokens = torch.randint(0, GPT.vocab_size, (2, GPT.seq_len))
    loss = loss_fn(model(tokens), tokens.roll(-1, 1))
    gc.collect()
    # The MLP's full-length intermediate (batch, seq, 4 * hidden): only its swapped and kept halves may live.
    with warnings.catch_warnings():  # scanning every object touches deprecated torch attributes
        warnings.simplefilter("ignore")
        full = [
            o
            for o in gc.get_objects()
            if torch.is_tensor(o) and tuple(o.shape) == (2, GPT.seq_len, 4 * GPT.hidden_size)
        ]
    loss.backward()
    assert not full


def _live_tensors() -> dict:
    import gc
    import warnings

    gc.collect()
    with warnings.catch_warnings():  # scanning every object touches deprecated torch attributes
        warnings.simplefilter("ignore")
        return {id(o): o for o in gc.get_objects() if torch.is_tensor(o)}


@pytest.mark.parametrize("recompute, alpha", [("tokenwise", 0.0), ("tokenwise", 0.5), ("none", 0.5)])
def test_nothing_outlives_the_step(recompute, alpha):
    """After backward, no activation may stay alive: token-wise recompute kept every recomputed segment
    (a reference cycle through its saved-tensor hook that no collector frees), ~0.5 GB per step for
    gpt-30m, which made every later step slower and grew memory without bound."""
    torch.manual_seed(0)
    model = build_model(GPT, "cpu")
    apply_offload(model, lambda block: (recompute, alpha))
    tokens = torch.randint(0, GPT.vocab_size, (2, GPT.seq_len))
    before = set(_live_tensors())
    for _ in range(2):
        loss = loss_fn(model(tokens), tokens.roll(-1, 1))
        loss.backward()
        del loss
    model.zero_grad(set_to_none=True)
    new = [tuple(t.shape) for i, t in _live_tensors().items() if i not in before and t.dtype != torch.uint8]
    assert not new  # (the host pool's reusable uint8 buffers are not activations)


def test_no_grad_forward_is_the_plain_block(setup):
    _cfg, model, tokens, _ = setup
    memo = copy.deepcopy(model)
    apply_offload(memo, lambda block: ("tokenwise", 0.5))
    assert isinstance(memo.blocks["0"], MemoBlock)
    with torch.no_grad():
        torch.testing.assert_close(memo(tokens), model(tokens))


def test_recomputed_tokens_draw_the_dropout_masks_of_forward(monkeypatch):
    """With dropout, dropping and recomputing the tail gives the gradients of keeping it (same token split)."""
    import executor.offload.memo as offload

    cfg = GPT.model_copy(update={"dropout": True, "num_layers": 2})
    torch.manual_seed(0)
    model = build_model(cfg, "cpu")
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))

    def grads(keep: bool) -> torch.Tensor:
        memo = copy.deepcopy(model)
        apply_offload(memo, lambda block: ("tokenwise", 0.5))
        with monkeypatch.context() as patch:
            if keep:
                patch.setattr(offload._RecomputeGroup, "pack", lambda self, t: t)
            torch.manual_seed(123)
            loss_fn(memo(tokens), tokens.roll(-1, 1)).backward()
        return torch.cat([p.grad.flatten() for p in memo.parameters()])

    recomputed, kept = grads(False), grads(True)
    assert ((recomputed - kept).norm() / kept.norm()).item() < 1e-6


@pytest.mark.parametrize(
    "plan, message",
    [
        ("recompute=full,offload=0.5", "recompute=none .* or recompute=tokenwise"),
        ("recompute=selective,offload=0.5", "recompute=none .* or recompute=tokenwise"),
        ("tp=2,sequence_parallel=true,recompute=tokenwise,offload=0.5", "sequence_parallel"),
    ],
)
def test_executor_refuses_what_it_cannot_swap(plan, message):
    with pytest.raises(UnsupportedPlan, match=message):
        check_features(parse_shorthand(plan), "cpu")


def test_executor_accepts_memo_plans():
    check_features(parse_shorthand("recompute=tokenwise,offload=0.5"), "cpu")
    check_features(parse_shorthand("recompute=none,offload=0.25"), "cpu")


def test_apply_offload_refuses_a_wrapped_block():
    model = build_model(GPT, "cpu")
    model.blocks["0"] = torch.nn.Sequential(model.blocks["0"])
    with pytest.raises(TypeError, match="before other wrappers"):
        apply_offload(model, lambda block: ("tokenwise", 0.5))


def test_planned_arena_slots_and_bounds():
    arena = PlannedArena(1024, torch.device("cpu"))  # two slots of the planned peak
    view = arena.take(512, torch.Size([4, 8]), torch.float32)
    assert view.shape == (4, 8) and view.data_ptr() == arena.buffer.data_ptr() + 512
    with pytest.raises(ValueError, match="beyond the arena"):
        arena.take(2040, torch.Size([8]), torch.float32)
    first = arena.allocate(1, torch.Size([10]), torch.float32)  # 40 bytes, the next one 512-aligned
    second = arena.allocate(1, torch.Size([10]), torch.float32)
    assert first.data_ptr() == arena.buffer.data_ptr() + 1024 and second.data_ptr() == first.data_ptr() + 512
    assert arena.allocate(1, torch.Size([200]), torch.float32) is None  # 800 bytes no longer fit the slot
    arena.reset(1)
    assert arena.allocate(1, torch.Size([200]), torch.float32).data_ptr() == first.data_ptr()


# ---- composition with the parallel plans (gloo) ----------------------------------------------------------
BATCH = "global_batch=8,dtype=fp32"
TWO_RANKS = {
    "dp2 tokenwise": "dp=2,micro_batch=2,recompute=tokenwise,offload=0.5",
    "tp2 tokenwise": "tp=2,micro_batch=2,recompute=tokenwise,offload=0.25",
    "pp2 tokenwise": "pp=2,micro_batch=2,recompute=tokenwise,offload=0.5",
    "dp2 zero3 plain swapping": "dp=2,dp_type=zero3,micro_batch=2,offload=0.5",
    # What `simulate search memo` picks at long sequences: tokens split over cp ranks, then by alpha.
    "cp2 tokenwise (rotary positions of the rank's chunks)": "cp=2,micro_batch=2,recompute=tokenwise,offload=0.5",
    "cp2 plain swapping": "cp=2,micro_batch=2,offload=0.5",
}


def _job(plan: str, devices: int) -> Job:
    return Job(LLAMA, "cpu-local", None, devices, parse_shorthand(f"{plan},{BATCH}"), steps=3, warmup=0, seed=0)


@pytest.fixture(scope="module")
def parallel_runs():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        (reference,) = run_jobs([_job("micro_batch=2", 1)])
        results = run_jobs([_job(plan, 2) for plan in TWO_RANKS.values()])
    return reference, dict(zip(TWO_RANKS, results))


@pytest.mark.parametrize("name", list(TWO_RANKS))
def test_memo_composes_with_parallel_plans(name, parallel_runs):
    reference, results = parallel_runs
    assert results[name].losses == pytest.approx(reference.losses, rel=1e-4)


# ---- CUDA ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("alpha", [0.25, 1.0])
def test_cuda_side_stream_swap_matches_the_plain_run(alpha):
    torch.manual_seed(0)
    model = build_model(LLAMA, "cuda")
    tokens = torch.randint(0, LLAMA.vocab_size, (2, LLAMA.seq_len), device="cuda")
    reference = _grads(copy.deepcopy(model), tokens)
    memo = copy.deepcopy(model)
    apply_offload(memo, lambda block: ("tokenwise", alpha), PlannedArena(1 << 20, torch.device("cuda")))
    grads = _grads(memo, tokens)
    torch.cuda.synchronize()
    assert _relative(grads, reference) < 1e-5
