"""Hugging Face `config.json` -> WorkloadConfig.

Accepts the key names of LLaMA, Mistral, Qwen2, Mixtral, GPT-2 and GPT-NeoX configs.

The training sequence length is not in a config.json: `max_position_embeddings` is the longest context the model
accepts (131072 for Qwen2), not what it is trained at. Pass `seq_len` (`--seq-len`); without it the length is
`DEFAULT_SEQ_LEN` tokens, or the model's maximum where that is shorter, with a `SeqLenDefault` warning saying so.

Sliding-window attention (Mistral's `sliding_window`, Qwen2's with `use_sliding_window`) is not modelled: it is
exact, and accepted, only where the sequence fits in the window; a longer sequence is refused with the reason.
"""

from __future__ import annotations

import warnings
from typing import Any

from hwmodel.errors import SpecError
from workloads.config import WorkloadConfig

LLAMA_LIKE = ("llama", "mistral", "qwen2", "mixtral")
SUPPORTED = LLAMA_LIKE + ("gpt2", "gpt_neox")
DEFAULT_SEQ_LEN = 4096


class SeqLenDefault(UserWarning):
    """A config.json loaded without a training sequence length: the default was used (the CLIs print it)."""


def _seq_len(seq_len: int | None, max_positions: int | None, source: str, key: str) -> int:
    """The training length: `seq_len` when given, else DEFAULT_SEQ_LEN capped at the model's maximum, said aloud."""
    if seq_len:
        return seq_len
    chosen = min(DEFAULT_SEQ_LEN, max_positions) if max_positions else DEFAULT_SEQ_LEN
    limit = f"{key}={max_positions} is the longest context the model accepts, " if max_positions else ""
    warnings.warn(
        f"{source}: no --seq-len given; training at {chosen} tokens ({limit}not a training length); "
        "pass --seq-len to choose",
        SeqLenDefault,
        stacklevel=3,
    )
    return chosen


def _check_sliding_window(data: dict[str, Any], seq_len: int, source: str) -> None:
    """Refuse a sequence longer than the sliding attention window (a window the sequence fits in changes nothing)."""
    window = data.get("sliding_window")
    if not window or data.get("use_sliding_window", True) is False:
        return
    if seq_len > window:
        raise SpecError(
            f"{source}: sliding_window: {window} (each token attends to the last {window} only) is not modelled, "
            f"and seq_len={seq_len} is longer; train at --seq-len {window} or less, where the window changes "
            "nothing, or remove sliding_window from the config to model full attention"
        )


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
            seq_len=_seq_len(seq_len, data.get("max_position_embeddings"), source, "max_position_embeddings"),
            tied_embeddings=bool(data.get("tie_word_embeddings", False)),
            bias=False,
            qkv_bias=bool(data.get("attention_bias", model_type == "qwen2")),
        )
        _check_sliding_window(data, cfg["seq_len"], source)
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
            seq_len=_seq_len(seq_len, data.get("n_positions"), source, "n_positions"),
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
            seq_len=_seq_len(seq_len, data.get("max_position_embeddings"), source, "max_position_embeddings"),
            position_embedding="rope",
            tied_embeddings=bool(data.get("tie_word_embeddings", False)),
            dropout=False,
        )
    cfg["name"] = name
    cfg["source"] = f"Hugging Face config {source}"
    from hwmodel.loading import validate

    return validate(WorkloadConfig, cfg, source)
