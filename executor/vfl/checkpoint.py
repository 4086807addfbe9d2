"""Per-party checkpoints of a VFL run: `DIR/<party>/round-<N>.pt`, written atomically, the newest few kept.

A checkpoint holds the party's models, optimizer, workset (with its cached statistics), clocks and the AUCs
so far. Each party writes only its own; on resume the parties agree (in HELLO) on the newest round both have,
so a party killed while the other was saving still resumes cleanly.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from hwmodel.errors import UserError

KEEP = 3
_NAME = re.compile(r"^round-(\d{8})\.pt$")


def _folder(root: str | Path, party: str) -> Path:
    return Path(root) / party


def available(root: str | Path | None, party: str) -> list[int]:
    """Rounds this party has complete checkpoints of, oldest first."""
    if root is None or not _folder(root, party).is_dir():
        return []
    return sorted(int(m.group(1)) for p in _folder(root, party).iterdir() if (m := _NAME.match(p.name)))


def save(root: str | Path, party: str, round_done: int, state: dict) -> Path:
    import torch

    folder = _folder(root, party)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"round-{round_done:08d}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a checkpoint is either whole or absent
    for old in available(root, party)[:-KEEP]:
        (folder / f"round-{old:08d}.pt").unlink(missing_ok=True)
    return path


def load(root: str | Path, party: str, round_done: int) -> dict:
    import torch

    path = _folder(root, party) / f"round-{round_done:08d}.pt"
    try:
        # Our own file (it holds numpy index arrays and the RNG state besides tensors).
        return torch.load(path, weights_only=False)
    except (OSError, RuntimeError, EOFError) as exc:
        raise UserError(f"cannot read checkpoint {path}: {exc}") from exc


def has_any(root: str | Path, party: str) -> bool:
    return bool(available(root, party))
