"""Exact per-layer costs of transformer families (GPT, LLaMA, BERT, T5, ViT, MoE).

Every count follows from the shape; nothing is fitted. Activation bytes follow Korthikanti et al. 2022
("Reducing Activation Recomputation in Large Transformer Models"): per layer, without recompute and with
naive attention, s*b*h*(34 + 5*a*s/h) bytes in fp16 (with dropout), divided by t under tensor plus
sequence parallelism, and 34*s*b*h/t with selective recompute. SwiGLU, GQA, RoPE, flash attention,
context parallelism and MoE extend the same tensor-by-tensor accounting.

FLOP conventions: a matmul of (m x k) by (k x n) is 2*m*k*n FLOPs; backward is twice forward (input and
weight gradients). Flash attention skips the masked half of a causal score matrix and recomputes the
scores in backward (backward = 2.5x forward); naive attention computes the whole matrix. The model
FLOPs used for MFU count self-attention as 4*b*s^2*h per forward, halved under a causal mask (see
`simulator.metrics` for why).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from workloads.config import WorkloadConfig
from workloads.ops import ATTENTION, MATRIX, VECTOR, Collective, LayerProfile, OpTableBuilder, ShardShape

LAYER_KINDS = ("embedding", "patch_embedding", "decoder", "encoder", "cross_decoder", "head")


def layer_kinds(cfg: WorkloadConfig) -> tuple[str, ...]:
    """The model's layers in order: an input layer, the transformer blocks, the output layer."""
    if cfg.family == "vit":
        return ("patch_embedding",) + ("encoder",) * cfg.num_layers + ("head",)
    if cfg.family == "t5":
        return ("embedding",) + ("encoder",) * cfg.encoder_layers + ("cross_decoder",) * cfg.decoder_layers + ("head",)
    if cfg.family == "bert":
        return ("embedding",) + ("encoder",) * cfg.num_layers + ("head",)
    return ("embedding",) + ("decoder",) * cfg.num_layers + ("head",)


class _LayerBuilder:
    """Adds the operators of transformer sub-blocks to an OpTableBuilder."""

    def __init__(self, cfg: WorkloadConfig, kind: str, shape: ShardShape):
        self.cfg = cfg
        self.shape = shape
        self.b = OpTableBuilder(kind, shape)
        self.e = shape.dtype_bytes
        self.t = shape.tp
        self.c = shape.cp

    # ---- helpers ---------------------------------------------------------------------------------
    def tokens(self, seq: int) -> float:
        """Tokens of this micro-batch on one context-parallel rank."""
        return self.shape.micro_batch * seq / self.c

    def sp_tokens(self, seq: int) -> float:
        """Tokens held by a device in the norm/dropout regions (sharded over tp under sequence parallelism)."""
        tokens = self.tokens(seq)
        return tokens / self.t if self.shape.sequence_parallel else tokens

    def norm_params(self) -> int:
        h = self.cfg.hidden_size
        return 2 * h if self.cfg.norm == "layernorm" and self.cfg.bias else h

    def norm(self, name: str, seq: int) -> None:
        """A norm before a tensor-parallel region: sequence-parallel all-gather after it, or an
        all-reduce of the input gradient in backward."""
        h, e = self.cfg.hidden_size, self.e
        tsp = self.sp_tokens(seq)
        self.b.op(name, VECTOR, 5 * tsp * h, 2 * tsp * h * e)
        self.b.keep(tsp * h * e)
        self.b.params(self.norm_params())
        if self.t > 1:
            full = self.tokens(seq) * h * e
            if self.shape.sequence_parallel:
                self.b.fwd_comm.append(Collective("all_gather", full, "tp"))
                self.b.bwd_comm.append(Collective("reduce_scatter", full, "tp"))
            else:
                self.b.bwd_comm.append(Collective("all_reduce", full, "tp"))

    def row_parallel_exit(self, seq: int) -> None:
        """Leaving a tensor-parallel region: reduce-scatter (sequence parallel) or all-reduce."""
        if self.t == 1:
            return
        full = self.tokens(seq) * self.cfg.hidden_size * self.e
        if self.shape.sequence_parallel:
            self.b.fwd_comm.append(Collective("reduce_scatter", full, "tp"))
            self.b.bwd_comm.append(Collective("all_gather", full, "tp"))
        else:
            self.b.fwd_comm.append(Collective("all_reduce", full, "tp"))

    def residual(self, name: str, seq: int) -> None:
        h, e = self.cfg.hidden_size, self.e
        tsp = self.sp_tokens(seq)
        if self.cfg.dropout:
            self.b.op(name, VECTOR, 2 * tsp * h, tsp * h * (3 * e + 1))
            self.b.keep(tsp * h)  # dropout mask, one byte per element
        else:
            self.b.op(name, VECTOR, tsp * h, 3 * tsp * h * e)

    def linear(
        self, name: str, tokens: float, k: float, n: float, *, model_tokens: float, parts: tuple[float, ...] = (1.0,)
    ) -> None:
        """A (tokens x k) @ (k x n) matmul on one device, k or n already split over tp.

        Model FLOPs count the whole matmul: all `model_tokens` of the micro-batch, the tp split undone.
        `parts`: the shares of n that torchtitan computes as separate matmuls (q, k, v; gate, up), in order.
        """
        e = self.e
        total = sum(parts)
        self.b.op(
            name,
            MATRIX,
            2 * tokens * k * n,
            e * (tokens * k + k * n + tokens * n),
            model_flops=2 * model_tokens * k * n * self.t,
            min_dim=min(tokens, k, n),
            mm_outputs=tuple(tokens * n * part / total * e for part in parts),
        )

    # ---- attention -------------------------------------------------------------------------------
    def attention(self, prefix: str, seq_q: int, seq_kv: int, *, causal: bool, cross: bool) -> None:
        """An attention block: norm, projections, the attention core, the ring exchange of context
        parallelism, output projection and residual. `cross` attends to `seq_kv` encoder tokens."""
        self.attention_projections(prefix, seq_q, seq_kv, cross=cross)
        self.attention_core(prefix, seq_q, seq_kv, causal=causal)
        if self.c > 1 and not cross:
            self.ring_attention_exchange(seq_kv)
        self.attention_output(prefix, seq_q)

    def attention_projections(self, prefix: str, seq_q: int, seq_kv: int, *, cross: bool) -> None:
        """The norm, the q/k/v projections (fused for self-attention) and rotary embeddings."""
        cfg, e, t = self.cfg, self.e, self.t
        h, a, kvh, d = cfg.hidden_size, cfg.num_heads, cfg.kv_heads, cfg.head_dim
        mb = self.shape.micro_batch
        tq, tkv = self.tokens(seq_q), self.tokens(seq_kv)
        self.norm(f"{prefix}norm", seq_q)
        q_out, kv_out = a * d, 2 * kvh * d
        qkv_bias = cfg.qkv_bias if cfg.qkv_bias is not None else cfg.bias
        if cross:
            self.linear(f"{prefix}q_proj", tq, h, q_out / t, model_tokens=mb * seq_q)
            self.linear(f"{prefix}kv_proj", tkv, h, kv_out / t, model_tokens=mb * seq_kv)
            self.b.keep(tkv * h * e)  # encoder output, input of the kv projection
        else:
            kv = kv_out / 2
            self.linear(
                f"{prefix}qkv_proj", tq, h, (q_out + kv_out) / t, model_tokens=mb * seq_q, parts=(q_out, kv, kv)
            )
        self.b.keep(self.sp_tokens(seq_q) * h * e)  # normed input of the projection(s)
        self.b.params(h * (q_out + kv_out) + (q_out + kv_out if qkv_bias else 0), t)
        if cfg.position_embedding == "rope" and not cross:
            rope_elems = tq * (a + kvh) * d / t
            self.b.op(f"{prefix}rope", VECTOR, 6 * rope_elems, 4 * rope_elems * e)

    def attention_core(self, prefix: str, seq_q: int, seq_kv: int, *, causal: bool) -> None:
        """Scores, softmax and context: one fused kernel (flash) or three unfused ones."""
        cfg, e, t, c = self.cfg, self.e, self.t, self.c
        a, kvh, d = cfg.num_heads, cfg.kv_heads, cfg.head_dim
        mb = self.shape.micro_batch
        tq, tkv = self.tokens(seq_q), self.tokens(seq_kv)
        heads = a / t
        # Score elements on this device: its query tokens against every key.
        score_elems = mb * heads * (seq_q / c) * seq_kv
        q_bytes = tq * a * d / t * e
        kv_bytes_local = tkv * kvh * d / t * e  # one of k or v, this rank's tokens
        # Model FLOPs count the score matrix a causal mask leaves: half of it (see simulator.metrics).
        model_core = 4 * mb * seq_q * seq_kv * a * d * (0.5 if causal else 1.0)
        if causal:
            self.b.model_flops_masked += model_core  # the masked half, for the full-matrix convention
        if self.shape.attention == "flash":
            frac = 0.5 if causal else 1.0
            core = 4 * score_elems * d * frac
            io = q_bytes * 2 + 2 * mb * seq_kv * kvh * d / t * e
            self.b.op(
                f"{prefix}flash_attention",
                ATTENTION,
                core,
                io,
                bwd_flops=2.5 * core,
                bwd_bytes=2.5 * io,
                bwd_kernels=2,
                selective=True,
                model_flops=model_core,
                min_dim=seq_kv / c,  # keys one kernel call runs over (a ring step's chunk under cp)
                saved_output=q_bytes + tq * heads * 4,  # output and fp32 log-sum-exp
            )
            self.b.keep(q_bytes + 2 * kv_bytes_local)  # q, k, v
            self.b.keep(tq * heads * 4, dropped_by_selective=True)  # fp32 log-sum-exp per row
        else:
            kv_bytes = mb * seq_kv * kvh * d / t * e  # one of k or v, every key
            self.unfused_attention_core(prefix, seq_q, score_elems, q_bytes, kv_bytes, kv_bytes_local, model_core)

    def unfused_attention_core(
        self,
        prefix: str,
        seq_q: int,
        score_elems: float,
        q_bytes: float,
        kv_bytes: float,
        kv_bytes_local: float,
        model_core: float,
    ) -> None:
        """Scores, softmax (with dropout) and context as separate kernels, the score matrix saved."""
        e, d = self.e, self.cfg.head_dim
        min_dim = min(d, seq_q / self.c)
        self.b.op(
            f"{prefix}scores",
            MATRIX,
            2 * score_elems * d,
            q_bytes + kv_bytes + score_elems * e,
            selective=True,
            model_flops=model_core / 2,
            min_dim=min_dim,
        )
        self.b.keep(q_bytes + kv_bytes_local)  # q, k
        self.b.op(f"{prefix}softmax", VECTOR, 5 * score_elems, 2 * score_elems * e, selective=True)
        self.b.keep(score_elems * e, dropped_by_selective=True)  # softmax output
        if self.cfg.dropout:
            self.b.op(f"{prefix}attn_dropout", VECTOR, 2 * score_elems, score_elems * (2 * e + 1), selective=True)
            self.b.keep(score_elems, dropped_by_selective=True)  # mask
            self.b.keep(score_elems * e, dropped_by_selective=True)  # dropped probabilities
        self.b.op(
            f"{prefix}context",
            MATRIX,
            2 * score_elems * d,
            score_elems * e + kv_bytes + q_bytes,
            selective=True,
            model_flops=model_core / 2,
            min_dim=min_dim,
        )
        self.b.keep(kv_bytes_local)  # v

    def ring_attention_exchange(self, seq_kv: int) -> None:
        """Ring attention passes every rank's k and v around the cp group (twice as much in backward)."""
        cfg, c = self.cfg, self.c
        kv_chunk = 2 * self.tokens(seq_kv) * cfg.kv_heads * cfg.head_dim / self.t * self.e
        self.b.fwd_comm.append(Collective("send_recv", kv_chunk * (c - 1), "cp"))
        self.b.bwd_comm.append(Collective("send_recv", 2 * kv_chunk * (c - 1), "cp"))

    def attention_output(self, prefix: str, seq_q: int) -> None:
        """The output projection, leaving the tensor-parallel region, and the residual."""
        cfg, e, t = self.cfg, self.e, self.t
        h, q_out = cfg.hidden_size, cfg.num_heads * cfg.head_dim
        tq = self.tokens(seq_q)
        self.linear(f"{prefix}out_proj", tq, q_out / t, h, model_tokens=self.shape.micro_batch * seq_q)
        self.b.keep(tq * q_out / t * e)  # attention output, input of the projection
        self.b.params(q_out * h, t)
        self.b.params(h if cfg.bias else 0)
        self.row_parallel_exit(seq_q)
        self.residual(f"{prefix}residual", seq_q)

    # ---- MLP ---------------------------------------------------------------------------------------
    def mlp(self, seq: int) -> None:
        cfg, e, t = self.cfg, self.e, self.t
        h, f = cfg.hidden_size, cfg.ffn
        mb = self.shape.micro_batch
        tokens = self.tokens(seq)
        self.norm("mlp_norm", seq)
        experts = cfg.num_experts if cfg.family == "moe" else 1
        routed = tokens * (cfg.experts_top_k if experts > 1 else 1)
        shard = t * (self.shape.ep if experts > 1 else 1)
        if experts > 1:
            self.b.op(
                "router",
                MATRIX,
                2 * tokens * h * experts,
                e * (tokens * h + h * experts),
                model_flops=2 * mb * seq * h * experts,
                min_dim=min(tokens, h, experts),
            )
            self.b.params(h * experts)
            if self.shape.ep > 1:
                moved = routed * h * e
                self.b.fwd_comm += [Collective("all_to_all", moved, "ep"), Collective("all_to_all", moved, "ep")]
                self.b.bwd_comm += [Collective("all_to_all", moved, "ep"), Collective("all_to_all", moved, "ep")]
                self.b.keep(moved)  # dispatched tokens
        model_routed = mb * seq * (cfg.experts_top_k if experts > 1 else 1)
        self.b.keep(self.sp_tokens(seq) * h * e)  # normed input of the first linear
        if cfg.mlp == "swiglu":
            self.linear("gate_up_proj", routed, h, 2 * f / t, model_tokens=model_routed, parts=(1.0, 1.0))
            self.b.params(experts * 2 * h * f, shard)
            elems = routed * f / t
            self.b.op("swiglu", VECTOR, 4 * elems, 5 * elems * e)
            self.b.keep(3 * elems * e)  # gate (for silu), silu(gate) and up (for the product)
        else:
            assert cfg.mlp is not None  # every family's defaults name an MLP
            self.linear("fc1", routed, h, f / t, model_tokens=model_routed)
            self.b.params(experts * (h * f + (f if cfg.bias else 0)), shard)
            elems = routed * f / t
            flops = 8 * elems if cfg.mlp == "gelu" else elems
            self.b.op(cfg.mlp, VECTOR, flops, 2 * elems * e)
            self.b.keep(elems * e)  # activation input
        self.linear("fc2", routed, f / t, h, model_tokens=model_routed)
        self.b.keep(routed * f / t * e)  # input of the second linear
        self.b.params(experts * f * h, shard)
        self.b.params(experts * h if cfg.bias else 0, self.shape.ep if experts > 1 else 1)
        self.row_parallel_exit(seq)
        self.residual("mlp_residual", seq)

    # ---- whole layers ----------------------------------------------------------------------------
    def block(self, kind: str) -> LayerProfile:
        cfg, e = self.cfg, self.e
        if kind == "cross_decoder":
            seq = cfg.dec_seq_len
            self.attention("self_", seq, seq, causal=True, cross=False)
            self.attention("cross_", seq, cfg.seq_len, causal=False, cross=True)
        else:
            seq = cfg.seq_len
            self.attention("", seq, seq, causal=bool(cfg.causal) and kind == "decoder", cross=False)
        self.mlp(seq)
        layer_input = self.sp_tokens(seq) * cfg.hidden_size * e
        self.b.output_bytes = layer_input
        return self.b.build(full_saved=layer_input)

    def embedding(self) -> LayerProfile:
        cfg, e, t = self.cfg, self.e, self.t
        h = cfg.hidden_size
        seqs = [cfg.seq_len] + ([cfg.dec_seq_len] if cfg.family == "t5" else [])
        tokens = sum(self.tokens(s) for s in seqs)
        tsp = sum(self.sp_tokens(s) for s in seqs)
        self.b.op("embedding_lookup", VECTOR, tokens * h, 2 * tokens * h * e, bwd_bytes=2 * tokens * h * e)
        self.b.params(cfg.vocab_size * h, t)  # vocab-parallel
        if cfg.position_embedding == "learned":
            self.b.params(cfg.position_rows * h)
        if cfg.family == "bert":
            self.b.params(2 * h)  # token types
            self.b.op("embedding_norm", VECTOR, 5 * tsp * h, 2 * tsp * h * e)
            self.b.params(self.norm_params())
            self.b.keep(tsp * h * e)
        self.b.keep(8 * tokens)  # token ids
        if cfg.dropout:
            self.b.keep(tsp * h)
        if t > 1:
            full = tokens * h * e
            kind: Literal["reduce_scatter", "all_reduce"] = (
                "reduce_scatter" if self.shape.sequence_parallel else "all_reduce"
            )
            self.b.fwd_comm.append(Collective(kind, full, "tp"))
            if self.shape.sequence_parallel:
                self.b.bwd_comm.append(Collective("all_gather", full, "tp"))
        self.b.output_bytes = self.sp_tokens(cfg.seq_len) * h * e
        return self.b.build(full_saved=8 * tokens)

    def patch_embedding(self) -> LayerProfile:
        cfg, e = self.cfg, self.e
        h, p, ch = cfg.hidden_size, cfg.patch_size, cfg.num_channels
        assert p is not None and cfg.image_size is not None
        patches = (cfg.image_size // p) ** 2
        mb = self.shape.micro_batch
        local = mb * patches / self.c
        k = ch * p * p
        # The patch projection is small; it is replicated over the tp group rather than split.
        self.b.op(
            "patch_proj",
            MATRIX,
            2 * local * k * h,
            e * (local * k + k * h + local * h),
            model_flops=2 * mb * patches * k * h,
            min_dim=min(local, k, h),
        )
        self.b.keep(local * k * e)
        self.b.params(k * h + h + (patches + 1) * h + h)  # projection, bias, positions, class token
        self.b.output_bytes = self.sp_tokens(cfg.seq_len) * h * e
        return self.b.build(full_saved=local * k * e)

    def head(self) -> LayerProfile:
        cfg, e, t = self.cfg, self.e, self.t
        h, vocab = cfg.hidden_size, cfg.vocab_size
        mb = self.shape.micro_batch
        if cfg.family == "vit":
            cls_tokens = mb / self.c
            self.b.op("final_norm", VECTOR, 5 * cls_tokens * h, 2 * cls_tokens * h * e)
            self.b.params(self.norm_params())
            assert cfg.num_classes is not None
            self.b.op(
                "classifier",
                MATRIX,
                2 * cls_tokens * h * cfg.num_classes,
                e * (cls_tokens * h + h * cfg.num_classes),
                model_flops=2 * mb * h * cfg.num_classes,
                min_dim=min(cls_tokens, h, cfg.num_classes),
            )
            self.b.params(h * cfg.num_classes + cfg.num_classes)
            self.b.keep(2 * cls_tokens * h * e)
            return self.b.build(full_saved=cls_tokens * h * e)
        seq = cfg.dec_seq_len if cfg.family == "t5" else cfg.seq_len
        tokens = self.tokens(seq)
        tsp = self.sp_tokens(seq)
        self.norm("final_norm", seq)
        if cfg.family == "bert":
            # MLM transform: dense + gelu + norm before the (tied) decoder; pooler for the classifier.
            self.linear("mlm_dense", tokens, h, h / t, model_tokens=mb * seq)
            self.b.params(h * h + h + self.norm_params() + h * h + h)
            self.b.keep(tokens * h * e * 2)
        self.linear("lm_head", tokens, h, vocab / t, model_tokens=mb * seq)
        self.b.keep(tsp * h * e)
        if cfg.tied_embeddings:
            self.b.tied_params_local = vocab * h / t
        else:
            self.b.params(vocab * h, t)
        if cfg.family == "bert":
            self.b.params(vocab)  # decoder bias
        logits = tokens * vocab / t
        # Cross-entropy upcasts logits to fp32 and keeps the softmax for backward.
        self.b.op("cross_entropy", VECTOR, 5 * logits, logits * (e + 8), bwd_bytes=logits * (4 + e))
        if self.shape.cross_entropy == "fused":
            # flash-attn's kernel saves its input (the logits, e bytes each) and one fp32 log-sum-exp per
            # token; its backward writes the logits' gradient into one new tensor of the logits' dtype.
            self.b.keep(e * logits + 4 * tokens)
            self.b.backward_workspace = e * logits
            if t > 1:
                self.b.fwd_comm.append(Collective("all_reduce", 3 * 4 * tokens, "tp"))
            return self.b.build(full_saved=tsp * h * e)
        self.b.keep(4 * logits)
        # PyTorch's cross-entropy backward makes the fp32 gradient of the log-softmax and of the logits beside
        # the kept softmax: at long sequences and large vocabularies this is the iteration's peak (measured on
        # an H200: the unexplained peak of tinyllama-1.1b with full recompute grows by about 8 bytes per
        # logit). Vocabulary-parallel losses (Megatron's, under tp) write the gradient into the softmax's
        # own buffer instead.
        if t == 1 and self.shape.cross_entropy == "pytorch":
            self.b.backward_workspace = 8 * logits
        if t > 1:
            self.b.fwd_comm.append(Collective("all_reduce", 3 * 4 * tokens, "tp"))
        return self.b.build(full_saved=tsp * h * e)


@lru_cache(maxsize=4096)
def layer_profile(cfg: WorkloadConfig, kind: str, shape: ShardShape) -> LayerProfile:
    """Costs of one layer of `kind` for one micro-batch on one device (cached per shape)."""
    builder = _LayerBuilder(cfg, kind, shape)
    if kind in ("decoder", "encoder", "cross_decoder"):
        return builder.block(kind)
    if kind == "embedding":
        return builder.embedding()
    if kind == "patch_embedding":
        return builder.patch_embedding()
    if kind == "head":
        return builder.head()
    raise AssertionError(f"unknown layer kind {kind}")


@lru_cache(maxsize=256)
def parameter_count(cfg: WorkloadConfig) -> int:
    """Total parameters of the model (tied embeddings counted once)."""
    shape = ShardShape(micro_batch=1, seq_len=cfg.seq_len)
    return round(sum(layer_profile(cfg, kind, shape).params_total for kind in layer_kinds(cfg)))


@lru_cache(maxsize=256)
def model_flops_per_sample(cfg: WorkloadConfig, causal_in_full: bool = False) -> float:
    """Training FLOPs of one sample in the MFU convention: 3 x forward (no recompute). With
    `causal_in_full`, causal score matrices count in full, as Megatron-LM's and PaLM's formulas count them."""
    shape = ShardShape(micro_batch=1, seq_len=cfg.seq_len)
    profiles = [layer_profile(cfg, kind, shape) for kind in layer_kinds(cfg)]
    return 3.0 * sum(p.model_fwd_flops + (p.model_fwd_flops_masked if causal_in_full else 0.0) for p in profiles)
