"""The workload file: what a transformer job is, in the keys users already know.

Keys: `family`, `num_layers`, `hidden_size`, `ffn_hidden_size`, `num_heads`, `num_kv_heads`,
`vocab_size`, `seq_len`, `position_embedding` (learned, rope, none), `tied_embeddings`, and optional
details whose defaults follow the family (`mlp`, `norm`, `bias`, `dropout`, MoE, ViT and T5 keys).
A Hugging Face `config.json` is accepted too (see `workloads.hf`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hwmodel.fields import Int, Name, OptionalBool, OptionalInt, Text
from hwmodel.loading import validate
from hwmodel.units import format_bytes

# Bounds no real model reaches, so that a typo (or 1e12) is refused before any work instead of running for hours.
# The deepest published transformers have about 1,000 blocks (DeepNet), the widest a hidden size near 50,000,
# the longest contexts about 10 million tokens, the largest vocabularies about 260,000 entries.
MAX_LAYERS = 10_000
MAX_WIDTH = 2**20
MAX_TOKENS = 2**24
MAX_EXPERTS = 2**16
MAX_IMAGE = 2**16
# What one block costs in the list of layer kinds alone (one pointer); the cost tables built from it take more.
LAYER_ENTRY_BYTES = 8

FAMILIES = ("gpt", "llama", "bert", "t5", "vit", "moe")

# What each family does when a key is left out.
FAMILY_DEFAULTS: dict[str, dict] = {
    "gpt": dict(
        mlp="gelu",
        norm="layernorm",
        bias=True,
        dropout=True,
        position_embedding="learned",
        tied_embeddings=True,
        causal=True,
    ),
    "llama": dict(
        mlp="swiglu",
        norm="rmsnorm",
        bias=False,
        dropout=False,
        position_embedding="rope",
        tied_embeddings=False,
        causal=True,
    ),
    "moe": dict(
        mlp="swiglu",
        norm="rmsnorm",
        bias=False,
        dropout=False,
        position_embedding="rope",
        tied_embeddings=False,
        causal=True,
    ),
    "bert": dict(
        mlp="gelu",
        norm="layernorm",
        bias=True,
        dropout=True,
        position_embedding="learned",
        tied_embeddings=True,
        causal=False,
    ),
    "t5": dict(
        mlp="relu",
        norm="rmsnorm",
        bias=False,
        dropout=True,
        position_embedding="none",
        tied_embeddings=True,
        causal=False,
    ),
    "vit": dict(
        mlp="gelu",
        norm="layernorm",
        bias=True,
        dropout=False,
        position_embedding="learned",
        tied_embeddings=False,
        causal=False,
    ),
}


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


class WorkloadConfig(BaseModel):
    """A transformer workload. Frozen and hashable, so cost tables can be cached per shape."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Name = "custom"
    description: Text = ""
    family: Literal["gpt", "llama", "bert", "t5", "vit", "moe"]
    num_layers: Int = Field(gt=0, description="transformer blocks (for t5: encoder + decoder blocks)")
    hidden_size: Int = Field(gt=0, le=MAX_WIDTH)
    ffn_hidden_size: OptionalInt = Field(None, gt=0, le=MAX_WIDTH, description="default 4 x hidden_size")
    num_heads: Int = Field(gt=0)
    num_kv_heads: OptionalInt = Field(None, gt=0, description="grouped-query attention; default num_heads")
    vocab_size: Int = Field(gt=0, le=MAX_TOKENS)
    seq_len: Int = Field(gt=0, le=MAX_TOKENS, description="training sequence length in tokens")
    position_embedding: Literal["learned", "rope", "none"] | None = None
    tied_embeddings: OptionalBool = None
    mlp: Literal["gelu", "relu", "swiglu"] | None = None
    norm: Literal["layernorm", "rmsnorm"] | None = None
    bias: OptionalBool = None
    qkv_bias: OptionalBool = Field(None, description="bias on the q/k/v projections only (Qwen2); default: bias")
    dropout: OptionalBool = None
    causal: OptionalBool = None
    max_position_embeddings: OptionalInt = Field(
        None, gt=0, le=MAX_TOKENS, description="rows of a learned position table; default seq_len"
    )
    # MoE
    num_experts: Int = Field(1, gt=0, le=MAX_EXPERTS)
    experts_top_k: Int = Field(1, gt=0)
    # encoder-decoder (t5)
    num_decoder_layers: OptionalInt = Field(None, ge=0, description="t5: how many of num_layers are decoder blocks")
    decoder_seq_len: OptionalInt = Field(None, gt=0, le=MAX_TOKENS)
    # vision (vit)
    image_size: OptionalInt = Field(None, gt=0, le=MAX_IMAGE)
    patch_size: OptionalInt = Field(None, gt=0, le=MAX_IMAGE)
    num_channels: Int = Field(3, gt=0, le=MAX_WIDTH)
    num_classes: OptionalInt = Field(None, gt=0, le=MAX_TOKENS)
    source: Text = ""

    @field_validator("num_layers")
    @classmethod
    def _layer_list_fits(cls, value: int) -> int:
        # Checked before anything builds the per-block layer list: 10**12 blocks is a MemoryError (or hours).
        if value > MAX_LAYERS:
            size = format_bytes(value * LAYER_ENTRY_BYTES)
            raise ValueError(
                f"num_layers={value}: the model's layer list would hold {value:.3g} blocks (the list alone {size}); "
                f"accepted: 1 to {MAX_LAYERS}"
            )
        return value

    @model_validator(mode="before")
    @classmethod
    def _fill_family_defaults(cls, data):
        # `family` may be anything a file holds (a list is unhashable): only a known name brings defaults.
        if isinstance(data, dict) and isinstance(data.get("family"), str) and data["family"] in FAMILY_DEFAULTS:
            merged = dict(data)
            for key, value in FAMILY_DEFAULTS[data["family"]].items():
                if merged.get(key) is None:
                    merged[key] = value
            image, patch = merged.get("image_size"), merged.get("patch_size")
            if data["family"] == "vit" and _positive_int(image) and _positive_int(patch):
                # A ViT's sequence is its patches plus the class token.
                patches = (merged["image_size"] // merged["patch_size"]) ** 2
                merged.setdefault("seq_len", patches + 1)
            return merged
        return data

    @model_validator(mode="after")
    def _check(self) -> WorkloadConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.kv_heads > self.num_heads or self.num_heads % self.kv_heads:
            raise ValueError(f"num_kv_heads={self.kv_heads} must divide num_heads={self.num_heads}")
        if self.experts_top_k > self.num_experts:
            raise ValueError(f"experts_top_k={self.experts_top_k} exceeds num_experts={self.num_experts}")
        if self.family == "moe" and self.num_experts < 2:
            raise ValueError("family 'moe' needs num_experts >= 2")
        if self.family == "t5":
            dec = self.decoder_layers
            if not 0 < dec < self.num_layers:
                raise ValueError(f"t5 needs 0 < num_decoder_layers < num_layers; got {dec} of {self.num_layers}")
        if self.family == "vit":
            if not (self.image_size and self.patch_size and self.num_classes):
                raise ValueError("family 'vit' needs image_size, patch_size and num_classes")
            if self.image_size % self.patch_size:
                raise ValueError(f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}")
        if (
            self.position_embedding == "learned"
            and self.max_position_embeddings
            and self.seq_len > self.max_position_embeddings
        ):
            raise ValueError(
                f"seq_len={self.seq_len} exceeds max_position_embeddings={self.max_position_embeddings} "
                "of the learned position table"
            )
        return self

    # ---- derived shape -------------------------------------------------------------------------
    @property
    def ffn(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def decoder_layers(self) -> int:
        if self.family != "t5":
            return 0
        return self.num_decoder_layers if self.num_decoder_layers is not None else self.num_layers // 2

    @property
    def encoder_layers(self) -> int:
        return self.num_layers - self.decoder_layers if self.family == "t5" else 0

    @property
    def dec_seq_len(self) -> int:
        return self.decoder_seq_len or self.seq_len

    @property
    def position_rows(self) -> int:
        return self.max_position_embeddings or self.seq_len

    @property
    def tokens_per_sample(self) -> int:
        """Tokens a sample contributes to tokens/s (decoder tokens for t5, patches+1 for ViT)."""
        return self.dec_seq_len if self.family == "t5" else self.seq_len

    def with_seq_len(self, seq_len: int) -> WorkloadConfig:
        """The same model trained at another sequence length."""
        data = self.model_dump()
        data["seq_len"] = seq_len
        if self.family == "t5" and self.decoder_seq_len is None:
            data["decoder_seq_len"] = None
        if self.position_embedding == "learned" and self.max_position_embeddings is None:
            # The learned table follows the training length unless the file fixed it.
            data["max_position_embeddings"] = None
        return validate(WorkloadConfig, data, f"workload {self.name!r} at seq_len={seq_len}")
