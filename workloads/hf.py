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
from workloads.config import MAX_TOKENS, WorkloadConfig

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


def _int(data: dict[str, Any], key: str, source: str) -> int | None:
    """`data[key]` as an integer from 1 to MAX_TOKENS (no size, count or length of a real model is larger), None
    when absent or null; anything else is refused (a quoted "8" is not 8, true is not 1, 0 positions is not a
    model)."""
    value = data.get(key)
    if value is None:
        return None
    accepted = f"expected an integer from 1 to {MAX_TOKENS}"
    if isinstance(value, bool) or not isinstance(value, int):
        shown = f"the text {value!r}" if isinstance(value, str) else repr(value)
        raise SpecError(f"{source}: {key}: {accepted}, got {shown}"[:300])
    if not 1 <= value <= MAX_TOKENS:
        raise SpecError(f"{source}: {key}: {accepted}, got {value}"[:300])
    return value


def _flag(data: dict[str, Any], key: str, source: str, default: bool) -> bool:
    """`data[key]` as true/false (default when absent or null); the text "false" is refused, not read as true."""
    value = data.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        shown = f"the text {value!r}" if isinstance(value, str) else repr(value)
        raise SpecError(f"{source}: {key}: expected true or false, got {shown}"[:300])
    return value


def _fraction(data: dict[str, Any], key: str, source: str, default: float) -> float:
    """`data[key]` as a probability in [0, 1] (dropout rates)."""
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise SpecError(f"{source}: {key}: expected a number from 0 to 1, got {value!r}"[:300])
    return float(value)


def _check_sliding_window(data: dict[str, Any], seq_len: int, source: str) -> None:
    """Refuse a sequence longer than the sliding attention window (a window the sequence fits in changes nothing)."""
    window = _int(data, "sliding_window", source)
    if not window or not _flag(data, "use_sliding_window", source, True):
        return
    if seq_len > window:
        raise SpecError(
            f"{source}: sliding_window: {window} (each token attends to the last {window} only) is not modelled, "
            f"and seq_len={seq_len} is longer; train at --seq-len {window} or less, where the window changes "
            "nothing, or remove sliding_window from the config to model full attention"
        )


def is_hf_config(data: dict[str, Any]) -> bool:
    return "model_type" in data or "architectures" in data


def _require(data: dict[str, Any], keys: tuple[str, ...], source: str, model_type: str) -> dict[str, int]:
    """The required integer keys, each checked; a missing one is named."""
    missing = [k for k in keys if data.get(k) is None]
    if missing:
        raise SpecError(f"{source}: a {model_type} config.json needs {', '.join(missing)}")
    return {k: int(_int(data, k, source) or 0) for k in keys}


def from_hf_config(
    data: dict[str, Any], source: str, name: str = "custom", seq_len: int | None = None
) -> WorkloadConfig:
    """Translate a Hugging Face config dict; `source` names the file in error messages."""
    model_type = data.get("model_type")
    if not isinstance(model_type, str) or model_type not in SUPPORTED:
        raise SpecError(
            f"{source}: model_type: {model_type!r} is not supported; accepted: {', '.join(SUPPORTED)} "
            "(or write a hetplan workload file with 'family:')"[:400]
        )
    if model_type in LLAMA_LIKE:
        keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        got = _require(data, keys, source, model_type)
        experts = _int(data, "num_local_experts", source) or 1
        train_len = _seq_len(seq_len, _int(data, "max_position_embeddings", source), source, "max_position_embeddings")
        cfg = dict(
            family="moe" if experts > 1 else "llama",
            num_layers=got["num_hidden_layers"],
            hidden_size=got["hidden_size"],
            ffn_hidden_size=got["intermediate_size"],
            num_heads=got["num_attention_heads"],
            num_kv_heads=_int(data, "num_key_value_heads", source),
            vocab_size=got["vocab_size"],
            seq_len=train_len,
            tied_embeddings=_flag(data, "tie_word_embeddings", source, False),
            bias=False,
            qkv_bias=_flag(data, "attention_bias", source, model_type == "qwen2"),
        )
        _check_sliding_window(data, train_len, source)
        if experts > 1:
            cfg.update(num_experts=experts, experts_top_k=_int(data, "num_experts_per_tok", source) or 2)
    elif model_type == "gpt2":
        got = _require(data, ("n_embd", "n_layer", "n_head", "vocab_size"), source, model_type)
        positions = _int(data, "n_positions", source)
        cfg = dict(
            family="gpt",
            num_layers=got["n_layer"],
            hidden_size=got["n_embd"],
            ffn_hidden_size=_int(data, "n_inner", source) or 4 * got["n_embd"],
            num_heads=got["n_head"],
            vocab_size=got["vocab_size"],
            seq_len=_seq_len(seq_len, positions, source, "n_positions"),
            max_position_embeddings=positions,
            tied_embeddings=True,
            dropout=any(_fraction(data, k, source, 0.1) > 0 for k in ("resid_pdrop", "attn_pdrop", "embd_pdrop")),
        )
    else:  # gpt_neox
        keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        got = _require(data, keys, source, model_type)
        cfg = dict(
            family="gpt",
            num_layers=got["num_hidden_layers"],
            hidden_size=got["hidden_size"],
            ffn_hidden_size=got["intermediate_size"],
            num_heads=got["num_attention_heads"],
            vocab_size=got["vocab_size"],
            seq_len=_seq_len(seq_len, _int(data, "max_position_embeddings", source), source, "max_position_embeddings"),
            position_embedding="rope",
            tied_embeddings=_flag(data, "tie_word_embeddings", source, False),
            dropout=False,
        )
    cfg["name"] = name
    cfg["source"] = f"Hugging Face config {source}"
    from hwmodel.loading import validate

    return validate(WorkloadConfig, cfg, source)
