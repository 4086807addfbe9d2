"""CELU-VFL's per-instance weights; the workset rules themselves are `simulator.search.vfl.workset.Workset`, shared
by the parties and the simulator's timeline.

Per-instance weights: the cosine similarity of the stale statistics (cached) and the fresh ones (computed now),
zeroed below a threshold (default 0.5), or all ones for the "no weighting" ablation.
"""

from __future__ import annotations

from simulator.search.vfl.workset import Entry, Sampling, Workset

__all__ = ["DEFAULT_WEIGHT_THRESHOLD", "Entry", "Sampling", "Workset", "instance_weights"]

DEFAULT_WEIGHT_THRESHOLD = 0.5


def instance_weights(stale, fresh, threshold: float = DEFAULT_WEIGHT_THRESHOLD, enabled: bool = True):
    """Per-instance weights: cosine similarity of each row of `stale` and `fresh`, zero below `threshold`.

    Rows are the batch's instances (torch tensors [B, D]). With `enabled=False` (the ablation) all weights are 1.
    """
    import torch

    if not enabled:
        return torch.ones(stale.shape[0], dtype=stale.dtype)
    cos = torch.nn.functional.cosine_similarity(stale, fresh, dim=1, eps=1e-12)
    return torch.where(cos >= threshold, cos, torch.zeros_like(cos))
