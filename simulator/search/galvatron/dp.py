"""The two dynamic programs of the Galvatron search.

`chain_dp`: inside one pipeline stage, the per-layer strategy choice. Layers form a chain; each layer
picks one strategy (time t, memory w), adjacent layers pay a transition cost when their layouts differ,
and the memory of the chain must stay under the stage's budget. The state is (strategy of the last
layer, memory used so far, in buckets), so the program is exact on the bucket grid (memory is rounded
up, never down: a plan the program accepts fits). One pass over n layers answers every prefix length,
which is what the stage partition needs.

`partition`: across stages, how many layers each stage gets. Given each stage's best time for every
(first layer, layer count), it finds the partition with the smallest bottleneck stage (binary search on
the bottleneck, a min-plus pass over the stages for each guess), then, among a few bottlenecks just
above it, the partitions with the smallest sum of stage times: a 1F1B pipeline of m micro-batches takes
sum + (m - 1) * max of its stage times.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

INF = float("inf")


@dataclass
class ChainElement:
    """One layer of a chain: its candidate strategies with time, memory (buckets) and layout index."""

    time: np.ndarray  # (S,)
    weight: np.ndarray  # (S,) int
    layout: np.ndarray  # (S,) int, index into the chain's layout list

    def __post_init__(self) -> None:
        self.layouts = np.unique(self.layout)
        self.members = [np.nonzero(self.layout == lay)[0] for lay in self.layouts]


@dataclass
class ChainResult:
    """Best time for every prefix length, and how to rebuild its strategy indices."""

    best: np.ndarray  # (n + 1,) seconds; best[i] covers elements 0..i-1; inf where nothing fits
    _end: list[tuple[int, int] | None]
    _steps: list[tuple[np.ndarray, np.ndarray, np.ndarray]]  # per element: (layout pick, best of layout, layouts)
    _weights: list[np.ndarray]
    _frontier: list[tuple[np.ndarray, np.ndarray] | None]  # per prefix: best time and last strategy per memory

    def best_within(self, length: int, cap: int) -> float:
        """Best time of the first `length` elements using at most `cap` buckets (the memory/time frontier)."""
        front = self._frontier[length]
        if front is None or cap < 0:
            return INF
        values = front[0][: cap + 1]
        return float(values.min()) if values.size else INF

    def choices(self, length: int, cap: int | None = None) -> list[int]:
        """Strategy index of each of the first `length` elements in the best solution (within `cap`)."""
        if cap is None:
            end = self._end[length]
        else:
            front = self._frontier[length]
            assert front is not None
            b = int(np.argmin(front[0][: cap + 1]))
            end = (int(front[1][b]), b)
        assert end is not None, "no solution of that length"
        s, b = end
        out = [s]
        for i in range(length - 1, 0, -1):
            b -= int(self._weights[i][s])  # memory before element i
            pick, arg_layout, _ = self._steps[i]
            s = int(arg_layout[int(pick[s, b]), b])
            out.append(s)
        return out[::-1]


def chain_dp(
    elements: list[ChainElement], transition: np.ndarray, capacity: int, end_cost: list[np.ndarray | None] | None = None
) -> ChainResult:
    """Minimize the summed time of a chain of layers under `capacity` memory buckets.

    Args:
        elements: the layers in order.
        transition: (layouts, layouts) seconds between adjacent layers' layouts (zero on the diagonal).
        capacity: buckets available for the sum of the elements' weights.
        end_cost: optional per prefix length i, an (S_{i-1},) extra cost when the chain ends after
            element i-1.
    """
    n = len(elements)
    size = capacity + 1
    best = np.full(n + 1, INF)
    ends: list[tuple[int, int] | None] = [None] * (n + 1)
    steps: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = [(np.zeros(0), np.zeros(0), np.zeros(0))]
    weights = [e.weight for e in elements]
    frontier: list[tuple[np.ndarray, np.ndarray] | None] = [None] * (n + 1)
    if capacity < 0 or n == 0:
        return ChainResult(best, ends, steps, weights, frontier)
    first = elements[0]
    dp = np.full((len(first.time), size), INF)
    for s, (t, w) in enumerate(zip(first.time, first.weight)):
        if w < size and t < dp[s, w]:
            dp[s, w] = t
    columns = np.arange(size)

    def record(i: int, dp: np.ndarray) -> None:
        extra = end_cost[i] if end_cost is not None else None
        total = dp if extra is None else dp + extra[:, None]
        flat = int(np.argmin(total))
        value = total.flat[flat]
        if np.isfinite(value):
            best[i] = value
            ends[i] = divmod(flat, size)
            frontier[i] = (total.min(axis=0), total.argmin(axis=0))

    record(1, dp)
    prev = first
    for i in range(1, n):
        el = elements[i]
        # Cheapest way into each layout: first the best previous strategy of every previous layout ...
        layouts = prev.layouts
        by_layout = np.empty((len(layouts), size))
        arg_layout = np.empty((len(layouts), size), dtype=np.int16)
        for li, members in enumerate(prev.members):
            if len(members) == 1:
                by_layout[li] = dp[members[0]]
                arg_layout[li] = members[0]
            else:
                block = dp[members]
                pick = np.argmin(block, axis=0)
                by_layout[li] = block[pick, columns]
                arg_layout[li] = members[pick]
        # ... then across layouts, with the transition cost into each strategy's layout.
        into = np.empty((len(el.time), size))
        pick_all = np.empty((len(el.time), size), dtype=np.int8)
        for lay, rows in zip(el.layouts, el.members):
            cost = by_layout + transition[layouts, lay][:, None]
            pick = np.argmin(cost, axis=0)
            value = cost[pick, columns]
            into[rows] = value
            pick_all[rows] = pick
        new = np.full((len(el.time), size), INF)
        for s, (t, w) in enumerate(zip(el.time, el.weight)):
            if w < size:
                new[s, w:] = into[s, : size - w] + t
        steps.append((pick_all, arg_layout, layouts))
        dp = new
        prev = el
        record(i + 1, dp)
    return ChainResult(best, ends, steps, weights, frontier)


def _min_sum(stage_times: list[np.ndarray], num_layers: int, bottleneck: float) -> tuple[float, list[int]] | None:
    """The partition with every stage time <= bottleneck and the least sum; None if there is none.

    stage_times[j][a, n]: time of stage j holding n layers from layer a (inf where impossible).
    """
    p = len(stage_times)
    f = np.full(num_layers + 1, INF)
    f[0] = 0.0
    choice = []
    for j in range(p):
        table = stage_times[j]
        g = np.full(num_layers + 1, INF)
        arg = np.zeros(num_layers + 1, dtype=np.int32)
        for n in range(1, table.shape[1]):
            col = table[: num_layers + 1 - n, n]
            cand = f[: num_layers + 1 - n] + np.where(col <= bottleneck, col, INF)
            better = cand < g[n:]
            g[n:] = np.where(better, cand, g[n:])
            arg[n:] = np.where(better, n, arg[n:])
        f = g
        choice.append(arg)
    if not np.isfinite(f[num_layers]):
        return None
    counts = []
    pos = num_layers
    for j in range(p - 1, -1, -1):
        n = int(choice[j][pos])
        counts.append(n)
        pos -= n
    assert pos == 0
    return float(f[num_layers]), counts[::-1]


def partition(
    stage_times: list[np.ndarray], num_layers: int, num_micro_batches: int, tries: int = 6
) -> list[tuple[float, list[int]]]:
    """Layer counts per stage, best first by sum + (m - 1) * max of the stage times (a few of them).

    Returns (estimated pipeline time, counts) pairs; empty when no partition fits.
    """
    values = np.unique(np.concatenate([t[np.isfinite(t)] for t in stage_times]))
    if values.size == 0:
        return []
    lo, hi = 0, values.size - 1
    if _min_sum(stage_times, num_layers, values[hi]) is None:
        return []
    while lo < hi:  # smallest feasible bottleneck
        mid = (lo + hi) // 2
        if _min_sum(stage_times, num_layers, values[mid]) is None:
            lo = mid + 1
        else:
            hi = mid
    found: dict[tuple[int, ...], float] = {}
    # A slightly higher bottleneck can buy a much lower sum (fill and drain): try a few.
    for k in range(lo, min(values.size, lo + tries)):
        got = _min_sum(stage_times, num_layers, values[k])
        if got is None:
            continue
        _, counts = got
        times = [stage_times[j][sum(counts[:j]), counts[j]] for j in range(len(counts))]
        estimate = float(sum(times) + (num_micro_batches - 1) * max(times))
        found.setdefault(tuple(counts), estimate)
    return sorted(((e, list(c)) for c, e in found.items()), key=lambda x: (x[0], x[1]))
