"""What the executor's tests share: a tiny GPT, the one-rank cluster options, and checks of a refusal."""

from __future__ import annotations

import re

from executor.job import Job
from simulator.plan import Plan, parse_shorthand
from tests.helpers import CliResult
from workloads import WorkloadConfig

TINY = dict(
    name="tiny-gpt", family="gpt", num_layers=4, hidden_size=64, num_heads=4, vocab_size=256, seq_len=32, dropout=False
)
ONE = ("--cluster", "cpu-local", "--devices-per-node", "1")


def mentions(text: str, fragment: str) -> bool:
    """`fragment` occurs in `text`, ignoring where the console wrapped lines."""
    return re.sub(r"\s+", "", fragment) in re.sub(r"\s+", "", text)


def refused(result: CliResult, *fragments: str) -> None:
    """`execute` refused with exit status 2, no traceback, and a message naming every fragment."""
    assert result.code == 2, f"exit status {result.code}; stderr:\n{result.err}"
    assert "Traceback" not in result.err
    for fragment in fragments:
        assert mentions(result.err, fragment), f"{fragment!r} not in: {result.err}"


# A GPT and a LLaMA small enough to train in a few seconds, and the batch every parallel plan sees.
GPT = WorkloadConfig(
    name="tiny-gpt", family="gpt", num_layers=4, hidden_size=64, num_heads=4, vocab_size=256, seq_len=32, dropout=False
)  # tied embeddings: the pipeline plans sum them across stages
LLAMA = WorkloadConfig(
    name="tiny-llama",
    family="llama",
    num_layers=4,
    hidden_size=64,
    ffn_hidden_size=96,
    num_heads=4,
    num_kv_heads=2,
    vocab_size=256,
    seq_len=32,
)
BATCH = "global_batch=8,dtype=fp32"
STEPS = 5


def job(plan: str | Plan, cfg: WorkloadConfig, devices: int, **kwargs) -> Job:
    """A job of `plan` (shorthand, with the shared batch) on `devices` CPU ranks, seed 0, no warm-up."""
    plan = plan if isinstance(plan, Plan) else parse_shorthand(f"{plan},{BATCH}")
    return Job(cfg, "cpu-local", None, devices, plan, steps=kwargs.pop("steps", STEPS), warmup=0, seed=0, **kwargs)
