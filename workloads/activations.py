"""The tensors a transformer block saves for backward, by token, for MEMO-style swapping and recomputation.

MEMO (Zhao et al., SIGMOD 2025) splits a block's saved activations along the token dimension. Everything
outside the attention core is token-wise: token i's norm, projections, rotary embedding, MLP and residuals
depend on token i alone, so a slice of tokens can be recomputed from the same slice of the block's input
(and of the attention output) without touching the others. The attention core mixes all tokens and is
never recomputed token-wise: what only it produces (the log-sum-exp per row; with naive attention the
score-sized tensors) is swapped to host whole. Its inputs q, k and v come from token-wise projections, so
their slices are swapped or recomputed like any token-wise tensor.

Under `recompute=tokenwise` with `offload=alpha` one block keeps nothing on the device between its forward
and its backward:

- the attention core's tensors go to host in full (`core`);
- the first alpha share of tokens of every token-wise tensor goes to host (`alpha * tokenwise`);
- the other (1 - alpha) share is dropped and recomputed in backward from the block input and the
  attention output of those tokens, which go to host as recompute anchors (`(1 - alpha) * anchors`).

The byte counts follow `workloads.transformer` tensor by tensor (same shard shape, same dtype), so
`core + tokenwise == layer_profile(...).saved_bytes["none"]`; the token-wise recompute time is the
block's forward minus its attention core (`LayerTimes.forward - LayerTimes.recompute_selective`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from workloads.config import WorkloadConfig
from workloads.ops import ShardShape

TOKENWISE_KINDS = ("decoder", "encoder")


@dataclass(frozen=True)
class SavedTensor:
    """One tensor a block keeps for backward, per device and micro-batch (after tp/sp/cp sharding)."""

    name: str
    nbytes: float
    tokens: float  # length of its token dimension on this device
    token_wise: bool  # False: part of the attention core (never recomputed token-wise)
    anchor: bool = False  # what token-wise recompute starts from (block input, attention output)


@dataclass(frozen=True)
class BlockActivations:
    """The saved tensors of one block and how they split under MEMO."""

    tensors: tuple[SavedTensor, ...]

    @property
    def total(self) -> float:
        return sum(t.nbytes for t in self.tensors)

    @property
    def core(self) -> float:
        """Bytes of the attention core's tensors (swapped whole)."""
        return sum(t.nbytes for t in self.tensors if not t.token_wise)

    @property
    def tokenwise(self) -> float:
        """Bytes of the token-wise tensors (alpha swapped, 1 - alpha recomputed)."""
        return sum(t.nbytes for t in self.tensors if t.token_wise)

    @property
    def anchors(self) -> float:
        """Bytes of the tensors token-wise recompute starts from, over all tokens."""
        return sum(t.nbytes for t in self.tensors if t.anchor)

    def host_bytes(self, alpha: float) -> float:
        """Bytes one block sends to host (and fetches back) under MEMO with swap fraction `alpha`."""
        return self.core + alpha * self.tokenwise + (1.0 - alpha) * self.anchors

    def recompute_share(self, alpha: float) -> float:
        """Share of the token-wise forward work that backward repeats."""
        return 1.0 - alpha


def supports_tokenwise(cfg: WorkloadConfig, kind: str) -> str | None:
    """None when MEMO applies to layers of `kind`, else why not."""
    if kind not in TOKENWISE_KINDS:
        return f"{kind} layers are not transformer blocks with a token dimension MEMO splits"
    if cfg.family == "moe":
        return "mixture-of-experts blocks route tokens across devices; token-wise recompute of them is not modelled"
    return None


@lru_cache(maxsize=4096)
def block_activations(cfg: WorkloadConfig, kind: str, shape: ShardShape) -> BlockActivations:
    """The saved tensors of one `decoder`/`encoder` block (mirrors `workloads.transformer`'s keep calls)."""
    why = supports_tokenwise(cfg, kind)
    if why:
        raise ValueError(why)
    h, f, e, t, c = cfg.hidden_size, cfg.ffn, shape.dtype_bytes, shape.tp, shape.cp
    a, kvh, d = cfg.num_heads, cfg.kv_heads, cfg.head_dim
    seq = cfg.seq_len
    tokens = shape.micro_batch * seq / c  # this cp rank's tokens
    sp = tokens / t if shape.sequence_parallel else tokens  # tokens in the norm/dropout regions
    out: list[SavedTensor] = []

    def add(name: str, nbytes: float, n_tokens: float, token_wise: bool = True, anchor: bool = False) -> None:
        out.append(SavedTensor(name, nbytes, n_tokens, token_wise, anchor))

    # Attention half: norm input (= the block input), the projection input.
    add("attn_norm.input", sp * h * e, sp, anchor=True)
    add("qkv_proj.input", sp * h * e, sp)
    heads = a / t
    q_bytes = tokens * a * d / t * e
    kv_bytes = tokens * kvh * d / t * e
    causal = bool(cfg.causal) and kind == "decoder"
    del causal  # the saved tensors do not depend on the mask
    if shape.attention == "flash":
        add("core.q", q_bytes, tokens)
        add("core.k", kv_bytes, tokens)
        add("core.v", kv_bytes, tokens)
        add("core.logsumexp", tokens * heads * 4, tokens, token_wise=False)
    else:
        score_elems = shape.micro_batch * heads * (seq / c) * seq
        add("core.q", q_bytes, tokens)
        add("core.k", kv_bytes, tokens)
        add("core.softmax", score_elems * e, tokens, token_wise=False)
        if cfg.dropout:
            add("core.dropout_mask", score_elems, tokens, token_wise=False)
            add("core.dropped_probs", score_elems * e, tokens, token_wise=False)
        add("core.v", kv_bytes, tokens)
    add("out_proj.input", tokens * a * d / t * e, tokens, anchor=True)  # the attention output
    if cfg.dropout:
        add("attn_residual.dropout_mask", sp * h, sp)
    # MLP half.
    add("mlp_norm.input", sp * h * e, sp)
    add("mlp.input", sp * h * e, sp)
    elems = tokens * f / t
    if cfg.mlp == "swiglu":
        add("swiglu.gate_up", 3 * elems * e, tokens)
    else:
        add(f"{cfg.mlp}.input", elems * e, tokens)
    add("fc2.input", elems * e, tokens)
    if cfg.dropout:
        add("mlp_residual.dropout_mask", sp * h, sp)
    return BlockActivations(tuple(out))
