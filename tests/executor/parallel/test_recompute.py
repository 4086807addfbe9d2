"""Each recompute policy the executor runs trains the same model as no recompute and keeps less for backward;
the ones a stack lacks are refused by name."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import executor.launch as launch
from executor.job import Job
from executor.memory import SavedTensorTracker
from executor.parallel.recompute import op_selective_contexts
from simulator.plan import parse_shorthand
from tests.executor.helpers import LLAMA, ONE, job, refused
from workloads.torch_models import build_model

BASE = "micro_batch=2,global_batch=8,dtype=fp32,stack=hetplan"


def test_every_runnable_policy_gives_the_losses_of_none_and_keeps_less(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    names = ("none", "full", "selective", "op-selective", "every-2", "every-4")
    jobs = [
        Job(LLAMA, "cpu-local", None, 1, parse_shorthand(f"{BASE},recompute={n}"), steps=3, warmup=0) for n in names
    ]
    results = dict(zip(names, launch.run_jobs(jobs), strict=True))
    acts = {n: r.memory[0]["activations"] for n, r in results.items()}
    for name, result in results.items():
        assert result.losses == pytest.approx(results["none"].losses, rel=1e-6), name
        if name != "none":
            assert acts[name] < acts["none"], (name, acts)
    # Full keeps only block inputs: the least. Every 4th block of 4 recomputes 1 block, every 2nd 2 blocks.
    assert acts["full"] < acts["op-selective"] < acts["none"]
    assert acts["full"] < acts["every-2"] < acts["every-4"] < acts["none"]


def test_the_op_selective_policy_saves_every_other_matmul_and_the_attention_output():
    """One llama block under the policy: of its seven matmuls (wq, wk, wv, wo, w1, w3, w2) forward saves the
    1st, 3rd, 5th and 7th outputs and SDPA's, nothing else; gradients are those of no recompute."""
    torch.manual_seed(0)
    block = build_model(LLAMA, device="cpu").blocks["0"]
    x = torch.randn(2, LLAMA.seq_len, LLAMA.hidden_size, requires_grad=True)
    (g_plain,) = torch.autograd.grad(block(x).square().sum(), x)
    with SavedTensorTracker() as tracker:
        out = checkpoint(block, x, use_reentrant=False, context_fn=op_selective_contexts)
        kept = tracker.live_bytes
        (g,) = torch.autograd.grad(out.square().sum(), x)
    assert torch.allclose(g, g_plain, rtol=1e-5, atol=1e-6)
    e, t = 4, 2 * LLAMA.seq_len  # fp32, tokens
    q = t * LLAMA.num_heads * LLAMA.head_dim * e
    v = t * LLAMA.kv_heads * LLAMA.head_dim * e
    w1 = t * LLAMA.ffn * e
    w2 = t * LLAMA.hidden_size * e
    lse = t * LLAMA.num_heads * 4  # fp32 log-sum-exp per query and head
    # The block input (what any checkpoint keeps, as under full) and SDPA's output (q's size) besides.
    assert kept == w2 + q + v + w1 + w2 + q + lse
    assert tracker.live_bytes == 0  # all released after backward


def test_a_policy_the_named_stack_lacks_is_refused_by_name(execute, tiny):
    plan = "micro_batch=2,global_batch=8,dtype=fp32,recompute=op-selective,stack=megatron-lm"
    refused(execute("--workload", tiny, *ONE, "--plan", plan, "--steps", "1"), "op-selective", "megatron-lm")


def test_offload_with_op_selective_or_every_n_is_refused_by_name(execute, tiny):
    for policy in ("op-selective", "every-2"):
        plan = f"micro_batch=2,global_batch=8,dtype=fp32,recompute={policy},offload=0.5"
        refused(execute("--workload", tiny, *ONE, "--plan", plan, "--steps", "1"), f"recompute={policy}")


@pytest.mark.slow  # two gloo ranks: their start dominates
def test_op_selective_composes_with_tensor_parallelism(monkeypatch):
    """Two gloo ranks, tp=2 with sequence parallelism: the policy sees each rank's local matmuls and
    keeps the losses of no recompute (every-N arrives as full or none per block, tested with tp elsewhere)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    plans = [f"tp=2,sequence_parallel=true,micro_batch=2,recompute={r}" for r in ("none", "op-selective")]
    none, op_selective = launch.run_jobs([job(p, LLAMA, 2, steps=2) for p in plans])
    assert op_selective.losses == pytest.approx(none.losses, rel=1e-6)
    assert op_selective.memory[0]["activations"] < none.memory[0]["activations"]
