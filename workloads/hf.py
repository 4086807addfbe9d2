"""Hugging Face `config.json` -> WorkloadConfig.

Accepts the key names of LLaMA, Mistral, Qwen2, Mixtral, GPT-2 and GPT-NeoX configs. The training
sequence length defaults to the model's maximum positions; pass `seq_len` to override it.
"""

from __future__ import annotations

from typing import Any

from hwmodel.errors import SpecError
from workloads.config import WorkloadConfig

LLAMA_LIKE = ("llama", "mistral", "qwen2", "mixtral")
SUPPORTED = LLAMA_LIKE + ("gpt2", "gpt_neox")


def is_hf_config(data: dict[str, Any]) -> bool:
    return "model_type" in data or "architectures" in data


def _require(data: dict[str, Any], keys: tuple[str, ...], source: str, model_type: str) -> None:
    missing = [k for k in keys if data.get(k) is None]
    if missing:
        raise SpecError(f"{source}: a {model_type} config.json needs {', '.join(missing)}")


def from_hf_config(
    data: dict[str, Any], source: str, name: str = "custom", seq_len: int | None = None
) -> WorkloadConfig:
    """Translate a Hugging Face config dict; `source` names the file in error messages."""
    model_type = data.get("model_type")
    if model_type not in SUPPORTED:
        raise SpecError(
            f"{source}: model_type: {model_type!r} is not supported; accepted: {', '.join(SUPPORTED)} "
            "(or write a hetplan workload file with 'family:')"
        )
    if model_type in LLAMA_LIKE:
        keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        _require(data, keys, source, model_type)
        experts = data.get("num_local_experts") or 1
        cfg = dict(
            family="moe" if experts > 1 else "llama",
            num_layers=data["num_hidden_layers"],
            hidden_size=data["hidden_size"],
            ffn_hidden_size=data["intermediate_size"],
            num_heads=data["num_attention_heads"],
            num_kv_heads=data.get("num_key_value_heads"),
            vocab_size=data["vocab_size"],
            seq_len=seq_len or data.get("max_position_embeddings") or 4096,
            tied_embeddings=bool(data.get("tie_word_embeddings", False)),
            bias=False,
            qkv_bias=bool(data.get("attention_bias", model_type == "qwen2")),
        )
        if experts > 1:
            cfg.update(num_experts=experts, experts_top_k=data.get("num_experts_per_tok", 2))
    elif model_type == "gpt2":
        _require(data, ("n_embd", "n_layer", "n_head", "vocab_size"), source, model_type)
        cfg = dict(
            family="gpt",
            num_layers=data["n_layer"],
            hidden_size=data["n_embd"],
            ffn_hidden_size=data.get("n_inner") or 4 * data["n_embd"],
            num_heads=data["n_head"],
            vocab_size=data["vocab_size"],
            seq_len=seq_len or data.get("n_positions") or 1024,
            max_position_embeddings=data.get("n_positions"),
            tied_embeddings=True,
            dropout=any(data.get(k, 0.1) > 0 for k in ("resid_pdrop", "attn_pdrop", "embd_pdrop")),
        )
    else:  # gpt_neox
        keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        _require(data, keys, source, model_type)
        cfg = dict(
            family="gpt",
            num_layers=data["num_hidden_layers"],
            hidden_size=data["hidden_size"],
            ffn_hidden_size=data["intermediate_size"],
            num_heads=data["num_attention_heads"],
            vocab_size=data["vocab_size"],
            seq_len=seq_len or data.get("max_position_embeddings") or 2048,
            position_embedding="rope",
            tied_embeddings=bool(data.get("tie_word_embeddings", False)),
            dropout=False,
        )
    cfg["name"] = name
    cfg["source"] = f"Hugging Face config {source}"
    from hwmodel.loading import validate

    return validate(WorkloadConfig, cfg, source)
