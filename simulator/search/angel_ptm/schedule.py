"""The page access order of one iteration and the eviction policies that serve it from a device budget.

Every iteration touches the same pages in the same order (forward over the blocks, backward in reverse), so
the order recorded once is the future: Belady's rule (evict the page whose next use is furthest away) is
optimal for that order, and LRU is the policy that does not know it.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field


def access_order(pages_per_block: Sequence[int]) -> list[list[int]]:
    """The pages each step of an iteration touches: forward over the blocks, then backward in reverse.
    Block b owns consecutive page ids; the result lists, per step, the page ids it needs on the device."""
    starts = [sum(pages_per_block[:b]) for b in range(len(pages_per_block))]
    blocks = [list(range(s, s + n)) for s, n in zip(starts, pages_per_block, strict=True)]
    return blocks + blocks[::-1]


@dataclass(frozen=True)
class Traffic:
    """Pages fetched onto the device (misses), pages evicted, and how often each page was fetched."""

    fetched: int
    evicted: int
    per_page: dict[int, int] = field(default_factory=dict)


def _flat(order: Sequence[Sequence[int]]) -> list[int]:
    return [p for step in order for p in step]


def simulate_lru(order: Sequence[Sequence[int]], capacity: int) -> Traffic:
    """Pages fetched when the device holds `capacity` pages and evicts the least recently used."""
    if capacity <= 0:
        raise ValueError(f"capacity must be at least one page, got {capacity}")
    resident: OrderedDict[int, None] = OrderedDict()
    fetched = evicted = 0
    for page in _flat(order):
        if page in resident:
            resident.move_to_end(page)
            continue
        fetched += 1
        if len(resident) >= capacity:
            resident.popitem(last=False)
            evicted += 1
        resident[page] = None
    return Traffic(fetched, evicted)


def next_uses(flat: Sequence[int]) -> list[float]:
    """For each position, where the same page is used next (infinity: never again)."""
    nxt: list[float] = [float("inf")] * len(flat)
    seen: dict[int, int] = {}
    for i in range(len(flat) - 1, -1, -1):
        nxt[i] = seen.get(flat[i], float("inf"))
        seen[flat[i]] = i
    return nxt


def simulate_belady(order: Sequence[Sequence[int]], capacity: int) -> Traffic:
    """Pages fetched when the device evicts the page whose next use is furthest away (optimal for a known
    order)."""
    if capacity <= 0:
        raise ValueError(f"capacity must be at least one page, got {capacity}")
    flat = _flat(order)
    nxt = next_uses(flat)
    resident: dict[int, float] = {}
    heap: list[tuple[float, int]] = []  # (-next use, page); stale entries skipped
    fetched = evicted = 0
    per_page: dict[int, int] = {}
    for i, page in enumerate(flat):
        if page not in resident:
            fetched += 1
            per_page[page] = per_page.get(page, 0) + 1
            if len(resident) >= capacity:
                while True:
                    neg, victim = heapq.heappop(heap)
                    if resident.get(victim) == -neg:
                        del resident[victim]
                        evicted += 1
                        break
        resident[page] = nxt[i]
        heapq.heappush(heap, (-nxt[i], page))
    return Traffic(fetched, evicted, per_page)


def belady_victim(resident: Sequence[int], position: int, flat: Sequence[int]) -> int:
    """The resident page whose next use after `position` in `flat` is furthest away (the executor's rule)."""

    def next_use(page: int) -> float:
        for j in range(position, len(flat)):
            if flat[j] == page:
                return j
        return float("inf")

    return max(resident, key=next_use)
