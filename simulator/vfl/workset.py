"""CELU-VFL's workset rules as the timeline applies them: the same rules, in the same order and with the same
seeded draws, as the executor's `executor.vfl.workset.Workset` (a test drives both through random
interleavings and compares every choice). The simulator keeps its own copy, without payloads and without
the executor's assertions, so that it can play the rules out anywhere (and report what it finds).

Rules: at most W batches are cached; a batch's fresh update is its first use and it is evicted right after
its R-th; a local update draws uniformly among cached batches with uses left, skipping those used in the
last W-1 updates (`sampling="latest"`, the ablation: the newest such batch). Schedule: a batch with u uses
done must get its next one by update `added_at + W*(u+1)`; one within W updates of that (urgent) is drawn
first, the most urgent, and a new batch waits while an eligible batch is urgent or no slot is free.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass


@dataclass(eq=False)
class Cached:
    batch_id: int
    added_at: int
    uses: int


class Workset:
    def __init__(self, size: int, uses: int, seed: int = 0, sampling: str = "uniform") -> None:
        assert size >= 1 and uses >= 1, (size, uses)
        assert sampling in ("uniform", "latest"), sampling
        self.sampling = sampling
        self.size = size
        self.uses = uses
        self.entries: list[Cached] = []
        self.updates = 0
        self.recent: deque[int] = deque(maxlen=max(size - 1, 0))
        self._rng = random.Random(seed)

    def has_room(self) -> bool:
        """A free slot, and no eligible batch urgent."""
        if len(self.entries) >= self.size:
            return False
        return not any(self.slack(e) <= self.size for e in self.eligible())

    def slack(self, entry: Cached) -> int:
        """Updates left before the entry's next use is due."""
        return entry.added_at + self.size * (entry.uses + 1) - self.updates

    def add(self, batch_id: int) -> None:
        """The batch's fresh update (its first use) is done: cache it for its R-1 local ones."""
        assert len(self.entries) < self.size
        self.updates += 1
        self.recent.append(batch_id)
        if self.uses > 1:
            self.entries.append(Cached(batch_id, self.updates - 1, 1))

    def staleness(self, entry: Cached) -> int:
        return self.updates - entry.added_at

    def eligible(self) -> list[Cached]:
        recent = set(self.recent)
        return [e for e in self.entries if e.uses < self.uses and e.batch_id not in recent]

    def choose(self) -> Cached | None:
        candidates = self.eligible()
        if not candidates:
            return None
        urgent = [e for e in candidates if self.slack(e) <= self.size]
        if urgent:
            return min(urgent, key=lambda e: (self.slack(e), e.added_at))
        if self.sampling == "latest":
            return max(candidates, key=lambda e: e.added_at)
        return self._rng.choice(candidates)

    def use(self, entry: Cached) -> int:
        """A local update on `entry` begins; returns its staleness. Evicts the batch after its R-th use."""
        staleness = self.staleness(entry)
        entry.uses += 1
        self.updates += 1
        self.recent.append(entry.batch_id)
        if entry.uses >= self.uses:
            self.entries.remove(entry)
        return staleness
