"""Uneven batch splits in the executor (issue 5): data-parallel replicas of different speeds take different
shares of every micro-step (`batch_split`), and training still follows the single-process run, because each
replica's loss is weighted by its share before the data-parallel average."""

from __future__ import annotations

import pytest
import torch

from executor.job import Job
from executor.launch import run_jobs
from executor.runtime import _dp_indices
from simulator.plan import parse_shorthand
from workloads import WorkloadConfig

GPT = WorkloadConfig(
    name="split-gpt", family="gpt", num_layers=4, hidden_size=64, num_heads=4, vocab_size=256, seq_len=32, dropout=False
)
BASE = "global_batch=8,dtype=fp32,optimizer=sgd"


def _job(plan: str, ranks: int) -> Job:
    return Job(GPT, "cpu-local", None, ranks, parse_shorthand(plan), steps=5, warmup=0)


def test_indices_cover_the_batch_once_in_micro_step_order():
    split = (3, 1)
    first = _dp_indices(8, 2, 2, 0, split).tolist()
    second = _dp_indices(8, 2, 2, 1, split).tolist()
    assert first == [0, 1, 2, 4, 5, 6] and second == [3, 7]
    assert sorted(first + second) == list(range(8))
    # Without a split, the plain interleaving by micro_batch is unchanged.
    assert _dp_indices(8, 2, 2, 0).tolist() == [0, 1, 4, 5]


@pytest.fixture(scope="module")
def runs():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        (single,) = run_jobs([_job(f"micro_batch=8,{BASE}", 1)])
        two = run_jobs(
            [
                _job(f"dp=2,micro_batch=2,batch_split=3+1,{BASE}", 2),
                _job(f"dp=2,dp_type=zero3,micro_batch=2,batch_split=1+3,{BASE}", 2),
                _job(f"dp=2,micro_batch=2,{BASE}", 2),
            ]
        )
        (pipeline,) = run_jobs([_job(f"pp=2,dp=2,micro_batch=2,batch_split=3+1,{BASE}", 4)])
    return single, two + [pipeline]


def test_uneven_splits_train_like_one_process(runs):
    single, parallel = runs
    for result in parallel:
        assert result.losses == pytest.approx(single.losses, rel=1e-4)
    # The losses move (SGD steps), so equality is not the initial loss repeated.
    assert single.losses[0] != pytest.approx(single.losses[-1], rel=1e-3)


def test_share_weights_make_the_replica_average_the_full_batch_gradient():
    """The executor's weighting, checked on the gradients themselves: the plain mean over replicas of
    (scale x the gradient of each replica's mean loss) is the full batch's gradient; unweighted, it is not."""
    from executor.parallel.parallelize import replica_loss_scale
    from workloads.torch_models import build_model, init_weights, loss_fn

    torch.manual_seed(0)
    model = build_model(GPT, "cpu")
    init_weights(model, GPT, seed=0)
    tokens = torch.randint(0, GPT.vocab_size, (8, GPT.seq_len + 1))
    x, y = tokens[:, :-1], tokens[:, 1:]
    plan = parse_shorthand(f"dp=2,micro_batch=2,batch_split=3+1,{BASE}")

    def grad(rows, scale=1.0):
        model.zero_grad()
        (loss_fn(model(x[rows]), y[rows]) * scale).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    full = grad(list(range(8)))
    replicas = [_dp_indices(8, 2, 2, d, plan.batch_split).tolist() for d in range(2)]
    weighted = sum(grad(rows, replica_loss_scale(plan, d)) for d, rows in enumerate(replicas)) / 2
    unweighted = sum(grad(rows) for rows in replicas) / 2
    assert torch.allclose(weighted, full, rtol=1e-4, atol=1e-7)
    assert (unweighted - full).norm() > 1e-3 * full.norm()
