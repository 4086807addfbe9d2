"""Hugging Face `config.json` import (workloads/hf.py through `workloads.load_workload(path)`).

Parameter counts are the published ones: LLaMA-2-7B 6,738,415,616; Mistral-7B-v0.1 7,241,732,096;
Mixtral-8x7B 46,702,792,704; GPT-2 small 124,439,808; Pythia-70M (GPT-NeoX) 70,426,624 (Pythia paper,
table 1); Qwen2-0.5B 494,032,768 (q/k/v projections carry a bias, o_proj and the MLP do not).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import yaml

import simulator.cli as cli
from hwmodel.errors import SpecError, UserError
from workloads import load_workload, model_flops_per_sample, parameter_count
from workloads.hf import DEFAULT_SEQ_LEN, SUPPORTED, SeqLenDefault

LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-05,
    "torch_dtype": "float16",
}
MISTRAL_7B = {
    "architectures": ["MistralForCausalLM"],
    "model_type": "mistral",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "max_position_embeddings": 32768,
    "sliding_window": 4096,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}
QWEN2_05B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": True,
}
GPT2_SMALL = {
    "architectures": ["GPT2LMHeadModel"],
    "model_type": "gpt2",
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_inner": None,
    "vocab_size": 50257,
    "n_positions": 1024,
    "n_ctx": 1024,
    "resid_pdrop": 0.1,
    "attn_pdrop": 0.1,
    "embd_pdrop": 0.1,
}
PYTHIA_70M = {
    "architectures": ["GPTNeoXForCausalLM"],
    "model_type": "gpt_neox",
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 6,
    "num_attention_heads": 8,
    "vocab_size": 50304,
    "max_position_embeddings": 2048,
    "rotary_pct": 0.25,
    "use_parallel_residual": True,
    "tie_word_embeddings": False,
}
MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "max_position_embeddings": 32768,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "tie_word_embeddings": False,
}


def write_config(tmp_path: Path, data: dict, folder: str = "model") -> Path:
    path = tmp_path / folder / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path


# ---- LLaMA-like -----------------------------------------------------------------------------------
def test_llama2_7b_matches_the_catalog(tmp_path):
    hf = load_workload(str(write_config(tmp_path, LLAMA2_7B, "Llama-2-7b-hf")))
    catalog = load_workload("llama2-7b")
    assert parameter_count(hf) == 6738415616 == parameter_count(catalog)
    assert model_flops_per_sample(hf) == model_flops_per_sample(catalog)
    assert hf.family == "llama"
    assert hf.name == "Llama-2-7b-hf"  # named after the folder holding config.json
    shape = (
        "num_layers",
        "hidden_size",
        "ffn",
        "num_heads",
        "kv_heads",
        "vocab_size",
        "seq_len",
        "position_embedding",
        "mlp",
        "norm",
        "bias",
        "tied_embeddings",
        "causal",
    )
    assert {k: getattr(hf, k) for k in shape} == {k: getattr(catalog, k) for k in shape}


def test_mistral_7b(tmp_path):
    w = load_workload(str(write_config(tmp_path, MISTRAL_7B)))
    assert parameter_count(w) == 7241732096
    assert w.family == "llama" and w.kv_heads == 8 and w.ffn == 14336
    assert w.seq_len == 4096  # the stated default (within the 4096-token window), not max_position_embeddings


# ---- the training length and the attention window ---------------------------------------------------------
def test_no_seq_len_defaults_to_a_stated_length_with_a_warning(tmp_path):
    """Qwen2 says max_position_embeddings 131072: the longest context it accepts, not a training length."""
    path = write_config(tmp_path, {**QWEN2_05B, "max_position_embeddings": 131072})
    with pytest.warns(SeqLenDefault, match=r"no --seq-len given; training at 4096 tokens.*131072"):
        w = load_workload(str(path))
    assert w.seq_len == DEFAULT_SEQ_LEN == 4096


def test_the_default_is_capped_at_the_models_maximum(tmp_path):
    with pytest.warns(SeqLenDefault, match="training at 2048 tokens"):
        assert load_workload(str(write_config(tmp_path, PYTHIA_70M))).seq_len == 2048


def test_a_given_seq_len_is_taken_without_a_warning(tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", SeqLenDefault)
        assert load_workload(str(write_config(tmp_path, QWEN2_05B)), seq_len=32768).seq_len == 32768


def test_a_sequence_longer_than_the_sliding_window_is_refused(tmp_path):
    with pytest.raises(SpecError, match=r"sliding_window: 4096 .* not modelled.*seq_len=8192.*--seq-len 4096 or less"):
        load_workload(str(write_config(tmp_path, MISTRAL_7B)), seq_len=8192)


def test_a_sequence_within_the_sliding_window_is_exact_and_accepted(tmp_path):
    assert load_workload(str(write_config(tmp_path, MISTRAL_7B)), seq_len=4096).seq_len == 4096


def test_a_disabled_sliding_window_is_full_attention(tmp_path):
    """Qwen2 ships sliding_window with use_sliding_window: false."""
    data = {**QWEN2_05B, "sliding_window": 4096, "use_sliding_window": False}
    assert load_workload(str(write_config(tmp_path, data)), seq_len=32768).seq_len == 32768


def test_cli_prints_the_seq_len_warning_as_one_line(monkeypatch, capsys, tmp_path):
    path = write_config(tmp_path, {**QWEN2_05B, "max_position_embeddings": 131072})
    code, out, err = _simulate(monkeypatch, capsys, "workloads", "show", path)
    assert code == 0, err
    assert "warning:" in err and "--seq-len" in err and "Traceback" not in err
    assert yaml.safe_load(out)["seq_len"] == 4096


def test_qwen2_has_attention_bias(tmp_path):
    w = load_workload(str(write_config(tmp_path, QWEN2_05B)))
    assert w.qkv_bias is True and w.bias is False and w.tied_embeddings is True and w.kv_heads == 2
    as_llama = load_workload(str(write_config(tmp_path, {**QWEN2_05B, "model_type": "llama"}, "as-llama")))
    assert as_llama.qkv_bias is False
    assert parameter_count(w) > parameter_count(as_llama)


def test_qwen2_05b_parameter_count(tmp_path):
    # Qwen2 has biases on the q, k and v projections only: 24 layers x (896 + 128 + 128) = 27,648 over LLaMA.
    w = load_workload(str(write_config(tmp_path, QWEN2_05B)))
    as_llama = load_workload(str(write_config(tmp_path, {**QWEN2_05B, "model_type": "llama"}, "as-llama")))
    assert parameter_count(as_llama) == 494032768 - 24 * (896 + 2 * 128)
    assert parameter_count(w) == 494032768


def test_mixtral_is_a_moe(tmp_path):
    w = load_workload(str(write_config(tmp_path, MIXTRAL_8X7B)))
    assert w.family == "moe"
    assert w.num_experts == 8 and w.experts_top_k == 2
    assert parameter_count(w) == 46702792704 == parameter_count(load_workload("mixtral-8x7b"))


def test_single_expert_mixtral_config_is_dense(tmp_path):
    w = load_workload(str(write_config(tmp_path, {**MIXTRAL_8X7B, "num_local_experts": 1})))
    assert w.family == "llama" and w.num_experts == 1


# ---- GPT-2 and GPT-NeoX ---------------------------------------------------------------------------
def test_gpt2_small(tmp_path):
    w = load_workload(str(write_config(tmp_path, GPT2_SMALL)))
    assert parameter_count(w) == 124439808
    assert w.family == "gpt" and w.position_embedding == "learned" and w.tied_embeddings is True
    assert (w.num_layers, w.hidden_size, w.num_heads, w.ffn, w.vocab_size, w.seq_len) == (
        12,
        768,
        12,
        3072,
        50257,
        1024,
    )


def test_gpt_neox_pythia_70m(tmp_path):
    w = load_workload(str(write_config(tmp_path, PYTHIA_70M)))
    assert w.family == "gpt" and w.position_embedding == "rope" and w.tied_embeddings is False
    assert w.seq_len == 2048
    assert parameter_count(w) == 70426624


# ---- sequence length ------------------------------------------------------------------------------
def test_seq_len_overrides_the_config(tmp_path):
    path = str(write_config(tmp_path, LLAMA2_7B))
    w = load_workload(path, seq_len=2048)
    assert w.seq_len == 2048
    assert parameter_count(w) == 6738415616
    assert model_flops_per_sample(w) == model_flops_per_sample(load_workload("llama2-7b", 2048))
    assert model_flops_per_sample(w) < model_flops_per_sample(load_workload(path))


def test_seq_len_overrides_gpt2_within_its_position_table(tmp_path):
    path = str(write_config(tmp_path, GPT2_SMALL))
    w = load_workload(path, seq_len=512)
    assert w.seq_len == 512
    assert parameter_count(w) == 124439808  # the position table keeps n_positions rows


def test_seq_len_beyond_gpt2_position_table_is_a_spec_error(tmp_path):
    path = write_config(tmp_path, GPT2_SMALL)
    with pytest.raises(SpecError, match=r"seq_len=2048 exceeds max_position_embeddings=1024"):
        load_workload(str(path), seq_len=2048)


# ---- errors ---------------------------------------------------------------------------------------
def test_unsupported_model_type_names_the_supported_ones(tmp_path):
    path = write_config(tmp_path, {"model_type": "bloom", "n_layer": 24, "hidden_size": 1024})
    with pytest.raises(SpecError) as info:
        load_workload(str(path))
    message = str(info.value)
    assert str(path) in message and "'bloom'" in message
    for model_type in ("llama", "mistral", "qwen2", "mixtral", "gpt2", "gpt_neox"):
        assert model_type in message
    assert set(SUPPORTED) == {"llama", "mistral", "qwen2", "mixtral", "gpt2", "gpt_neox"}


def test_missing_keys_are_named(tmp_path):
    data = {k: v for k, v in LLAMA2_7B.items() if k not in ("hidden_size", "vocab_size")}
    path = write_config(tmp_path, data)
    with pytest.raises(SpecError) as info:
        load_workload(str(path))
    message = str(info.value)
    assert str(path) in message and "hidden_size" in message and "vocab_size" in message
    assert "num_hidden_layers" not in message


def test_missing_gpt2_key_is_named(tmp_path):
    path = write_config(tmp_path, {k: v for k, v in GPT2_SMALL.items() if k != "n_layer"})
    with pytest.raises(SpecError, match=r"n_layer"):
        load_workload(str(path))


def test_inconsistent_shape_is_a_spec_error(tmp_path):
    path = write_config(tmp_path, {**LLAMA2_7B, "num_attention_heads": 30})
    with pytest.raises(SpecError, match=r"hidden_size=4096 is not divisible by num_heads=30"):
        load_workload(str(path))


def test_malformed_json_names_line_and_column(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"model_type": "llama", "hidden_size": 4096,,}')
    with pytest.raises(SpecError) as info:
        load_workload(str(path))
    assert str(path) in str(info.value)
    assert re.search(r"malformed JSON at line \d+, column \d+", str(info.value))
    assert isinstance(info.value, UserError)


# ---- through the CLI ------------------------------------------------------------------------------
def _simulate(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["simulate", *map(str, args)])
    with pytest.raises(SystemExit) as info:
        cli.main()
    captured = capsys.readouterr()
    return info.value.code or 0, captured.out, captured.err


def test_cli_runs_a_hf_config(monkeypatch, capsys, tmp_path):
    path = write_config(tmp_path, MISTRAL_7B)
    code, out, err = _simulate(
        monkeypatch,
        capsys,
        "run",
        "-w",
        path,
        "-c",
        "dgx-a100-80g",
        "--seq-len",
        "4096",
        "--plan",
        "tp=2,micro_batch=1,global_batch=64",
        "--json",
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["seq_len"] == 4096 and report["tokens_per_s"] > 0


def test_cli_reports_an_unsupported_hf_config(monkeypatch, capsys, tmp_path):
    path = write_config(tmp_path, {"model_type": "bloom"})
    code, _out, err = _simulate(monkeypatch, capsys, "workloads", "show", path)
    assert code == 2
    assert "Traceback" not in err and "bloom" in err and "gpt_neox" in re.sub(r"\s+", "", err)
