"""Pipeline schedules as the order of operations each stage runs.

An operation is a forward or backward of one micro-batch through one model chunk of a stage. The order
is what the runtime executes (Megatron-LM and torch.distributed.pipelining use the same ones):

- gpipe: all forwards, then all backwards in reverse;
- 1f1b: (p - stage - 1) warm-up forwards, then one forward / one backward alternately, then the
  remaining backwards;
- interleaved: Megatron's interleaved 1F1B over v model chunks per stage: (p - stage - 1) * 2 + (v - 1) * p
  warm-up forwards, then alternation, where virtual micro-batch k runs chunk (k // p) % v forwards and
  chunk v - 1 - (k // p) % v backwards. Needs a micro-batch count that is a multiple of p.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Op:
    kind: Literal["F", "B"]
    micro_batch: int
    chunk: int  # model chunk on this stage (0 unless interleaved)


def _interleaved_ids(k: int, p: int, v: int, forward: bool) -> tuple[int, int]:
    """(micro-batch, chunk) of the k-th forward or backward of a stage in Megatron's interleaving."""
    group, pos = divmod(k, p * v)
    chunk = pos // p
    micro_batch = group * p + pos % p
    if not forward:
        chunk = v - 1 - chunk
    return micro_batch, chunk


def stage_order(
    schedule: str, stage: int, num_stages: int, num_micro_batches: int, virtual_stages: int = 1
) -> list[Op]:
    """The operations stage `stage` runs, in order."""
    p, m, v = num_stages, num_micro_batches, virtual_stages
    if schedule == "gpipe":
        return [Op("F", i, 0) for i in range(m)] + [Op("B", i, 0) for i in reversed(range(m))]
    if schedule == "1f1b":
        warmup = min(p - stage - 1, m)
        order = [Op("F", i, 0) for i in range(warmup)]
        for i in range(m - warmup):
            order += [Op("F", warmup + i, 0), Op("B", i, 0)]
        order += [Op("B", i, 0) for i in range(m - warmup, m)]
        return order
    if schedule == "interleaved":
        total = m * v
        warmup = min(total, (p - stage - 1) * 2 + (v - 1) * p)
        order = [Op("F", *_interleaved_ids(k, p, v, True)) for k in range(warmup)]
        for k in range(total - warmup):
            order.append(Op("F", *_interleaved_ids(warmup + k, p, v, True)))
            order.append(Op("B", *_interleaved_ids(k, p, v, False)))
        order += [Op("B", *_interleaved_ids(k, p, v, False)) for k in range(total - warmup, total)]
        return order
    raise AssertionError(f"unknown schedule {schedule}")
