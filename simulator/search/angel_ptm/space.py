"""The candidates: models along a GPT-3-like ladder and placements that fill the tiers by hotness.

GPT-3's large models keep hidden_size = 128 x layers and 128-wide heads (6.7B: 32 x 4096, 13B: 40 x 5120,
175B: 96 x 12288, Brown et al. 2020 Table 2.1); the ladder scales depth and width together that way.
"""

from __future__ import annotations

from simulator.plan import ModelStatePlacement, TierShares
from workloads.config import WorkloadConfig

HEAD_DIM = 128
# Hottest first: parameters are read twice per micro-batch, gradients written once, optimizer states only
# by the step. Filling tiers in this order keeps the most-used bytes nearest the GPU.
FILL_ORDER = ("parameters", "gradients", "master_weights", "moments")


def ladder_model(base: WorkloadConfig, layers: int) -> WorkloadConfig:
    """`base`'s family at `layers` blocks, width 128 x layers, one 128-wide head per layer."""
    hidden = HEAD_DIM * layers
    return base.model_copy(
        update={
            "name": f"{base.family}-ladder-{layers}l",
            "num_layers": layers,
            "hidden_size": hidden,
            "num_heads": layers,
            "ffn_hidden_size": None,
            "num_kv_heads": None,
        }
    )


def fill_placement(
    class_bytes: dict[str, float],
    capacities: dict[str, float],
    tiers: tuple[str, ...] = ("gpu", "cpu", "ssd"),
    **options: object,
) -> ModelStatePlacement | None:
    """Place each class, hottest first, into the first tiers (in `tiers` order) with room; None if all
    tiers together cannot hold the states. `options` go to ModelStatePlacement (optimizer, staleness...)."""
    room = {t: capacities.get(t, 0.0) for t in tiers}
    shares: dict[str, TierShares] = {}
    for cls in FILL_ORDER:
        need = class_bytes[cls]
        got = dict.fromkeys(("gpu", "cpu", "ssd"), 0.0)
        for tier in tiers:
            take = min(need, max(room[tier], 0.0))
            got[tier] = take
            room[tier] -= take
            need -= take
        if need > 1e-6 * max(class_bytes[cls], 1.0):
            return None
        total = class_bytes[cls] or 1.0
        fr = {t: v / total for t, v in got.items()} if class_bytes[cls] else {"gpu": 1.0, "cpu": 0.0, "ssd": 0.0}
        fr[tiers[-1]] = 1.0 - sum(v for t, v in fr.items() if t != tiers[-1])  # exact sum
        shares[cls] = TierShares(**{t: max(0.0, min(1.0, v)) for t, v in fr.items()})
    return ModelStatePlacement(**shares, **options)  # type: ignore[arg-type]
