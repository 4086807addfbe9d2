"""The executable modules of `workloads.torch_models`: the same parameters as the cost model counts, a
structure the executor can cut by layer index, seeded weights and data, and attention that agrees
across its implementations. Models are built on the meta device unless a test runs them (tiny ones)."""

from __future__ import annotations

import math

import pytest
import torch

from hwmodel.errors import UserError
from workloads import WorkloadConfig, layer_kinds, load_workload, parameter_count
from workloads.torch_models import (
    AttentionCore,
    SyntheticTokens,
    apply_rope,
    build_model,
    canonical_name,
    full_init_tensor,
    init_weights,
    loss_fn,
)

TINY_GPT = WorkloadConfig(
    name="tiny-gpt", family="gpt", num_layers=2, hidden_size=32, num_heads=4, vocab_size=97, seq_len=16, dropout=False
)
TINY_LLAMA = WorkloadConfig(
    name="tiny-llama",
    family="llama",
    num_layers=2,
    hidden_size=32,
    ffn_hidden_size=48,
    num_heads=4,
    num_kv_heads=2,
    vocab_size=97,
    seq_len=16,
)


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # shared (tied) parameters once


@pytest.mark.parametrize(
    "name", ["gpt3-125m", "gpt3-1.3b", "mpt-125m", "mpt-1b", "llama2-7b", "llama3-8b", "llama2-70b"]
)
def test_parameter_count_matches_the_cost_model_for_catalog_models(name):
    cfg = load_workload(name)
    model = build_model(cfg)  # meta: no memory even for 70B
    assert count(model) == parameter_count(cfg)
    assert all(p.device.type == "meta" for p in model.parameters())


@pytest.mark.parametrize(
    "extra",
    [
        dict(family="gpt", bias=False, tied_embeddings=False),  # MPT-style without biases, untied
        dict(family="gpt", qkv_bias=False, mlp="relu", norm="rmsnorm", position_embedding="rope"),
        dict(family="gpt", max_position_embeddings=64, position_embedding="learned"),
        dict(family="llama", num_kv_heads=1, bias=True, tied_embeddings=True),
        dict(family="llama", num_kv_heads=4, qkv_bias=True, position_embedding="none", mlp="gelu"),
    ],
)
def test_parameter_count_matches_for_variants(extra):
    cfg = WorkloadConfig(
        name="v", num_layers=3, hidden_size=48, ffn_hidden_size=80, num_heads=4, vocab_size=101, seq_len=32, **extra
    )
    assert count(build_model(cfg)) == parameter_count(cfg)


def test_structure_follows_layer_kinds():
    model = build_model(TINY_LLAMA)
    names = model.layer_module_names()
    assert len(names) == len(layer_kinds(TINY_LLAMA))
    assert names[0] == "embed" and names[-1] == "head" and names[1] == "blocks.0"
    assert list(model.blocks.keys()) == ["0", "1"]
    assert model.head.lm_head.weight is not model.embed.tok.weight  # llama: untied by default
    gpt = build_model(TINY_GPT)
    assert gpt.head.lm_head.weight is gpt.embed.tok.weight  # gpt: tied


@pytest.mark.parametrize("name", ["bert-large", "t5-large-32", "vit-huge-32", "mixtral-8x7b"])
def test_other_families_are_refused_clearly(name):
    with pytest.raises(UserError) as info:
        build_model(load_workload(name))
    message = str(info.value)
    assert "cannot be executed yet" in message and "gpt" in message and "llama" in message


def test_synthetic_data_is_deterministic_next_token():
    data = SyntheticTokens(TINY_GPT, global_batch=6, seed=3)
    x, y = data.batch(4)
    x2, y2 = SyntheticTokens(TINY_GPT, global_batch=6, seed=3).batch(4)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert x.shape == (6, TINY_GPT.seq_len) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the next tokens
    assert int(x.max()) < TINY_GPT.vocab_size and int(x.min()) >= 0
    assert not torch.equal(data.batch(5)[0], x)
    assert not torch.equal(SyntheticTokens(TINY_GPT, 6, seed=4).batch(4)[0], x)
    part, _ = data.batch(4, first=2, count=3)
    assert torch.equal(part, x[2:5])


def test_initialization_is_per_name_and_plan_independent():
    a = full_init_tensor("blocks.0.attn.wq.weight", (8, 4), TINY_GPT, seed=0)
    assert torch.equal(a, full_init_tensor("blocks.0.attn.wq.weight", (8, 4), TINY_GPT, seed=0))
    assert not torch.equal(a, full_init_tensor("blocks.1.attn.wq.weight", (8, 4), TINY_GPT, seed=0))
    assert not torch.equal(a, full_init_tensor("blocks.0.attn.wq.weight", (8, 4), TINY_GPT, seed=1))
    assert torch.equal(full_init_tensor("blocks.0.attn_norm.weight", (4,), TINY_GPT, 0), torch.ones(4))
    assert torch.equal(full_init_tensor("blocks.0.mlp.w1.bias", (4,), TINY_GPT, 0), torch.zeros(4))
    # Residual projections start smaller (GPT-2: 1/sqrt(2 L)).
    big = full_init_tensor("blocks.0.mlp.w1.weight", (256, 256), TINY_GPT, 0).std()
    small = full_init_tensor("blocks.0.mlp.w2.weight", (256, 256), TINY_GPT, 0).std()
    assert small / big == pytest.approx(1 / math.sqrt(2 * TINY_GPT.num_layers), rel=0.05)
    # Wrappers do not change a name; a tied head is named as the embedding it shares.
    assert canonical_name("blocks.0._checkpoint_wrapped_module.attn.wq.weight", TINY_GPT) == "blocks.0.attn.wq.weight"
    assert canonical_name("module.head.lm_head.weight", TINY_GPT) == "embed.tok.weight"
    assert canonical_name("head.lm_head.weight", TINY_LLAMA) == "head.lm_head.weight"


@pytest.mark.parametrize("cfg", [TINY_GPT, TINY_LLAMA], ids=["gpt", "llama"])
def test_model_trains_from_a_sensible_start(cfg):
    model = build_model(cfg, "cpu")
    init_weights(model, cfg, seed=0)
    x, y = SyntheticTokens(cfg, 4, seed=0).batch(0)
    loss = loss_fn(model(x), y)
    # Small initial weights: the prediction is close to uniform over the vocabulary.
    assert loss.item() == pytest.approx(math.log(cfg.vocab_size), rel=0.05)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_causal_attention_ignores_the_future():
    model = build_model(TINY_LLAMA, "cpu")
    init_weights(model, TINY_LLAMA, seed=1)
    x, _ = SyntheticTokens(TINY_LLAMA, 2, seed=0).batch(0)
    changed = x.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % TINY_LLAMA.vocab_size
    with torch.no_grad():
        a, b = model(x), model(changed)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:], atol=1e-3)


def test_attention_implementations_agree_with_gqa():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 16, 8)
    k, v = torch.randn(2, 2, 16, 8), torch.randn(2, 2, 16, 8)  # 2 kv heads serve 4 query heads
    sdpa = AttentionCore(causal=True, dropout=0.0, attention="flash")(q, k, v)
    naive = AttentionCore(causal=True, dropout=0.0, attention="naive")(q, k, v)
    assert torch.allclose(sdpa, naive, atol=1e-5)
    # Query head h attends with kv head h // 2.
    expected = torch.nn.functional.scaled_dot_product_attention(q[:, 3:4], k[:, 1:2], v[:, 1:2], is_causal=True)
    assert torch.allclose(sdpa[:, 3:4], expected, atol=1e-6)


def test_rope_rotates_without_changing_lengths():
    x = torch.randn(1, 2, 16, 8)
    rotated = apply_rope(x)
    assert torch.allclose(rotated.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    assert torch.allclose(rotated[:, :, 0], x[:, :, 0])  # position 0 is not rotated
    assert not torch.allclose(rotated[:, :, 5], x[:, :, 5])
