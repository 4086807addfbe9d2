"""The page manager: pages have a home (host pool or SSD file); the device pool is a cache with a hard page
budget, filled in the scheduler's order and emptied by Belady's rule (the furthest next use goes first)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from executor.paging.store import PageStore
from simulator.search.angel_ptm.schedule import next_uses


@dataclass
class Counters:
    """Bytes moved in one step, counted where they move."""

    h2d: int = 0  # host (or SSD via host) to device
    ssd_read: int = 0
    ssd_write: int = 0

    def reset(self) -> None:
        self.h2d = self.ssd_read = self.ssd_write = 0


@dataclass
class PageManager:
    """`pages[i]` starts as given; the first `host_pages` live in host memory, the rest in page files."""

    initial: Sequence[np.ndarray]
    device_budget: int  # pages the device pool may hold at once (enforced)
    host_pages: int
    page_dir: Path
    prefix: str = "p"
    counters: Counters = field(default_factory=Counters)
    version: int = 0  # the step whose page files are current (files are named by version: never overwritten)
    write_initial: bool = True  # False when resuming: the page files of `version` are already there

    def __post_init__(self) -> None:
        if self.device_budget < 1:
            raise ValueError(f"device budget must be at least one page, got {self.device_budget}")
        self.store = PageStore(self.page_dir)
        self.host: dict[int, np.ndarray] = {}
        for i, page in enumerate(self.initial):
            if self.write_initial or not self.on_ssd(i):
                self.put(i, np.array(page, dtype=np.float64))
        self.device: dict[int, np.ndarray] = {}
        self.order: list[int] = []
        self.nxt: list[float] = []
        self.position = 0

    def name(self, page: int, version: int | None = None) -> str:
        return f"{self.prefix}{page:05d}-v{self.version if version is None else version}"

    def on_ssd(self, page: int) -> bool:
        return page >= self.host_pages

    def put(self, page: int, data: np.ndarray, version: int | None = None) -> None:
        """Write a page to its home (host pool, or its SSD file of `version`, crash-safely)."""
        if self.on_ssd(page):
            self.store.write(self.name(page, version), data)
            self.counters.ssd_write += data.nbytes
        else:
            self.host[page] = data

    def home(self, page: int) -> np.ndarray:
        """A page read from its home (SSD reads are checksummed)."""
        if self.on_ssd(page):
            data = self.store.read(self.name(page))
            self.counters.ssd_read += data.nbytes
            return data
        return self.host[page]

    def begin_step(self, order: Sequence[Sequence[int]]) -> None:
        """Start an iteration whose accesses are `order` (the device pool starts empty: pages changed)."""
        self.device.clear()
        self.order = [p for step in order for p in step]
        self.nxt = next_uses(self.order)
        self.position = 0

    def fetch(self, pages: Sequence[int]) -> list[np.ndarray]:
        """The device copies of `pages`, in the order the schedule listed them; evicts by next use."""
        if len(pages) > self.device_budget:
            raise MemoryError(f"a block needs {len(pages)} pages, the device budget is {self.device_budget}")
        out = []
        for page in pages:
            if self.position >= len(self.order) or self.order[self.position] != page:
                raise RuntimeError(f"page {page} fetched out of the scheduled order at position {self.position}")
            if page not in self.device:
                while len(self.device) >= self.device_budget:
                    self.device.pop(self._victim(set(pages)))
                data = self.home(page)
                self.device[page] = data.copy()  # the device copy (a real transfer on CUDA)
                self.counters.h2d += data.nbytes
            out.append(self.device[page])
            self.position += 1
        assert len(self.device) <= self.device_budget
        return out

    def _victim(self, pinned: set[int]) -> int:
        def next_use(page: int) -> float:
            for j in range(self.position, len(self.order)):
                if self.order[j] == page:
                    return j
            return float("inf")

        candidates = [p for p in self.device if p not in pinned] or list(self.device)
        return max(candidates, key=next_use)
