"""CELU-VFL's workset: the exchanged statistics of the last W batches, each reused R times then evicted.

Counting (the same at both parties): every update of a party's model counts one; a batch's statistics are used
for R updates in total, the first when they arrive (the fresh update) and R-1 cached local updates. So W=1, R=1
is vanilla VFL.

Rules (CELU-VFL, VLDB 2022, section 4, as this project states them):

- at most W batches are cached; a new batch waits for room (`has_room`), so none is evicted before its R uses;
- a batch is evicted right after its R-th use;
- staleness bound: a batch is never used more than W*R updates after it was added;
- uniform sampling: a local update draws uniformly among cached batches with uses left, skipping those used
  in the last W-1 updates (so one batch is not reused back to back). With `sampling="latest"` (the
  ablation) the newest such batch is taken instead, as FedBCD would;
- schedule: uses of one batch are at least W updates apart (the rule above), so a batch with u uses done
  must get its next one by update `added_at + W*(u+1)` for its last to stay within W*R. A batch within W
  updates of that deadline is urgent: the draw takes the most urgent eligible batch instead, and a new
  batch waits (`has_room` is false) while an eligible batch is urgent. Without this, random draws and
  arrivals push some batches past W*R (found by the property test);

`Workset` is plain bookkeeping (not thread-safe; the executor's party guards it with its own lock) and has no
torch: the executor's parties (`executor.vfl.party`) and the simulator's timeline (`simulator.search.vfl.engine`) play
out these same rules. The instance weights, which need the tensors, are in `executor.vfl.workset`.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

Sampling = Literal["uniform", "latest"]


@dataclass
class Entry:
    """One cached batch: its id (the training round), when it was added (update count) and its uses so far."""

    batch_id: int
    added_at: int
    uses: int
    payload: Any = field(default=None, repr=False)


class Workset:
    """The cache of W batches' statistics with CELU-VFL's use, eviction and sampling rules."""

    def __init__(self, size: int, uses: int, sampling: Sampling = "uniform", seed: int = 0) -> None:
        if size < 1 or uses < 1:
            raise ValueError(f"workset size W and uses R must be >= 1, got W={size}, R={uses}")
        if sampling not in ("uniform", "latest"):
            raise ValueError(f"sampling must be 'uniform' or 'latest', got {sampling!r}")
        self.size = size
        self.uses = uses
        self.sampling = sampling
        self.entries: list[Entry] = []
        self.updates = 0  # updates done so far (fresh and local)
        self.recent: deque[int] = deque(maxlen=max(size - 1, 0))  # batch ids of the last W-1 updates
        self._rng = random.Random(seed)

    @property
    def staleness_bound(self) -> int:
        return self.size * self.uses

    def has_room(self) -> bool:
        """Whether a new batch may be added now: a free slot, and no eligible batch urgent (see the rules)."""
        if len(self.entries) >= self.size:
            return False
        return not any(self.slack(e) <= self.size for e in self.eligible())

    def slack(self, entry: Entry) -> int:
        """Updates left before the entry's next use is due (its later uses, W apart, must end by W*R)."""
        return entry.added_at + self.size * (entry.uses + 1) - self.updates

    def add(self, batch_id: int, payload: Any = None) -> Entry:
        """Cache a batch that was just used for its fresh update (which counts as its first use)."""
        assert len(self.entries) < self.size, "workset full: wait until a batch has used its R updates"
        self.updates += 1
        self.recent.append(batch_id)
        entry = Entry(batch_id, self.updates - 1, 1, payload)
        if entry.uses < self.uses:
            self.entries.append(entry)
        return entry

    def staleness(self, entry: Entry) -> int:
        """Updates done since the entry's statistics were computed."""
        return self.updates - entry.added_at

    def eligible(self) -> list[Entry]:
        """Cached batches a local update may use now: uses left, not used in the last W-1 updates."""
        recent = set(self.recent)
        return [e for e in self.entries if e.uses < self.uses and e.batch_id not in recent]

    def choose(self) -> Entry | None:
        """The entry for the next local update (None: nothing eligible now; wait for the next batch)."""
        candidates = self.eligible()
        if not candidates:
            return None
        urgent = [e for e in candidates if self.slack(e) <= self.size]
        if urgent:
            return min(urgent, key=lambda e: (self.slack(e), e.added_at))
        if self.sampling == "latest":
            return max(candidates, key=lambda e: e.added_at)
        return self._rng.choice(candidates)

    def use(self, entry: Entry) -> int:
        """Record a local update on `entry`; returns its staleness at this use. Evicts it after its R-th use."""
        assert entry in self.entries and entry.uses < self.uses
        staleness = self.staleness(entry)
        assert staleness <= self.staleness_bound, f"batch {entry.batch_id} used {staleness} updates after it was added"
        entry.uses += 1
        self.updates += 1
        self.recent.append(entry.batch_id)
        if entry.uses >= self.uses:
            self.entries.remove(entry)
        return staleness

    def clear(self) -> None:
        """Drop what is cached (end of training)."""
        self.entries.clear()

    def state(self) -> dict:
        """What a checkpoint keeps (payloads included)."""
        return {
            "entries": [(e.batch_id, e.added_at, e.uses, e.payload) for e in self.entries],
            "updates": self.updates,
            "recent": list(self.recent),
            "rng": self._rng.getstate(),
        }

    def load_state(self, state: dict) -> None:
        self.entries = [Entry(b, a, u, p) for b, a, u, p in state["entries"]]
        self.updates = state["updates"]
        self.recent = deque(state["recent"], maxlen=max(self.size - 1, 0))
        self._rng.setstate(state["rng"])
