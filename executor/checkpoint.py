"""Checkpoints with `torch.distributed.checkpoint` (DCP): model, optimizer, step, data position.

Layout: `DIR/step-NNNNNN/` is one DCP checkpoint (its `.metadata` file is written last, so a folder
without it is incomplete and ignored) plus `hetplan.json`, the job's fingerprint (workload, bound
plan, world size, seed): a checkpoint resumes only the job that wrote it.

What is saved, per pipeline chunk (key `chunks.<stage>`): the model's state dict and the optimizer's,
both through `torch.distributed.checkpoint.state_dict` (FQN keys; DTensor shards for tensor parallel
and FSDP2, each saved once). A ZeroRedundancyOptimizer's state is the shard each rank owns, saved under
a per-rank key. `progress` holds the number of finished iterations (the data position: batches are a
function of the iteration) and the seed.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.optim import ZeroRedundancyOptimizer

from executor.parallel.parallelize import RankModel
from hwmodel.errors import UserError

FINGERPRINT = "hetplan.json"
_STEP_DIR = re.compile(r"step-(\d+)$")


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step-{step:06d}"


def completed(root: str | Path) -> list[tuple[int, Path]]:
    """(iterations done, folder) of the complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / ".metadata").exists() and (child / FINGERPRINT).exists():
            found.append((int(match.group(1)), child))
    return sorted(found)


def check_resumable(root: str | Path, fingerprint: dict) -> tuple[int, Path]:
    """The latest checkpoint under `root` if it was written by this job; else a UserError saying why."""
    found = completed(root)
    if not found:
        raise UserError(f"--resume: {root} holds no complete checkpoint (step-NNNNNN folders written by execute)")
    step, path = found[-1]
    saved = json.loads((path / FINGERPRINT).read_text(encoding="utf-8"))
    for key in ("workload", "plan", "world_size", "seed"):
        if saved.get(key) != fingerprint[key]:
            raise UserError(
                f"--resume: the checkpoint {path} was written by another job ({key} differs: saved "
                f"{json.dumps(saved.get(key))[:200]}, now {json.dumps(fingerprint[key])[:200]}); resume with the same "
                "workload, plan, world size and seed"
            )
    return step, path


@contextmanager
def _single_process_quiet() -> Iterator[None]:
    """One process and no process group is DCP's single-process mode, on purpose: no warning about it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _zero1_init(optimizer) -> None:
    """Create a ZeroRedundancyOptimizer shard's state (zero gradients, lr 0) so DCP can load into it."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    _init_optim_state(optimizer.optim)


def _state(rank_model: RankModel, for_load: bool) -> dict:
    zero1 = rank_model.dp_type == "zero1" and rank_model.layout.dp > 1
    rank = rank_model.layout.rank
    chunks = {}
    for chunk, opt in zip(rank_model.chunks, rank_model.optimizers):
        entry: dict[str, Any] = {"model": get_model_state_dict(chunk.module)}
        if zero1:
            assert isinstance(opt, ZeroRedundancyOptimizer)
            if for_load:
                _zero1_init(opt)
            entry[f"zero1_shard_rank{rank}"] = opt.optim.state_dict()
        else:
            entry["optim"] = get_optimizer_state_dict(chunk.module, opt)
        chunks[str(chunk.stage_index)] = entry
    return {"chunks": chunks, "progress": {"step": torch.zeros((), dtype=torch.int64)}}


def save(job, rank_model: RankModel, step: int) -> Path:
    """Save after `step` finished iterations (collective: every rank calls it)."""
    path = step_dir(job.checkpoint_dir, step)
    state = _state(rank_model, for_load=False)
    state["progress"]["step"] = torch.tensor(step, dtype=torch.int64)
    with _single_process_quiet():
        dcp.save(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    if rank_model.layout.world_size > 1:
        dist.barrier()
    if rank_model.layout.rank == 0:
        # Written after every rank finished: its presence marks the checkpoint complete.
        (path / FINGERPRINT).write_text(json.dumps(job.fingerprint(), indent=1), encoding="utf-8")
    return path


def load_latest(job, rank_model: RankModel) -> int:
    """Load the latest checkpoint into the rank model; returns the iterations it had finished."""
    step, path = check_resumable(job.checkpoint_dir, job.fingerprint())
    state = _state(rank_model, for_load=True)
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    zero1 = rank_model.dp_type == "zero1" and rank_model.layout.dp > 1
    rank = rank_model.layout.rank
    for chunk, opt in zip(rank_model.chunks, rank_model.optimizers):
        entry = state["chunks"][str(chunk.stage_index)]
        set_model_state_dict(chunk.module, entry["model"])
        if zero1:
            assert isinstance(opt, ZeroRedundancyOptimizer)
            opt.optim.load_state_dict(entry[f"zero1_shard_rank{rank}"])
        else:
            set_optimizer_state_dict(chunk.module, opt, entry["optim"])
    loaded = int(state["progress"]["step"])
    assert loaded == step, (loaded, step)
    return loaded
