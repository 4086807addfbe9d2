"""PyTorch modules for the decoder families (`gpt`, `llama`) and their synthetic training data.

The module mirrors `workloads.transformer` tensor by tensor, so `parameter_count(cfg)` counts exactly
the parameters built here, and its structure follows `layer_kinds(cfg)` so the executor can cut it by
layer index:

    index 0            `embed`        token embedding (+ learned positions), dropout
    index 1..L         `blocks["0"]` .. `blocks[str(L-1)]`   pre-norm transformer blocks
    index L+1          `head`         final norm + LM head (tied to the token embedding when asked)

`blocks` is a ModuleDict keyed by the block's number, so a pipeline stage that keeps blocks 4..7 still
names their parameters `blocks.4...`: names (and with them checkpoints and the seeded initialization)
do not depend on how a plan cuts the model.

Projections are separate linears (`wq`, `wk`, `wv`, `wo`; `w1`, `w2`, `w3` for SwiGLU) because a
column-wise tensor-parallel split of a fused qkv matrix would mix q, k and v across ranks. Attention
reads the number of heads from the tensor shape, so it runs unchanged on a tensor-parallel shard.

Weights are initialized per parameter from a generator seeded by (seed, parameter name), GPT-2 style
(normal 0.02; residual output projections scaled by 1/sqrt(2 L); biases zero; norms one). Any layout of
the same model therefore starts from the same weights: `full_init_tensor` gives the whole tensor and the
executor keeps the shard a rank owns.
"""

from __future__ import annotations

import math
import zlib
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from hwmodel.errors import UserError
from workloads.config import WorkloadConfig
from workloads.transformer import layer_kinds

EXECUTABLE_FAMILIES = ("gpt", "llama")
DROPOUT_P = 0.1  # GPT-2's dropout probability; the workload file says only whether there is dropout
ROPE_THETA = 10000.0
INIT_STD = 0.02
NORM_EPS = 1e-5
# Layers whose output is added to the residual stream: GPT-2 scales their initialization by 1/sqrt(2L).
RESIDUAL_PROJECTIONS = ("attn.wo.weight", "mlp.w2.weight")


def _flash_attn_func():
    """flash-attn's function when the optional `gpu` extra is installed, else None (SDPA is used)."""
    try:
        # flash-attn is the optional `gpu` extra, not installed where mypy runs.
        from flash_attn import flash_attn_func  # type: ignore[import-not-found]
    except Exception:  # not installed, or built for another CUDA: SDPA does the same computation
        return None
    return flash_attn_func


def check_executable(cfg: WorkloadConfig) -> None:
    """Refuse workloads the module builder cannot build (with what is supported)."""
    if cfg.family not in EXECUTABLE_FAMILIES:
        raise UserError(
            f"family {cfg.family!r} cannot be executed yet (workload {cfg.name!r}); supported: "
            f"{', '.join(EXECUTABLE_FAMILIES)}"
        )
    if cfg.num_experts > 1:
        raise UserError(
            f"workload {cfg.name!r}: mixture-of-experts layers cannot be executed yet; supported: dense gpt, llama"
        )


def _norm(cfg: WorkloadConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.hidden_size, eps=NORM_EPS)
    # A LayerNorm has a bias exactly when the model has biases (MPT drops both).
    return nn.LayerNorm(cfg.hidden_size, eps=NORM_EPS, bias=bool(cfg.bias))


@lru_cache(maxsize=32)
def rope_tables(
    seq_len: int, head_dim: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, (seq_len, head_dim), cached per shape (they never change)."""
    inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rope(x: torch.Tensor, positions: torch.Tensor | None = None, num_positions: int = 0) -> torch.Tensor:
    """Rotary position embedding of x, (batch, heads, seq, head_dim): positions 0..seq-1, or `positions`
    (of a sequence of `num_positions` tokens) when x holds a context-parallel share of the tokens."""
    cos, sin = rope_tables(num_positions or x.shape[-2], x.shape[-1], x.device, x.dtype)
    if positions is not None:
        cos, sin = cos[positions], sin[positions]
    return x * cos + rotate_half(x) * sin


class AttentionCore(nn.Module):
    """softmax(q k^T / sqrt(d)) v over (batch, heads, seq, head_dim); causal; GQA by repeating k/v.

    A module of its own so selective recompute can checkpoint exactly this part. `flash` uses
    flash-attn when importable on CUDA, else `scaled_dot_product_attention`; `naive` materializes the
    score matrix as the simulator's naive attention assumes. Under context parallelism `context`
    (`executor.parallel.context_parallel.SequenceContext`) gathers every rank's keys and values and runs this
    attention on blocks of the local queries against the keys each may see.
    """

    def __init__(self, causal: bool, dropout: float, attention: str = "flash"):
        super().__init__()
        self.causal = causal
        self.dropout = dropout
        self.attention = attention
        self.context = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        if self.context is not None:
            return self.context.attend(q, k, v, lambda q, k, v, mask: self._attend(q, k, v, p, mask))
        return self._attend(q, k, v, p, None)

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Attention of q over k, v: causal (when the model is) for mask None, else True where a query may
        see a key (context parallelism's blocks, whose queries and keys are not aligned)."""
        if k.shape[1] != q.shape[1]:
            # Grouped-query attention: each k/v head serves q.heads / kv.heads query heads.
            repeat = q.shape[1] // k.shape[1]
            k = k.repeat_interleave(repeat, dim=1)
            v = v.repeat_interleave(repeat, dim=1)
        if self.attention == "naive":
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            elif self.causal:
                s = q.shape[-2]
                hidden = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)
                scores = scores.masked_fill(hidden, float("-inf"))
            probs = F.dropout(scores.softmax(dim=-1), p)
            return probs @ v
        if mask is not None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        flash = _flash_attn_func() if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) else None
        if flash is not None:
            # flash-attn takes (batch, seq, heads, head_dim).
            out = flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=p, causal=self.causal)
            return out.transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=self.causal)


class Attention(nn.Module):
    def __init__(self, cfg: WorkloadConfig, attention: str = "flash"):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        qkv_bias = cfg.qkv_bias if cfg.qkv_bias is not None else bool(cfg.bias)
        self.head_dim = d
        self.rope = cfg.position_embedding == "rope"
        self.wq = nn.Linear(h, cfg.num_heads * d, bias=qkv_bias)
        self.wk = nn.Linear(h, cfg.kv_heads * d, bias=qkv_bias)
        self.wv = nn.Linear(h, cfg.kv_heads * d, bias=qkv_bias)
        self.core = AttentionCore(bool(cfg.causal), DROPOUT_P if cfg.dropout else 0.0, attention)
        self.wo = nn.Linear(cfg.num_heads * d, h, bias=bool(cfg.bias))
        # Under context parallelism: the places of this rank's tokens in a sequence of num_positions.
        self.positions: torch.Tensor | None = None
        self.num_positions = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        # -1 heads: under tensor parallelism this rank holds num_heads / tp of them.
        q = self.wq(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        if self.rope:
            q, k = apply_rope(q, self.positions, self.num_positions), apply_rope(k, self.positions, self.num_positions)
        out = self.core(q, k, v)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, cfg: WorkloadConfig):
        super().__init__()
        h, f = cfg.hidden_size, cfg.ffn
        self.kind = cfg.mlp
        if cfg.mlp == "swiglu":
            # As workloads.transformer counts them: gate and up without bias, down with the model's bias.
            self.w1 = nn.Linear(h, f, bias=False)
            self.w3 = nn.Linear(h, f, bias=False)
        else:
            self.w1 = nn.Linear(h, f, bias=bool(cfg.bias))
        self.w2 = nn.Linear(f, h, bias=bool(cfg.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        act = F.gelu(self.w1(x), approximate="tanh") if self.kind == "gelu" else F.relu(self.w1(x))
        return self.w2(act)


class Block(nn.Module):
    """Pre-norm transformer block: x + drop(attn(norm(x))), then x + drop(mlp(norm(x)))."""

    def __init__(self, cfg: WorkloadConfig, attention: str = "flash"):
        super().__init__()
        self.attn_norm = _norm(cfg)
        self.attn = Attention(cfg, attention)
        self.mlp_norm = _norm(cfg)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(DROPOUT_P if cfg.dropout else 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x)))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class InputLayer(nn.Module):
    """Token embedding, learned positions when the model has them, dropout."""

    def __init__(self, cfg: WorkloadConfig):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.pos = nn.Embedding(cfg.position_rows, cfg.hidden_size) if cfg.position_embedding == "learned" else None
        self.dropout = nn.Dropout(DROPOUT_P if cfg.dropout else 0.0)
        self.positions: torch.Tensor | None = None  # the tokens' places under context parallelism

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok(tokens)
        if self.pos is not None:
            positions = (
                self.positions if self.positions is not None else torch.arange(tokens.shape[-1], device=tokens.device)
            )
            x = x + self.pos(positions)
        return self.dropout(x)


class OutputLayer(nn.Module):
    """Final norm and LM head (logits over the vocabulary)."""

    def __init__(self, cfg: WorkloadConfig):
        super().__init__()
        self.norm = _norm(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(x))


class CausalLM(nn.Module):
    """A decoder-only language model cut along `layer_kinds`: `embed`, `blocks`, `head`.

    A pipeline stage is this module with some of the three removed (set to None / blocks deleted); its
    forward then starts from hidden states or stops before the head.
    """

    def __init__(self, cfg: WorkloadConfig, attention: str = "flash"):
        super().__init__()
        check_executable(cfg)
        self.cfg = cfg
        self.embed: InputLayer | None = InputLayer(cfg)
        self.blocks = nn.ModuleDict({str(i): Block(cfg, attention) for i in range(cfg.num_layers)})
        self.head: OutputLayer | None = OutputLayer(cfg)
        if cfg.tied_embeddings:
            self.tie_weights()

    def tie_weights(self) -> None:
        """Share the token embedding with the LM head when the model ties them and holds both."""
        if self.cfg.tied_embeddings and self.embed is not None and self.head is not None:
            self.head.lm_head.weight = self.embed.tok.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            x = self.embed(x)
        for block in self.blocks.values():
            x = block(x)
        if self.head is not None:
            x = self.head(x)
        return x

    def layer_module_names(self) -> list[str]:
        """Module name of each entry of `layer_kinds(cfg)`, in order (`embed`, `blocks.0`, ..., `head`)."""
        return ["embed"] + [f"blocks.{i}" for i in range(self.cfg.num_layers)] + ["head"]


def build_model(cfg: WorkloadConfig, device: torch.device | str = "meta", attention: str = "flash") -> CausalLM:
    """The workload's module on `device` (default meta: shapes only, no memory).

    Raises:
        UserError: the family cannot be executed (supported: gpt, llama).
    """
    check_executable(cfg)
    assert len(layer_kinds(cfg)) == cfg.num_layers + 2
    with torch.device(device):
        return CausalLM(cfg, attention)


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over every token of the batch (computed in fp32)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(0, 1))


# ---- deterministic initialization ----------------------------------------------------------------
def canonical_name(name: str, cfg: WorkloadConfig) -> str:
    """The parameter's name in the plain model: wrapper prefixes removed, a tied head named as the
    embedding it shares (so a pipeline stage that holds its own copy starts from the same values)."""
    for wrapper in ("_checkpoint_wrapped_module.", "_fsdp_wrapped_module.", "module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    if cfg.tied_embeddings and name == "head.lm_head.weight":
        return "embed.tok.weight"
    return name


def full_init_tensor(
    name: str,
    shape: torch.Size | tuple[int, ...],
    cfg: WorkloadConfig,
    seed: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The initial value of the whole parameter `name` (canonical name), the same for any plan and device.

    Drawn on the CPU and then moved: CUDA's generator gives other numbers for the same seed, and a GPU
    run must start from the weights a CPU run (or a run on another GPU) starts from."""
    leaf = name.rsplit(".", 1)[-1]
    owner = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
    if "norm" in owner:
        return (torch.ones if leaf == "weight" else torch.zeros)(shape, device=device, dtype=dtype)
    if leaf == "bias":
        return torch.zeros(shape, device=device, dtype=dtype)
    std = INIT_STD / math.sqrt(2 * cfg.num_layers) if name.endswith(RESIDUAL_PROJECTIONS) else INIT_STD
    generator = torch.Generator()
    # crc32: a stable hash of the name (Python's hash() changes between processes).
    generator.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    out = torch.empty(shape, dtype=torch.float32)
    out.normal_(0.0, std, generator=generator)
    return out.to(device=device, dtype=dtype)


@torch.no_grad()
def init_weights(model: nn.Module, cfg: WorkloadConfig, seed: int) -> None:
    """Initialize a plain (unsharded, materialized) model in place, as `full_init_tensor` says."""
    for name, param in model.named_parameters():
        param.copy_(full_init_tensor(canonical_name(name, cfg), param.shape, cfg, seed, param.device, param.dtype))


# ---- synthetic data ------------------------------------------------------------------------------
class SyntheticTokens:
    """Deterministic token batches: step i's global batch depends only on (seed, i).

    A sequence is `seq_len + 1` random tokens; inputs are the first `seq_len`, targets the next token
    at each position. Never downloaded; the position in the "data set" is just the step number, so a
    resumed run sees exactly the batches an uninterrupted run would.
    """

    def __init__(self, cfg: WorkloadConfig, global_batch: int, seed: int):
        self.vocab_size = cfg.vocab_size
        self.seq_len = cfg.seq_len
        self.global_batch = global_batch
        self.seed = seed

    def batch(self, step: int, first: int = 0, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of sequences first..first+count-1 of step `step`'s global batch, on CPU."""
        generator = torch.Generator()
        generator.manual_seed(self.seed * 1_000_003 + step)
        tokens = torch.randint(0, self.vocab_size, (self.global_batch, self.seq_len + 1), generator=generator)
        count = self.global_batch - first if count is None else count
        tokens = tokens[first : first + count]
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


__all__ = [
    "EXECUTABLE_FAMILIES",
    "CausalLM",
    "SyntheticTokens",
    "build_model",
    "canonical_name",
    "check_executable",
    "full_init_tensor",
    "init_weights",
    "loss_fn",
]
