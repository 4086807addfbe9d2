"""The cross-entropy's backward temporaries (fp32 gradients of the log-softmax and of the logits) are part
of the output layer's backward peak: 8 bytes per logit without tensor parallelism; a vocabulary-parallel
loss writes the gradient into the softmax's buffer."""

from __future__ import annotations

import pytest

from hwmodel.catalog import load_cluster
from simulator.analytic import evaluate
from simulator.plan import parse_shorthand
from workloads.catalog import load_workload
from workloads.ops import ShardShape
from workloads.transformer import layer_profile

LLAMA = load_workload("tinyllama-1.1b")


def _output(seq_len: int, micro_batch: int = 1, tp: int = 1):
    shape = ShardShape(
        micro_batch=micro_batch,
        seq_len=seq_len,
        tp=tp,
        sequence_parallel=False,
        cp=1,
        ep=1,
        dtype_bytes=2,
        attention="flash",
    )
    return layer_profile(LLAMA.with_seq_len(seq_len), "head", shape)


def test_workspace_is_eight_bytes_per_logit():
    prof = _output(4096, micro_batch=2)
    assert prof.backward_workspace == pytest.approx(8 * 2 * 4096 * LLAMA.vocab_size)


@pytest.mark.parametrize("tp", [2, 4])
def test_vocabulary_parallel_losses_need_no_workspace(tp):
    assert _output(4096, micro_batch=2, tp=tp).backward_workspace == 0.0


def test_blocks_have_no_workspace():
    shape = ShardShape(
        micro_batch=1, seq_len=2048, tp=1, sequence_parallel=False, cp=1, ep=1, dtype_bytes=2, attention="flash"
    )
    assert layer_profile(LLAMA, "decoder", shape).backward_workspace == 0.0


@pytest.mark.parametrize("seq_len", [4096, 8192, 16384, 32768])
def test_peak_memory_with_full_recompute_grows_by_at_least_the_logits_share(seq_len):
    # Doubling the tokens adds at least 12 bytes per new logit (4 kept + 8 workspace) to the peak, under the
    # stack whose loss is F.cross_entropy on fp32 logits (hetplan's executor, where this was measured).
    cluster = load_cluster("dgx-h100", None, 1)
    plan = parse_shorthand("micro_batch=1,global_batch=1,dtype=bf16,recompute=full,stack=hetplan")
    short = evaluate(plan, LLAMA.with_seq_len(seq_len), cluster).peak_memory_bytes
    long = evaluate(plan, LLAMA.with_seq_len(2 * seq_len), cluster).peak_memory_bytes
    assert long - short >= 12 * seq_len * LLAMA.vocab_size


@pytest.mark.parametrize("tp", [1, 2])
def test_a_fused_loss_keeps_and_makes_less_than_the_pytorch_one(tp):
    # flash-attn's fused cross-entropy (llm-foundry's) keeps the bf16 logits and writes one bf16 gradient:
    # 2 + 2 bytes per logit against 4 + 8 (tp=1) for F.cross_entropy on fp32 logits.
    def head(loss: str):
        shape = ShardShape(micro_batch=2, seq_len=4096, tp=tp, dtype_bytes=2, attention="flash", cross_entropy=loss)
        return layer_profile(LLAMA.with_seq_len(4096), "head", shape)

    fused, plain = head("fused"), head("pytorch")
    logits = 2 * 4096 * LLAMA.vocab_size / tp
    assert fused.backward_workspace == pytest.approx(2 * logits)
    assert plain.saved_bytes["none"] - fused.saved_bytes["none"] == pytest.approx(2 * logits - 4 * 2 * 4096)
