"""Checkpoints with `torch.distributed.checkpoint` (DCP): model, optimizer, step, data position.

Layout: `DIR/step-NNNNNN/` is one DCP checkpoint plus `hetplan.json`, the job's fingerprint (workload,
bound plan, world size, seed: a checkpoint resumes only the job that wrote it), plus `manifest.json`,
written LAST: the size and XXH3-64 checksum of every other file of the step. A step is complete only when its
manifest is there and every file it lists has that size and checksum (`verify`); a folder without one is
an interrupted save and is skipped.

Crash safety follows etcd's and Orbax's discipline: DCP fsyncs its files; the fingerprint and the
manifest are each written to a temporary file, fsynced, renamed into place and the folder fsynced, so a
crash leaves either no manifest or a whole one. `--resume` verifies before loading: a corrupt newest step
is reported (step and file) and the newest step that verifies is resumed instead. `lock` takes an
exclusive flock on the checkpoint folder so two runs cannot write into one. `prune` keeps the newest N.

Why XXH3-64 (the xxhash package): on this machine it hashes 10-11 GB/s per core against 2.3 GB/s for
zlib.crc32, 1.2 GB/s for sha256 and 0.95 GB/s for blake2b; with CRC-32 the manifest cost about 21% of a
125M-parameter save, over the 5% budget (benchmarks/checkpoint_checksum.py). It is a 64-bit non-cryptographic
hash whose collisions on changed data are about 2^-64 likely, and the size is checked too (any truncation).
One checksum per 64 MiB block, the blocks hashed in parallel threads (xxhash releases the GIL). It guards
against accidents
(torn writes, bit rot, a truncated copy), not an attacker.

What is saved, per pipeline chunk (key `chunks.<stage>`): the model's state dict and the optimizer's,
both through `torch.distributed.checkpoint.state_dict` (FQN keys; DTensor shards for tensor parallel
and FSDP2, each saved once). A ZeroRedundancyOptimizer's state is the shard each rank owns, saved under
a per-rank key. `progress` holds the number of finished iterations (the data position: batches are a
function of the iteration) and the seed.
"""

from __future__ import annotations

import fcntl
import json
import mmap
import os
import re
import shutil
import signal
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import xxhash
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
MANIFEST = "manifest.json"
LOCK = ".hetplan.lock"
HASH = "xxh3_64"
_STEP_DIR = re.compile(r"step-(\d+)$")
BLOCK = 1 << 26  # one checksum per 64 MiB of a file: the blocks of one shard are hashed in parallel


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step-{step:06d}"


def step_folders(root: str | Path) -> list[tuple[int, Path]]:
    """(iterations done, folder) of every step folder under `root`, complete or not, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def completed(root: str | Path) -> list[tuple[int, Path]]:
    """(iterations done, folder) of the step folders under `root` that have a manifest, oldest first
    (not verified: see `verify`)."""
    return [(step, path) for step, path in step_folders(root) if (path / MANIFEST).exists()]


def _block_checksum(path: Path, offset: int) -> int:
    # Hashed straight from the page cache through mmap: reading into a buffer first cost as much as hashing.
    size = path.stat().st_size
    length = min(BLOCK, size - offset)
    if length <= 0:
        return xxhash.xxh3_64_intdigest(b"")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), length, access=mmap.ACCESS_READ, offset=offset) as view:
        return xxhash.xxh3_64_intdigest(view)


def file_checksum(path: Path) -> list[int]:
    """XXH3-64 of each BLOCK of a file, the blocks hashed in parallel threads (xxhash releases the GIL while
    it hashes): one checksum per file would keep a large shard on one core."""
    offsets = range(0, max(1, path.stat().st_size), BLOCK)
    with ThreadPoolExecutor(max_workers=min(len(offsets), os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda offset: _block_checksum(path, offset), offsets))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so that a crash leaves the old file or the whole new one, never a part:
    temporary file, fsync, rename, fsync of the folder."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_manifest(path: Path, step: int) -> dict:
    """Checksum every file of the step folder `path` and write its manifest (last, atomically)."""
    files = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        if rel == MANIFEST or rel.startswith(f".{MANIFEST}.tmp"):
            continue
        files[rel] = {"size": file.stat().st_size, HASH: file_checksum(file)}
    manifest = {"format": 1, "step": step, "hash": HASH, "block": BLOCK, "files": files}
    write_atomic(path / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def verify(path: Path) -> str | None:
    """None if the step folder `path` is complete and intact; else one line saying what is wrong."""
    name = path.name
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return f"{name}: no {MANIFEST} (an interrupted save)"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
        assert isinstance(files, dict) and manifest.get("hash") == HASH and manifest.get("block") == BLOCK
    except (ValueError, KeyError, TypeError, AssertionError, UnicodeDecodeError):
        return f"{name}: {MANIFEST} is unreadable (truncated or not a hetplan manifest)"
    if FINGERPRINT not in files or ".metadata" not in files:
        return f"{name}: {MANIFEST} does not list {FINGERPRINT} and .metadata"
    for rel, entry in files.items():
        file = path / rel
        if not file.is_file():
            return f"{name}: file {rel} is missing"
        size = file.stat().st_size
        if size != entry.get("size"):
            return f"{name}: file {rel} has {size} bytes, the manifest says {entry.get('size')} (truncated or replaced)"
        if file_checksum(file) != entry.get(HASH):
            return f"{name}: file {rel} fails its {HASH} checksum (its bytes changed after the save)"
    return None


def latest_verified(root: str | Path) -> tuple[tuple[int, Path] | None, list[str]]:
    """The newest step folder under `root` that verifies, and one line for each newer one that does not."""
    problems: list[str] = []
    for step, path in reversed(step_folders(root)):
        problem = verify(path)
        if problem is None:
            return (step, path), problems
        problems.append(problem)
    return None, problems


def check_resumable(root: str | Path, fingerprint: dict) -> tuple[int, Path, list[str]]:
    """The newest verified checkpoint under `root` if this job wrote it, and the newer steps skipped (one
    line each); else a UserError saying why."""
    found, problems = latest_verified(root)
    if found is None:
        why = f" ({'; '.join(problems)})" if problems else ""
        raise UserError(
            f"--resume: {root} holds no complete checkpoint that verifies (step-NNNNNN folders written by execute)"
            + why
        )
    step, path = found
    saved = json.loads((path / FINGERPRINT).read_text(encoding="utf-8"))
    for key in ("workload", "plan", "world_size", "seed"):
        if saved.get(key) != fingerprint[key]:
            raise UserError(
                f"--resume: the checkpoint {path} was written by another job ({key} differs: saved "
                f"{json.dumps(saved.get(key))[:200]}, now {json.dumps(fingerprint[key])[:200]}); resume with the same "
                "workload, plan, world size and seed"
            )
    return step, path, problems


_held: dict[str, IO[str]] = {}


def lock(root: str | Path) -> None:
    """Take an exclusive flock on the checkpoint folder for the life of this process; a UserError naming
    the holder's pid if another process has it. (The kernel drops the lock when the holder dies.)"""
    root = Path(root)
    key = str(root.resolve())
    if key in _held:
        return
    root.mkdir(parents=True, exist_ok=True)
    f = open(root / LOCK, "a+", encoding="utf-8")  # noqa: SIM115 (held open: the lock lives with the file)
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise UserError(
            f"--checkpoint-dir {root} is in use by another run (pid {holder}); wait for it to end or choose "
            "another folder"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    _held[key] = f


def prune(root: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete steps (those with a manifest) and the interrupted saves
    older than them; returns what was deleted. Called right after a save, whose step is the newest kept."""
    folders = step_folders(root)
    complete = [(step, path) for step, path in folders if (path / MANIFEST).exists()]
    if len(complete) <= keep_last:
        return []
    oldest_kept = complete[-keep_last][0]
    deleted = []
    for step, path in folders:
        if step < oldest_kept:
            shutil.rmtree(path, ignore_errors=True)
            deleted.append(path)
    return deleted


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


# Fault drill (benchmarks/chaos.py): HETPLAN_FAIL_IN_SAVE=STEP:PHASE SIGKILLs rank 0 inside the save of STEP,
# after its data (PHASE data) or after its fingerprint (PHASE fingerprint), before the manifest.
FAIL_IN_SAVE_ENV = "HETPLAN_FAIL_IN_SAVE"


def _maybe_die_in_save(step: int, phase: str) -> None:
    if os.environ.get(FAIL_IN_SAVE_ENV) == f"{step}:{phase}":
        os.kill(os.getpid(), signal.SIGKILL)


def save(job, rank_model: RankModel, step: int) -> Path:
    """Save after `step` finished iterations (collective: every rank calls it)."""
    path = step_dir(job.checkpoint_dir, step)
    rank, world = rank_model.layout.rank, rank_model.layout.world_size
    if rank == 0 and path.exists():
        # A step folder left by an earlier run (interrupted or corrupt, which is why this run is redoing the
        # step): start it afresh so no stale file or manifest survives into the new one.
        shutil.rmtree(path)
    if world > 1:
        dist.barrier()
    state = _state(rank_model, for_load=False)
    state["progress"]["step"] = torch.tensor(step, dtype=torch.int64)
    with _single_process_quiet():
        dcp.save(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    if world > 1:
        dist.barrier()
    if rank == 0:
        # After every rank finished: the fingerprint, then the manifest over all files, last.
        _maybe_die_in_save(step, "data")
        write_atomic(path / FINGERPRINT, json.dumps(job.fingerprint(), indent=1))
        _maybe_die_in_save(step, "fingerprint")
        write_manifest(path, step)
        keep = getattr(job, "keep_last", None)
        if keep:
            prune(job.checkpoint_dir, keep)
    return path


def load_latest(job, rank_model: RankModel) -> int:
    """Load the latest checkpoint into the rank model; returns the iterations it had finished."""
    step, path, _ = check_resumable(job.checkpoint_dir, job.fingerprint())
    state = _state(rank_model, for_load=True)
    try:
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    except Exception as exc:  # a file that verified yet does not load: one line, not torch's nested traceback
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise UserError(f"--resume: {path} does not load ({type(exc).__name__}: {first})") from None
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
