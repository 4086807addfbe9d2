"""The plan's dtypes as torch dtypes, and the FSDP2 mixed-precision policy both data-parallel paths use."""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def mixed_precision_policy(dtype: str, grad_reduce_dtype: str | None):
    """FSDP2 keeps fp32 master weights; `bf16`/`fp16` compute in that dtype, gradients reduce in fp32 unless
    the plan says otherwise."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(
        param_dtype=DTYPES[dtype] if dtype != "fp32" else None, reduce_dtype=DTYPES[grad_reduce_dtype or "fp32"]
    )
