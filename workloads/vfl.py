"""Two-party vertical federated wide-and-deep workload (`vfl-wdl`), in the style of CELU-VFL's WDL on Criteo.

The samples are split by feature between two organizations:

    passive party   categorical fields, hashed into per-field buckets -> embeddings (concatenated)
                    -> bottom MLP (`passive_mlp_widths`, ReLU) -> linear to `interface_dim` (256) = Z_B
    active party    dense fields -> bottom MLP (`active_mlp_widths`, ReLU) -> linear to `active_output_dim` = Z_A;
                    the labels; the top model: concat(Z_B, Z_A) -> `top_mlp_widths` (ReLU) -> one logit

Each training step the passive party sends Z_B (batch x interface_dim float32) to the active party and gets
dL/dZ_B (the same shape) back; nothing else about a sample crosses between them.

What the simulator reads (all per batch of `batch` samples, SI units, FLOPs counted as 2 per multiply-add):

- `passive_forward_flops`, `passive_backward_flops`, `active_forward_flops`, `active_backward_flops`
  (active = its bottom model + the top model); backward = grad of inputs + grad of weights = 2 x forward
  for every linear layer (the first layer of each party needs no input grad, and is counted without it);
- `optimizer_flops` per party and update (Adam: ~12 FLOPs per parameter; the embedding table is dense);
- `local_update_flops` per party: one cached (CELU-VFL / FedBCD) update. Active: forward + backward of its
  bottom and top on the cached Z_B, plus (when instance weighting is on) one more backward of the top alone
  to get the fresh dL/dZ_B that the weights compare with the cached one. Passive: forward + backward of its
  bottom (the fresh Z_B is what the weights compare with the cached one);
- `activation_bytes` (passive -> active) and `gradient_bytes` (active -> passive) per batch, and
  `batches_per_epoch` (the last partial batch is dropped so every message has the agreed shape).

What the executor reads: `passive_bottom_model`, `active_bottom_model`, `top_model` (torch modules, seeded),
`passive_features` (the passive party's data: only categorical fields), `active_features_and_labels` (the
active party's: dense fields and labels) and `batch_indices` (the shared sample order of each epoch; the
parties are assumed to have aligned sample ids beforehand, as VFL does with private set intersection).

Synthetic data: a label's logit is the sum of a passive part (a weight per (field, bucket) plus a
cross-field interaction) and an active part (linear plus a pairwise product of dense fields), so neither
party alone can reach the AUC that both reach together, and AUC measures learning.

Modes and counting, as the executor (`executor/vfl/`) runs them and `Plan.federated` states them
(`mode`, `workset` W, `local_updates` R): R counts every update a batch's exchanged statistics feed, the
fresh one when they arrive included, so W=1, R=1 is vanilla VFL. FedBCD makes the R-1 extra updates on the
latest batch in turn with the network; CELU-VFL makes them from the workset of W batches in a background
thread while the main loop waits on the network (a new batch waits for room in the workset, so when local
compute is slower than the WAN the rounds slow down to it). Measured epoch times and AUC curves through a
shaped WAN: `benchmarks/vfl_wan.py` -> `benchmarks/results/vfl_measured.json` (format in that script).

`load_vfl_workload("vfl-wdl")` resolves the catalog name; a YAML/JSON file with `family: vfl-wdl` works too.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from hwmodel.errors import SpecError, UnknownNameError
from hwmodel.loading import read_mapping, validate

BYTES_PER_FLOAT32 = 4
ADAM_FLOPS_PER_PARAMETER = 12  # two moment updates, bias corrections, sqrt, division, the step itself
CROSS_GROUPS = 8  # bucket groups of the synthetic cross-field interaction


class VflWorkloadConfig(BaseModel):
    """A two-party vertical federated wide-and-deep job. Frozen and hashable."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "vfl-wdl"
    family: Literal["vfl-wdl"] = "vfl-wdl"
    description: str = (
        "two-party wide-and-deep (Criteo-like): categorical fields at the passive party, dense fields and labels "
        "at the active party"
    )
    # data
    num_samples: int = Field(200_000, gt=0, description="training samples")
    num_test_samples: int = Field(8_192, gt=0, description="held-out samples for AUC")
    batch_size: int = Field(512, gt=0, description="samples per training batch (both parties)")
    seed: int = Field(0, description="seed of the synthetic data and the weights")
    # passive party
    passive_num_fields: int = Field(26, gt=0, description="categorical fields (Criteo has 26)")
    passive_hash_buckets: int = Field(100, gt=0, description="hash buckets per categorical field")
    passive_embedding_dim: int = Field(16, gt=0)
    passive_mlp_widths: tuple[int, ...] = (256,)
    interface_dim: int = Field(256, gt=0, description="width of Z_B, the passive output sent each step")
    # active party
    active_num_dense: int = Field(13, gt=0, description="dense fields (Criteo has 13)")
    active_mlp_widths: tuple[int, ...] = (64,)
    active_output_dim: int = Field(64, gt=0)
    top_mlp_widths: tuple[int, ...] = (128,)
    # training recipe (same for every mode, so modes compare fairly)
    learning_rate: float = Field(3e-4, gt=0, description="Adam learning rate of both parties")
    # signal strengths of the synthetic labels
    passive_signal: float = Field(1.0, ge=0, description="std of the passive part of the label logit")
    active_signal: float = Field(1.0, ge=0, description="std of the active part of the label logit")
    click_rate: float = Field(0.25, gt=0, lt=1, description="approximate fraction of positive labels")
    source: str = ""

    @model_validator(mode="after")
    def _sizes(self) -> VflWorkloadConfig:
        if self.batch_size > self.num_samples:
            raise ValueError(f"batch_size {self.batch_size} exceeds num_samples {self.num_samples}")
        if any(w <= 0 for w in (*self.passive_mlp_widths, *self.active_mlp_widths, *self.top_mlp_widths)):
            raise ValueError("MLP widths must be positive integers")
        return self

    def fingerprint(self) -> str:
        """A short hash of everything that shapes the data and the models (both parties must agree on it)."""
        text = json.dumps(self.model_dump(mode="json", exclude={"description", "source"}), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


CATALOG: dict[str, VflWorkloadConfig] = {
    "vfl-wdl": VflWorkloadConfig(),
    # A few seconds per epoch even on a loaded CPU: for tests and smoke runs.
    "vfl-wdl-tiny": VflWorkloadConfig(
        name="vfl-wdl-tiny",
        num_samples=4096,
        num_test_samples=1024,
        batch_size=128,
        passive_num_fields=8,
        passive_hash_buckets=50,
        passive_embedding_dim=4,
        passive_mlp_widths=(32,),
        interface_dim=16,
        active_num_dense=4,
        active_mlp_widths=(16,),
        active_output_dim=8,
        top_mlp_widths=(16,),
        learning_rate=3e-3,
        description="tiny vfl-wdl for tests",
    ),
}


def vfl_workload_names() -> list[str]:
    return sorted(CATALOG)


def is_vfl_workload(name_or_path: str) -> bool:
    """Whether `name_or_path` names a VFL workload (catalog name, or a file with `family: vfl-wdl`)."""
    if name_or_path in CATALOG:
        return True
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml", ".json") and path.is_file():
        try:
            return read_mapping(path).get("family") == "vfl-wdl"
        except Exception:  # an unreadable file is for the loader to report
            return False
    return False


def load_vfl_workload(name_or_path: str, **overrides) -> VflWorkloadConfig:
    """A VFL workload by catalog name or file path (`family: vfl-wdl`), with optional field overrides."""
    if name_or_path.endswith((".yaml", ".yml", ".json")) or os.sep in name_or_path:
        path = Path(name_or_path)
        if not path.is_file():
            raise SpecError(f"workload file {path} does not exist")
        data = read_mapping(path)
        data.setdefault("name", path.stem)
        cfg = validate(VflWorkloadConfig, data, str(path))
    else:
        if name_or_path not in CATALOG:
            raise UnknownNameError("VFL workload", name_or_path, CATALOG)
        cfg = CATALOG[name_or_path]
    if overrides:
        cfg = validate(VflWorkloadConfig, {**cfg.model_dump(), **overrides}, f"{cfg.name} with overrides")
    return cfg


# ----------------------------------------------------------------------------------------------------------
# Sizes the simulator reads


def _mlp_dims(inp: int, widths: tuple[int, ...], out: int) -> list[tuple[int, int]]:
    dims, prev = [], inp
    for w in (*widths, out):
        dims.append((prev, w))
        prev = w
    return dims


def passive_dims(cfg: VflWorkloadConfig) -> list[tuple[int, int]]:
    return _mlp_dims(cfg.passive_num_fields * cfg.passive_embedding_dim, cfg.passive_mlp_widths, cfg.interface_dim)


def active_dims(cfg: VflWorkloadConfig) -> list[tuple[int, int]]:
    return _mlp_dims(cfg.active_num_dense, cfg.active_mlp_widths, cfg.active_output_dim)


def top_dims(cfg: VflWorkloadConfig) -> list[tuple[int, int]]:
    return _mlp_dims(cfg.interface_dim + cfg.active_output_dim, cfg.top_mlp_widths, 1)


def _linear_flops(dims: list[tuple[int, int]], batch: int) -> float:
    return float(sum(2 * batch * i * o for i, o in dims))


def _backward_flops(dims: list[tuple[int, int]], batch: int, first_needs_input_grad: bool) -> float:
    fwd = [2.0 * batch * i * o for i, o in dims]
    total = 2 * sum(fwd)
    return total if first_needs_input_grad else total - fwd[0]


def passive_forward_flops(cfg: VflWorkloadConfig, batch: int | None = None) -> float:
    """Embedding gather (no FLOPs) + bottom MLP forward of one batch at the passive party."""
    return _linear_flops(passive_dims(cfg), batch or cfg.batch_size)


def passive_backward_flops(cfg: VflWorkloadConfig, batch: int | None = None) -> float:
    """Bottom MLP backward (no input grad below the first layer) + the embedding scatter-add."""
    b = batch or cfg.batch_size
    return _backward_flops(passive_dims(cfg), b, False) + float(b * cfg.passive_num_fields * cfg.passive_embedding_dim)


def active_forward_flops(cfg: VflWorkloadConfig, batch: int | None = None) -> float:
    """Active bottom MLP + top model forward (and the loss, negligible) of one batch."""
    b = batch or cfg.batch_size
    return _linear_flops(active_dims(cfg), b) + _linear_flops(top_dims(cfg), b)


def active_backward_flops(cfg: VflWorkloadConfig, batch: int | None = None) -> float:
    """Top backward (with the input grad: dL/dZ_B is what is sent back) + active bottom backward."""
    b = batch or cfg.batch_size
    return _backward_flops(top_dims(cfg), b, True) + _backward_flops(active_dims(cfg), b, False)


def passive_parameter_count(cfg: VflWorkloadConfig) -> int:
    table = cfg.passive_num_fields * cfg.passive_hash_buckets * cfg.passive_embedding_dim
    return table + sum(i * o + o for i, o in passive_dims(cfg))


def active_parameter_count(cfg: VflWorkloadConfig) -> int:
    return sum(i * o + o for i, o in (*active_dims(cfg), *top_dims(cfg)))


def optimizer_flops(cfg: VflWorkloadConfig, party: Literal["active", "passive"]) -> float:
    """FLOPs of one Adam step of a party's parameters."""
    count = active_parameter_count(cfg) if party == "active" else passive_parameter_count(cfg)
    return float(ADAM_FLOPS_PER_PARAMETER * count)


def local_update_flops(
    cfg: VflWorkloadConfig, party: Literal["active", "passive"], batch: int | None = None, weighting: bool = True
) -> float:
    """FLOPs of one update on cached statistics (a CELU-VFL / FedBCD local step), optimizer included."""
    b = batch or cfg.batch_size
    if party == "active":
        extra = _backward_flops(top_dims(cfg), b, True) if weighting else 0.0
        return active_forward_flops(cfg, b) + active_backward_flops(cfg, b) + extra + optimizer_flops(cfg, "active")
    return passive_forward_flops(cfg, b) + passive_backward_flops(cfg, b) + optimizer_flops(cfg, "passive")


def activation_bytes(cfg: VflWorkloadConfig, batch: int | None = None) -> int:
    """Payload bytes of Z_B sent passive -> active per batch (float32; the frame header adds < 64 bytes)."""
    return (batch or cfg.batch_size) * cfg.interface_dim * BYTES_PER_FLOAT32


def gradient_bytes(cfg: VflWorkloadConfig, batch: int | None = None) -> int:
    """Payload bytes of dL/dZ_B sent active -> passive per batch."""
    return (batch or cfg.batch_size) * cfg.interface_dim * BYTES_PER_FLOAT32


def batches_per_epoch(cfg: VflWorkloadConfig) -> int:
    """Training batches per epoch (the last partial batch is dropped: every message has the agreed shape)."""
    return cfg.num_samples // cfg.batch_size


# ----------------------------------------------------------------------------------------------------------
# Synthetic data (numpy, deterministic)


@lru_cache(maxsize=8)
def _generate(cfg: VflWorkloadConfig, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All columns of a split: (categorical [N, F] int64, dense [N, D] float32, labels [N] float32).

    The ground truth (per-bucket weights, dense weights) comes from the seed alone, so train and test share it;
    the samples of each split come from their own stream.
    """
    truth = np.random.default_rng([cfg.seed, 7919])
    f, k, d = cfg.passive_num_fields, cfg.passive_hash_buckets, cfg.active_num_dense
    bucket_weight = truth.normal(0.0, 1.0, size=(f, k))
    # A cross-field interaction over coarse groups of buckets: learnable by the MLP, not by a sum of embeddings.
    cross_weight = truth.normal(0.0, 1.0, size=(CROSS_GROUPS, CROSS_GROUPS)) if f >= 2 else None
    dense_weight = truth.normal(0.0, 1.0, size=d)
    count = cfg.num_samples if split == "train" else cfg.num_test_samples
    rng = np.random.default_rng([cfg.seed, 1 if split == "train" else 2])
    # Skewed bucket popularity, as hashed ids in click logs are: low buckets are frequent.
    cats = np.minimum((k * rng.random((count, f)) ** 2.0).astype(np.int64), k - 1)
    dense = rng.normal(0.0, 1.0, size=(count, d)).astype(np.float32)
    passive = bucket_weight[np.arange(f), cats].sum(axis=1) / math.sqrt(f)
    if cross_weight is not None:
        passive = passive + cross_weight[cats[:, 0] % CROSS_GROUPS, cats[:, 1] % CROSS_GROUPS]
    active = dense @ dense_weight / math.sqrt(d)
    if d >= 2:
        active = active + dense[:, 0] * dense[:, 1]
    passive = passive / (passive.std() + 1e-9) * cfg.passive_signal
    active = active / (active.std() + 1e-9) * cfg.active_signal
    logit = passive + active + math.log(cfg.click_rate / (1 - cfg.click_rate))
    labels = (rng.random(count) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    return cats, dense, labels


def passive_features(cfg: VflWorkloadConfig, split: str = "train") -> np.ndarray:
    """The passive party's data: categorical bucket ids [N, passive_num_fields] (int64). No labels."""
    return _generate(cfg, _check_split(split))[0]


def active_features_and_labels(cfg: VflWorkloadConfig, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """The active party's data: dense fields [N, active_num_dense] (float32) and click labels [N] (0/1 float32)."""
    _, dense, labels = _generate(cfg, _check_split(split))
    return dense, labels


def _check_split(split: str) -> str:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return split


def batch_indices(cfg: VflWorkloadConfig, epoch: int, step: int) -> np.ndarray:
    """Sample ids of training batch `step` of `epoch` (a seeded shuffle per epoch that both parties compute)."""
    order = _epoch_order(cfg, epoch)
    return order[step * cfg.batch_size : (step + 1) * cfg.batch_size]


@lru_cache(maxsize=4)
def _epoch_order(cfg: VflWorkloadConfig, epoch: int) -> np.ndarray:
    return np.random.default_rng([cfg.seed, 31337, epoch]).permutation(cfg.num_samples)


def test_batches(cfg: VflWorkloadConfig) -> list[np.ndarray]:
    """Sample ids of the test set in evaluation batches of batch_size (the last one may be smaller)."""
    return [
        np.arange(i, min(i + cfg.batch_size, cfg.num_test_samples))
        for i in range(0, cfg.num_test_samples, cfg.batch_size)
    ]


# Not a pytest test, though tests import it by its name. Functions take any attribute; mypy knows of none.
test_batches.__test__ = False  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------------------------------------
# Torch modules (torch is imported on first use, so the simulator can read sizes without it)


def _seeded(seed: int, tag: str):
    import torch

    return torch.Generator().manual_seed(int(hashlib.sha256(f"{seed}/{tag}".encode()).hexdigest()[:8], 16))


def _mlp(dims: list[tuple[int, int]], seed: int, tag: str):
    import torch
    from torch import nn

    layers: list = []
    gen = _seeded(seed, tag)
    for n, (i, o) in enumerate(dims):
        linear = nn.Linear(i, o)
        with torch.no_grad():
            bound = 1.0 / math.sqrt(i)
            linear.weight.uniform_(-bound, bound, generator=gen)
            linear.bias.uniform_(-bound, bound, generator=gen)
        layers.append(linear)
        if n < len(dims) - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def passive_bottom_model(cfg: VflWorkloadConfig):
    """Passive bottom: one embedding table over all fields' buckets, concatenated, then the MLP -> Z_B."""
    import torch
    from torch import nn

    class PassiveBottom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = nn.Embedding(cfg.passive_num_fields * cfg.passive_hash_buckets, cfg.passive_embedding_dim)
            with torch.no_grad():
                self.embedding.weight.normal_(0.0, 0.05, generator=_seeded(cfg.seed, "passive/embedding"))
            self.register_buffer(
                "field_offset", torch.arange(cfg.passive_num_fields) * cfg.passive_hash_buckets, persistent=False
            )
            self.mlp = _mlp(passive_dims(cfg), cfg.seed, "passive/mlp")

        def forward(self, cats):  # cats: [B, F] int64 bucket ids
            emb = self.embedding(cats + self.field_offset)
            return self.mlp(emb.flatten(1))

    return PassiveBottom()


def active_bottom_model(cfg: VflWorkloadConfig):
    """Active bottom: MLP over the dense fields -> Z_A."""
    return _mlp(active_dims(cfg), cfg.seed, "active/bottom")


def top_model(cfg: VflWorkloadConfig):
    """Top model at the active party: concat(Z_B, Z_A) -> MLP -> one logit per sample."""
    from torch import nn

    class Top(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mlp = _mlp(top_dims(cfg), cfg.seed, "top")

        def forward(self, z_passive, z_active):
            import torch

            return self.mlp(torch.cat([z_passive, z_active], dim=1)).squeeze(1)

    return Top()
