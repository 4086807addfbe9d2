"""Definitions shared by the simulator, the executor and validation. Defined once, used everywhere.

Model FLOPs per sample:
    3 x the forward FLOPs of every matmul of the model (including the output layer) plus attention,
    4 * s^2 * h per self-attention layer forward (scores and context), halved when the attention is
    causal, and no recomputation. (3 = forward + backward, backward being twice forward.)

    Megatron-LM, PaLM and llm-foundry count causal attention in full. We count the half a causal mask
    leaves, because that is the work the model needs and what flash attention executes (FlashAttention's
    own benchmarks count it so too); with it MFU can never exceed 1. At long sequences our MFU therefore
    reads lower than theirs for the same run: Report.mfu_causal_in_full gives the same run in their
    convention (it can exceed 1 at long sequences), for comparing with figures published that way.

Hardware FLOPs per sample:
    model FLOPs plus the forward FLOPs that activation recomputation repeats (the whole block for
    `full`, the attention core for `selective`).

    MFU = model FLOPs per iteration / (iteration time * sum of the devices' dense matrix peaks)
    HFU = hardware FLOPs per iteration / (iteration time * sum of the devices' dense matrix peaks)

The peak is the dense tensor-core peak of each device for the plan's dtype (312 TFLOP/s bf16 for an
A100, 989 for an H100 SXM). Tokens per second count the tokens of the samples trained per second
(decoder tokens for encoder-decoder models, patches + 1 for ViT).
"""

from __future__ import annotations


def mfu(model_flops_per_iteration: float, iteration_time_s: float, peak_flops_total: float) -> float:
    """Model FLOPs utilization, in (0, 1] for any physically possible run."""
    return model_flops_per_iteration / (iteration_time_s * peak_flops_total)


def hfu(hardware_flops_per_iteration: float, iteration_time_s: float, peak_flops_total: float) -> float:
    """Hardware FLOPs utilization (counts recomputation)."""
    return hardware_flops_per_iteration / (iteration_time_s * peak_flops_total)


def tokens_per_second(samples_per_iteration: float, tokens_per_sample: float, iteration_time_s: float) -> float:
    return samples_per_iteration * tokens_per_sample / iteration_time_s
