"""`execute` on CUDA (NCCL), skipped without a GPU: run by scripts/gpu_check.sh on a GPU machine.

The cluster is a DGX H100 node cut to the GPUs present (`--devices-per-node`): the runs are real, only
the MFU denominator assumes H100 peaks whatever the GPU is.
"""

from __future__ import annotations

import math

import pytest
import torch

from executor.job import Job
from executor.launch import run_jobs
from simulator.plan import parse_shorthand
from workloads import WorkloadConfig

pytestmark = pytest.mark.gpu

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_two = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")

GPT = WorkloadConfig(
    name="small-gpt",
    family="gpt",
    num_layers=4,
    hidden_size=256,
    num_heads=8,
    vocab_size=1024,
    seq_len=128,
    dropout=False,
)
LLAMA = WorkloadConfig(
    name="small-llama",
    family="llama",
    num_layers=4,
    hidden_size=256,
    ffn_hidden_size=512,
    num_heads=8,
    num_kv_heads=2,
    vocab_size=1024,
    seq_len=128,
)


def gpu_job(plan: str, devices: int, cfg: WorkloadConfig = GPT, **kwargs) -> Job:
    return Job(
        cfg,
        "dgx-h100",
        None,
        devices,
        parse_shorthand(plan),
        steps=kwargs.pop("steps", 5),
        warmup=1,
        device_type="cuda",
        **kwargs,
    )


@needs_cuda
def test_bf16_on_one_gpu_measures_allocator_memory():
    (result,) = run_jobs([gpu_job("micro_batch=4,global_batch=8,dtype=bf16", 1, LLAMA)])
    assert all(math.isfinite(v) for v in result.losses)
    mem = result.memory[0]
    assert mem["peak"] >= mem["weights"] + mem["gradients"] + mem["optimizer"] > 0
    assert mem["buffers"] >= 0 and mem["activations"] > 0
    assert result.device_name == torch.cuda.get_device_name(0)


@needs_cuda
def test_fp32_gpu_run_matches_the_cpu_run():
    plan = "micro_batch=2,global_batch=8,dtype=fp32"
    (gpu,) = run_jobs([gpu_job(plan, 1)])
    (cpu,) = run_jobs([Job(GPT, "cpu-local", None, 1, parse_shorthand(plan), steps=5, warmup=1)])
    # Different kernels (and TF32 where PyTorch allows it), same model, data and weights.
    assert gpu.losses == pytest.approx(cpu.losses, rel=1e-3)


@needs_two
@pytest.mark.parametrize("plan", ["dp=2,dp_type=zero3", "tp=2,sequence_parallel=true", "pp=2", "cp=2"])
def test_nccl_plans_match_one_gpu(plan):
    base = "micro_batch=2,global_batch=8,dtype=fp32"
    (single,) = run_jobs([gpu_job(base, 1)])
    (parallel,) = run_jobs([gpu_job(f"{plan},{base}", 2)])
    assert parallel.losses == pytest.approx(single.losses, rel=1e-4)


@needs_cuda
def test_flash_attention_agrees_with_the_naive_one():
    from workloads.torch_models import AttentionCore

    torch.manual_seed(0)
    q = torch.randn(2, 8, 256, 64, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn_like(q[:, :2]), torch.randn_like(q[:, :2])
    flash = AttentionCore(causal=True, dropout=0.0, attention="flash")(q, k, v)
    naive = AttentionCore(causal=True, dropout=0.0, attention="naive")(q.float(), k.float(), v.float())
    assert torch.allclose(flash.float(), naive, atol=3e-2)
