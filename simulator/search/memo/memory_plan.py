"""MEMO's bi-level memory plan: byte offsets for every activation buffer, found with PuLP/CBC.

A training step allocates and frees activation tensors in a fixed order, so where each one lives can be
decided ahead of time: an offset into one preallocated buffer. Two tensors whose lifetimes overlap must
not overlap in address; the buffer must be as small as possible. This is dynamic storage allocation
(DSA), NP-hard in general; a caching allocator that places tensors as they come fragments the buffer.

Level one, `plan_layer`: the tensors of one layer's forward and backward, placed by the classic DSA
mixed-integer program. For every pair of tensors whose lifetimes overlap, a binary says which one lies
below; big-M constraints keep the pair apart; the objective is the peak. Only overlapping pairs get a
binary (the others may share addresses), identical tensors (same size and lifetime) are ordered up front
and one mirror image of every solution is cut off, so a layer's few dozen tensors solve in seconds. The
greedy best-fit placement (`greedy_best_fit`, largest first) and the same greedy in four other orders
give CBC its warm start and the incumbent to beat: the returned plan is never worse than greedy
best-fit, a plan that reaches the lower bound (most bytes alive at one step) is optimal without CBC, and
when CBC runs out of time the best placement found comes back with status "time limit, best found".

Level two, `plan_model`: a model of identical layers runs forward 0..L-1 then backward L-1..0, so the
tensors a layer saves for its backward (cross-layer tensors) nest like a stack, while a layer's own
workspace is only alive inside its two windows. Each layer gets a frame: its workspace together with the
cross-layer tensors it owns, which are pinned to the bottom of the frame (the last freed lowest, so what
the backward frees first joins the free space above). Frames are planned once per distinct shape by
level one (identical layers share one plan) and stacked: frame l starts where the pinned part of frame
l-1 ends, and every layer's workspace reuses the address range that the frames above it use at other
times. This structured placement replaces a second MIP:

- it is valid whenever different layers' workspaces are never alive at the same step (sequential
  layers): a tensor is owned by the lowest layer whose workspace it meets in time, so it never meets
  the workspace of a layer below it, and every layer above it starts above it in address;
- it is tight: the pinned tensors of the layers below fill [0, base_l) without a hole, so the peak is
  max over l of (base_l + frame l's peak), and wherever those tensors are alive at frame l's busiest
  step no placement can do better than base_l + frame l's lower bound. When every frame's level-one
  plan reaches its own lower bound, the model plan reaches the global one and is optimal overall; it
  does for the transformer stacks `transformer_model_tensors` builds (see BENCHMARKS.md);
- placing each layer's workspace as one rigid block beside all saved activations instead would forbid
  the backward's gradients from reusing the space of activations the same backward has already freed;
  the frame formulation allows it.

The plan is checked with `check_plan` on the whole timeline before it is returned; if the structure does
not hold (two layers' workspaces alive at once), the model plan falls back to greedy best-fit on the whole
timeline and says so in its status. The report carries the lower bound (most bytes alive at any step):
a peak equal to it is optimal overall.

Sizes are rounded up to `alignment` bytes (512 by default, as CUDA's caching allocator does) before
placing; offsets are multiples of it. `transformer_layer_tensors` builds realistic inputs: the tensors
of one transformer block's forward and backward with the byte counts of `workloads.transformer`.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pulp

from hwmodel.errors import UserError
from workloads.config import WorkloadConfig

OPTIMAL = "optimal"
TIME_LIMIT = "time limit, best found"
GREEDY_NOT_STACKABLE = "greedy best-fit, layers not stackable"
GREEDY_BETTER = "greedy best-fit, better than the bi-level plan"
DEFAULT_ALIGNMENT = 512  # bytes; CUDA's caching allocator rounds blocks to 512 B
RECOMPUTE_MODES = ("none", "selective", "full")


class MemoryPlanError(UserError):
    """A memory plan whose tensors collide, or tensors that cannot be planned as given."""


# ---- data ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorLife:
    """One tensor: `size` bytes, alive over op steps [start, end] inclusive (created at `start`, last
    read at `end`)."""

    name: str
    size: int
    start: int
    end: int

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise MemoryPlanError(f"tensor name must be a non-empty string, got {self.name!r}")
        for field in ("size", "start", "end"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise MemoryPlanError(f"tensor {self.name!r}: {field} must be an integer, got {value!r}")
        if self.size < 0:
            raise MemoryPlanError(f"tensor {self.name!r}: size must be >= 0 bytes, got {self.size}")
        if self.start < 0 or self.end < self.start:
            raise MemoryPlanError(
                f"tensor {self.name!r}: lifetime [{self.start}, {self.end}] must satisfy 0 <= start <= end"
            )

    def overlaps(self, other: TensorLife) -> bool:
        """Alive at a common step."""
        return self.start <= other.end and other.start <= self.end


@dataclass(frozen=True)
class Placement:
    name: str
    offset: int


class _PlanFigures:
    """What both plans derive from their offsets, planned peak and greedy peak."""

    offsets: dict[str, int]
    peak_bytes: int
    greedy_peak_bytes: int

    @property
    def fragmentation_avoided_bytes(self) -> int:
        return self.greedy_peak_bytes - self.peak_bytes

    @property
    def fragmentation_avoided_pct(self) -> float:
        saved = self.fragmentation_avoided_bytes
        return 100.0 * saved / self.greedy_peak_bytes if self.greedy_peak_bytes else 0.0

    def placements(self) -> list[Placement]:
        return [Placement(name, offset) for name, offset in self.offsets.items()]


@dataclass(frozen=True)
class LayerMemoryPlan(_PlanFigures):
    """Offsets (bytes) of one set of tensors and the figures that judge them.

    peak_bytes: end of the highest tensor (sizes aligned). greedy_peak_bytes: the same for greedy
    best-fit. lower_bound_bytes: most (aligned) bytes alive at any step; no placement does better.
    solver_status: "optimal" (proven) or "time limit, best found".
    """

    offsets: dict[str, int]
    peak_bytes: int
    greedy_peak_bytes: int
    lower_bound_bytes: int
    solver_status: str
    solve_time_s: float
    cbc_called: bool = False  # False when a greedy order already reached the lower bound


@dataclass(frozen=True)
class ModelMemoryPlan(_PlanFigures):
    """The bi-level plan of a whole model: offsets of every tensor on one timeline.

    layer_plans[l] is the level-one plan of layer l's frame (its workspace and the cross-layer tensors it
    owns, offsets relative to layer_bases[l]); identical layers share one plan object.
    distinct_layer_plans: how many level-one MIPs were solved. solver_status: "optimal" when every
    level-one MIP was proven optimal, "time limit, best found" when one was not, or one of the greedy
    fallbacks (see module docstring). greedy_peak_bytes: greedy best-fit on all tensors of all layers
    on one timeline.
    """

    offsets: dict[str, int]
    peak_bytes: int
    greedy_peak_bytes: int
    lower_bound_bytes: int
    solver_status: str
    solve_time_s: float
    layer_plans: tuple[LayerMemoryPlan, ...]
    layer_bases: tuple[int, ...]
    distinct_layer_plans: int


# ---- checks and bounds -------------------------------------------------------------------------------


def _check_tensors(tensors: Sequence[TensorLife]) -> list[TensorLife]:
    tensors = list(tensors)
    seen: set[str] = set()
    for tensor in tensors:
        if not isinstance(tensor, TensorLife):
            raise MemoryPlanError(f"expected TensorLife objects, got {type(tensor).__name__}: {tensor!r}")
        if tensor.name in seen:
            raise MemoryPlanError(f"tensor name {tensor.name!r} appears twice; names must be unique")
        seen.add(tensor.name)
    return tensors


def _check_alignment(alignment: int) -> None:
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment < 1:
        raise MemoryPlanError(f"alignment must be a positive number of bytes, got {alignment!r}")


def _check_time_limit(time_limit_s: float) -> None:
    if not isinstance(time_limit_s, (int, float)) or not math.isfinite(time_limit_s) or time_limit_s <= 0:
        raise MemoryPlanError(f"time_limit_s must be a positive number of seconds, got {time_limit_s!r}")


def _aligned(size: int, alignment: int) -> int:
    return -(-int(size) // alignment) * alignment


def _arrays(tensors: Sequence[TensorLife], alignment: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    sizes = np.array([_aligned(t.size, alignment) for t in tensors], dtype=np.int64)
    starts = np.array([t.start for t in tensors], dtype=np.int64)
    ends = np.array([t.end for t in tensors], dtype=np.int64)
    return sizes, starts, ends


def lower_bound(tensors: Sequence[TensorLife], alignment: int = DEFAULT_ALIGNMENT) -> int:
    """Most bytes (sizes rounded up to `alignment`) alive at any one step: no placement can peak lower."""
    tensors = _check_tensors(tensors)
    _check_alignment(alignment)
    if not tensors:
        return 0
    sizes, starts, ends = _arrays(tensors, alignment)
    steps = np.concatenate([starts, ends + 1])
    deltas = np.concatenate([sizes, -sizes])
    order = np.lexsort((deltas, steps))  # at equal steps, frees (negative) before allocations
    return int(max(0, np.cumsum(deltas[order]).max()))


def check_plan(tensors: Sequence[TensorLife], offsets: dict[str, int], alignment: int = 1) -> None:
    """Raise MemoryPlanError if two tensors alive at a common step overlap in [offset, offset + size),
    if a tensor has no offset or a negative one, or (alignment > 1) if an offset is not a multiple of it."""
    tensors = _check_tensors(tensors)
    _check_alignment(alignment)
    missing = [t.name for t in tensors if t.name not in offsets]
    if missing:
        raise MemoryPlanError(f"no offset for {len(missing)} tensor(s): {', '.join(missing[:5])}")
    if not tensors:
        return
    offs = np.array([int(offsets[t.name]) for t in tensors], dtype=np.int64)
    bad = [t.name for t, o in zip(tensors, offs) if o < 0 or o % alignment]
    if bad:
        raise MemoryPlanError(f"offsets must be non-negative multiples of {alignment}: {', '.join(bad[:5])}")
    sizes = np.array([t.size for t in tensors], dtype=np.int64)
    starts = np.array([t.start for t in tensors], dtype=np.int64)
    ends = np.array([t.end for t in tensors], dtype=np.int64)
    tops = offs + sizes
    # Row by row keeps memory at O(n) for the thousands of tensors of a whole model.
    for i in range(len(tensors)):
        j = np.arange(i + 1, len(tensors))
        clash = (
            (starts[j] <= ends[i])
            & (starts[i] <= ends[j])
            & (offs[j] < tops[i])
            & (offs[i] < tops[j])
            & (sizes[j] > 0)
            & (sizes[i] > 0)
        )
        if clash.any():
            k = int(j[np.argmax(clash)])
            a, b = tensors[i], tensors[k]
            raise MemoryPlanError(
                f"tensors {a.name!r} (steps {a.start}-{a.end}, bytes {offs[i]}-{tops[i]}) and {b.name!r} "
                f"(steps {b.start}-{b.end}, bytes {offs[k]}-{tops[k]}) are alive together and overlap in memory"
            )


# ---- greedy best-fit ---------------------------------------------------------------------------------


def _greedy(sizes: np.ndarray, starts: np.ndarray, ends: np.ndarray, order: Sequence[int]) -> np.ndarray:
    """Place items in `order`, each at the lowest offset where it fits beside the already placed items
    whose lifetimes overlap its own."""
    offsets = np.zeros(len(sizes), dtype=np.int64)
    placed = np.zeros(len(sizes), dtype=bool)
    for i in order:
        if sizes[i] > 0:
            mask = placed & (starts <= ends[i]) & (ends >= starts[i]) & (sizes > 0)
            idx = np.nonzero(mask)[0]
            candidate = 0
            for j in idx[np.argsort(offsets[idx], kind="stable")]:
                if candidate + sizes[i] <= offsets[j]:
                    break
                candidate = max(candidate, int(offsets[j] + sizes[j]))
            offsets[i] = candidate
        placed[i] = True
    return offsets


def _greedy_order(tensors: Sequence[TensorLife], sizes: np.ndarray, bottom: Collection[str]) -> list[int]:
    """Pinned (bottom) tensors first, the last freed lowest (a stack: what is freed first lies on top, so
    its space joins the free space above), then the others by decreasing aligned size; ties: earlier
    start, longer lifetime, name. Largest first is the classic rule: big tensors are the hardest to fit
    into holes."""

    def key(i: int):
        t = tensors[i]
        if t.name in bottom:
            return (0, -t.end, -int(sizes[i]), t.start, t.name)
        return (1, -int(sizes[i]), t.start, -(t.end - t.start), t.name)

    return sorted(range(len(tensors)), key=key)


def _other_orders(tensors: Sequence[TensorLife], sizes: np.ndarray, bottom: Collection[str]) -> Iterator[list[int]]:
    """More greedy orders for the incumbent CBC starts from (pinned tensors first as in `_greedy_order`):
    largest area (bytes x steps), longest lifetime, latest end, earliest start. On random layer-sized sets
    the best of them reaches the lower bound about twice as often as largest-first alone."""
    lengths = [t.end - t.start + 1 for t in tensors]
    pinned = [i for i in _greedy_order(tensors, sizes, bottom) if tensors[i].name in bottom]
    free = [i for i in range(len(tensors)) if tensors[i].name not in bottom]
    keys = (
        lambda i: (-int(sizes[i]) * lengths[i], -int(sizes[i]), i),
        lambda i: (-lengths[i], -int(sizes[i]), i),
        lambda i: (-tensors[i].end, -int(sizes[i]), i),
        lambda i: (tensors[i].start, -int(sizes[i]), i),
    )
    for key in keys:
        yield pinned + sorted(free, key=key)


def greedy_best_fit(
    tensors: Sequence[TensorLife], alignment: int = DEFAULT_ALIGNMENT, *, bottom: Collection[str] = ()
) -> tuple[dict[str, int], int]:
    """Greedy placement: tensors by decreasing size (ties: earlier start, longer lifetime, name), each at
    the lowest offset where it fits among the already placed tensors alive at a common step. Tensors named
    in `bottom` are placed first, latest freed first. Returns (offsets, peak), sizes rounded up to
    `alignment`. It knows every lifetime in advance (offline), unlike `online_best_fit`."""
    tensors = _check_tensors(tensors)
    _check_alignment(alignment)
    if not tensors:
        return {}, 0
    sizes, starts, ends = _arrays(tensors, alignment)
    offsets = _greedy(sizes, starts, ends, _greedy_order(tensors, sizes, set(bottom)))
    return {t.name: int(o) for t, o in zip(tensors, offsets)}, int((offsets + sizes).max())


def online_best_fit(tensors: Sequence[TensorLife], alignment: int = DEFAULT_ALIGNMENT) -> tuple[dict[str, int], int]:
    """What an allocator without a plan does: tensors in allocation order (start step, then list order),
    each into the smallest free gap between live tensors that holds it (lowest such gap on ties), else on
    top; a tensor's space is free again after its last step. Returns (offsets, peak)."""
    tensors = _check_tensors(tensors)
    _check_alignment(alignment)
    live: list[tuple[int, int, int]] = []  # (offset, aligned size, end)
    offsets: dict[str, int] = {}
    peak = 0
    for index in sorted(range(len(tensors)), key=lambda i: (tensors[i].start, i)):
        tensor = tensors[index]
        size = _aligned(tensor.size, alignment)
        live = sorted(block for block in live if block[2] >= tensor.start)
        best, best_gap, cursor = None, None, 0
        for offset, block_size, _ in live:
            gap = offset - cursor
            if size <= gap and (best_gap is None or gap < best_gap):
                best, best_gap = cursor, gap
            cursor = max(cursor, offset + block_size)
        offset = cursor if best is None else best
        offsets[tensor.name] = offset
        if size:
            live.append((offset, size, tensor.end))
        peak = max(peak, offset + size)
    return offsets, peak


# ---- level one: the DSA mixed-integer program --------------------------------------------------------


def _compact(sizes: np.ndarray, starts: np.ndarray, ends: np.ndarray, xs: Sequence[float]) -> np.ndarray:
    """Turn the solver's (floating-point) offsets into exact integer ones: keep the order the solution
    puts overlapping tensors in and drop each tensor onto the highest of the tensors below it. Every
    offset becomes a sum of sizes (so aligned), and none rises above the solver's (up to its tolerance)."""
    order = sorted(range(len(sizes)), key=lambda i: (xs[i], i))
    return _drop_in_order(sizes, starts, ends, order)


def _drop_in_order(sizes: np.ndarray, starts: np.ndarray, ends: np.ndarray, order: Sequence[int]) -> np.ndarray:
    offsets = np.zeros(len(sizes), dtype=np.int64)
    placed = np.zeros(len(sizes), dtype=bool)
    for i in order:
        mask = placed & (starts <= ends[i]) & (ends >= starts[i]) & (sizes > 0)
        offsets[i] = int((offsets[mask] + sizes[mask]).max()) if mask.any() and sizes[i] > 0 else 0
        placed[i] = True
    return offsets


def _sort_within_classes(warm: np.ndarray, classes: dict[tuple, list[int]]) -> None:
    """Give each class of identical tensors its greedy slots in index order (in place)."""
    for members in classes.values():
        if len(members) > 1:
            for i, o in zip(members, sorted(warm[members])):
                warm[i] = o


def _break_mirror(
    sizes: np.ndarray,
    pinned: np.ndarray,
    pairs: list[tuple[int, int]],
    classes: dict[tuple, list[int]],
    warm: np.ndarray,
) -> tuple[tuple[int, int] | None, np.ndarray]:
    """The pair whose side is fixed to cut the mirror symmetry, and the warm start mirrored to agree with it.

    Mirror symmetry (offset -> peak - offset - size) maps every solution to one as good; fixing the side of
    one pair of distinct tensors cuts it, unless pinning already breaks it.
    """
    if pinned.any():
        return None, warm
    singleton = {members[0] for members in classes.values() if len(members) == 1}
    candidates = [(int(sizes[i] + sizes[j]), i, j) for i, j in pairs if i in singleton and j in singleton]
    if not candidates:
        return None, warm
    _, i, j = max(candidates)
    if warm[i] > warm[j]:
        top = int((warm + sizes).max())
        warm = top - warm - sizes
        _sort_within_classes(warm, classes)
    return (i, j), warm


def _solve_dsa(
    sizes: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    pinned: np.ndarray,
    pin_height: int,
    warm: np.ndarray,
    upper: int,
    lower: int,
    time_limit_s: float,
) -> tuple[np.ndarray | None, bool]:
    """Minimize the peak over offsets (all figures in the same integer unit). Returns (offsets or None,
    proven optimal)."""
    n = len(sizes)
    prob = pulp.LpProblem("activation_placement", pulp.LpMinimize)
    peak = prob.add_variable("peak", lowBound=lower, upBound=upper)
    cap = [int(pin_height if pinned[i] else upper) for i in range(n)]
    x = [prob.add_variable(f"x{i}", lowBound=0, upBound=max(0, cap[i] - int(sizes[i]))) for i in range(n)]
    prob += peak
    for i in range(n):
        prob += x[i] + int(sizes[i]) <= peak

    # Identical tensors are interchangeable: fix their order instead of branching on it.
    key = [(int(sizes[i]), int(starts[i]), int(ends[i]), bool(pinned[i])) for i in range(n)]
    classes: dict[tuple, list[int]] = {}
    for i in range(n):
        classes.setdefault(key[i], []).append(i)
    warm = warm.copy()
    _sort_within_classes(warm, classes)
    pairs = [
        (i, j)
        for i in range(n)
        for j in range(i + 1, n)
        if sizes[i] > 0 and sizes[j] > 0 and starts[i] <= ends[j] and starts[j] <= ends[i]
    ]
    mirror, warm = _break_mirror(sizes, pinned, pairs, classes, warm)

    peak.setInitialValue(int((warm + sizes).max()))
    for i in range(n):
        x[i].setInitialValue(int(warm[i]))
    binaries = 0
    for i, j in pairs:
        if key[i] == key[j]:
            prob += x[i] + int(sizes[i]) <= x[j]
            continue
        y = prob.add_variable(f"y{i}_{j}", lowBound=0, upBound=1, cat=pulp.LpBinary)  # 1: i lies below j
        binaries += 1
        prob += x[i] + int(sizes[i]) <= x[j] + cap[i] * (1 - y)
        prob += x[j] + int(sizes[j]) <= x[i] + cap[j] * y
        y.setInitialValue(1 if warm[i] < warm[j] else 0)
        if mirror == (i, j):
            y.lowBound = 1
    with warnings.catch_warnings():
        # PuLP 3.3 announces that its bundled CBC moves to an extra in 4.0; it is the CBC installed here.
        warnings.simplefilter("ignore", DeprecationWarning)
        solver = pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s, warmStart=True, gapAbs=0.999)
    prob.solve(solver)
    values = [v.value() for v in x]
    if any(v is None for v in values):
        return None, False
    # sol_status tells a proven optimum (1) from the best integer solution at the time limit (2).
    proven = prob.sol_status == pulp.LpSolutionOptimal
    return _compact(sizes, starts, ends, values), proven


def plan_layer(
    tensors: Sequence[TensorLife],
    time_limit_s: float = 10.0,
    alignment: int = DEFAULT_ALIGNMENT,
    *,
    bottom: Collection[str] = (),
) -> LayerMemoryPlan:
    """Level one: offsets for `tensors` (one layer's forward and backward) that minimize the peak.

    Args:
        time_limit_s: CBC's limit; past it the better of CBC's best and greedy best-fit is returned with
            status "time limit, best found".
        alignment: sizes are rounded up to this many bytes; offsets are multiples of it.
        bottom: names of tensors that must lie in [0, their total aligned size) — how level two pins a
            layer's cross-layer tensors under its workspace.
    """
    started = time.perf_counter()
    tensors = _check_tensors(tensors)
    _check_alignment(alignment)
    _check_time_limit(time_limit_s)
    bottom = set(bottom)
    unknown = bottom - {t.name for t in tensors}
    if unknown:
        raise MemoryPlanError(f"bottom names not among the tensors: {', '.join(sorted(unknown)[:5])}")
    if not tensors:
        return LayerMemoryPlan({}, 0, 0, 0, OPTIMAL, time.perf_counter() - started)
    sizes, starts, ends = _arrays(tensors, alignment)
    pinned = np.array([t.name in bottom for t in tensors], dtype=bool)
    greedy = _greedy(sizes, starts, ends, _greedy_order(tensors, sizes, bottom))
    greedy_peak = int((greedy + sizes).max())
    bound = lower_bound(tensors, alignment)
    best, best_peak, status = greedy, greedy_peak, OPTIMAL  # best_peak: the incumbent CBC gets
    for order in _other_orders(tensors, sizes, bottom) if best_peak > bound else ():
        candidate = _greedy(sizes, starts, ends, order)
        if int((candidate + sizes).max()) < best_peak:
            best, best_peak = candidate, int((candidate + sizes).max())
        if best_peak == bound:
            break
    if best_peak > bound:  # the incumbent may be optimal, but only CBC can tell
        unit = math.gcd(*(int(s) for s in sizes if s > 0))
        pin_height = int(sizes[pinned].sum())
        solution, proven = _solve_dsa(
            sizes // unit,
            starts,
            ends,
            pinned,
            pin_height // unit,
            best // unit,
            best_peak // unit,
            -(-bound // unit),
            time_limit_s,
        )
        status = OPTIMAL if proven else TIME_LIMIT
        if solution is not None:
            solution = solution * unit
            fits_pins = bool(((solution + sizes)[pinned] <= pin_height).all())
            if fits_pins and int((solution + sizes).max()) < best_peak:
                best = solution
    peak = int((best + sizes).max())
    offsets = {t.name: int(o) for t, o in zip(tensors, best)}
    return LayerMemoryPlan(offsets, peak, greedy_peak, bound, status, time.perf_counter() - started, best_peak > bound)


# ---- level two: stacking layer frames ----------------------------------------------------------------


def _canonical(tensors: Sequence[TensorLife], pinned: Collection[str], alignment: int) -> tuple:
    """What makes two frames the same problem: sizes, pinning and the order of lifetime events (only
    that order decides which tensors overlap)."""
    points = sorted({t.start for t in tensors} | {t.end for t in tensors})
    rank = {p: r for r, p in enumerate(points)}
    return tuple((_aligned(t.size, alignment), rank[t.start], rank[t.end], t.name in pinned) for t in tensors)


def _owned_by_layer(
    layers: Sequence[Sequence[TensorLife]], cross_layer: Sequence[TensorLife]
) -> list[list[TensorLife]]:
    """The cross-layer tensors each layer owns: the lowest layer whose workspace a tensor meets in time;
    one that meets none goes to the top layer, so that no other layer has to step over it."""
    spans = []
    for layer in layers:
        s = np.array([t.start for t in layer], dtype=np.int64)
        e = np.array([t.end for t in layer], dtype=np.int64)
        spans.append((s, e))
    owned: list[list[TensorLife]] = [[] for _ in layers]
    for tensor in cross_layer:
        owner = len(layers) - 1
        for index, (s, e) in enumerate(spans):
            if len(s) and bool(((s <= tensor.end) & (e >= tensor.start)).any()):
                owner = index
                break
        owned[owner].append(tensor)
    return owned


def _plan_frames(
    frames: list[list[TensorLife]],
    pinned_names: list[set[str]],
    alignment: int,
    time_limit_s: float,
    started: float,
) -> tuple[list[LayerMemoryPlan], dict[tuple, LayerMemoryPlan]]:
    """Level one for each layer's frame (its owned tensors pinned at the bottom, then its workspace): one
    MIP per distinct problem, its offsets carried over by position to the frames that repeat it."""
    keys = [_canonical(frame, pinned, alignment) for frame, pinned in zip(frames, pinned_names)]
    distinct = list(dict.fromkeys(keys))
    solved: dict[tuple, LayerMemoryPlan] = {}
    plans: list[LayerMemoryPlan] = []
    for index, key in enumerate(keys):
        if key not in solved:
            remaining = len(distinct) - len(solved)
            # Leave a tenth of the budget for greedy on the whole timeline and the final check.
            budget = time_limit_s * 0.9 - (time.perf_counter() - started)
            template = plan_layer(frames[index], max(0.5, budget / remaining), alignment, bottom=pinned_names[index])
            solved[key] = template
            plans.append(template)
        else:
            template = solved[key]
            first = keys.index(key)
            # Same problem: carry the template's offsets over by position.
            mapping = {t.name: template.offsets[u.name] for t, u in zip(frames[index], frames[first])}
            plans.append(
                LayerMemoryPlan(
                    mapping,
                    template.peak_bytes,
                    template.greedy_peak_bytes,
                    template.lower_bound_bytes,
                    template.solver_status,
                    0.0,
                    False,
                )
            )
    return plans, solved


def _stack_frames(
    plans: list[LayerMemoryPlan], owned: list[list[TensorLife]], alignment: int
) -> tuple[dict[str, int], list[int]]:
    """Global offsets with each layer's frame based on the top of the pinned tensors of the layers below,
    and the base of each frame."""
    offsets: dict[str, int] = {}
    bases = []
    base = 0
    for plan, pinned in zip(plans, owned):
        bases.append(base)
        for name, offset in plan.offsets.items():
            offsets[name] = base + offset
        pinned_top = max((plan.offsets[t.name] + _aligned(t.size, alignment) for t in pinned), default=0)
        base += pinned_top
    return offsets, bases


def plan_model(
    layers: Sequence[Sequence[TensorLife]],
    cross_layer: Sequence[TensorLife],
    time_limit_s: float = 60.0,
    alignment: int = DEFAULT_ALIGNMENT,
) -> ModelMemoryPlan:
    """Level two: offsets for a whole model's activation tensors, all on one timeline of op steps.

    Args:
        layers: layers[i] is layer i's intra-layer tensors (its workspace, alive inside its forward or
            backward), in global steps.
        cross_layer: tensors alive across layers (saved activations, hand-offs between layers, the
            residual gradient), in global steps.
        time_limit_s: total budget; split over the distinct level-one MIPs.
    """
    started = time.perf_counter()
    _check_time_limit(time_limit_s)
    _check_alignment(alignment)
    layers = [_check_tensors(layer) for layer in layers]
    cross_layer = _check_tensors(cross_layer)
    everything = _check_tensors([t for layer in layers for t in layer] + cross_layer)
    if not layers:
        raise MemoryPlanError("plan_model needs at least one layer")

    owned = _owned_by_layer(layers, cross_layer)
    frames = [mine + list(layer) for mine, layer in zip(owned, layers)]
    pinned_names = [{t.name for t in mine} for mine in owned]
    plans, solved = _plan_frames(frames, pinned_names, alignment, time_limit_s, started)
    offsets, bases = _stack_frames(plans, owned, alignment)

    status = OPTIMAL if all(p.solver_status == OPTIMAL for p in solved.values()) else TIME_LIMIT
    greedy_offsets, greedy_peak = greedy_best_fit(everything, alignment)
    try:
        check_plan(everything, offsets, alignment)
    except MemoryPlanError:
        offsets, status = greedy_offsets, GREEDY_NOT_STACKABLE
    sizes = {t.name: _aligned(t.size, alignment) for t in everything}
    peak = max((offsets[n] + sizes[n] for n in offsets), default=0)
    if greedy_peak < peak:
        offsets, peak, status = greedy_offsets, greedy_peak, GREEDY_BETTER
    return ModelMemoryPlan(
        offsets=offsets,
        peak_bytes=int(peak),
        greedy_peak_bytes=int(greedy_peak),
        lower_bound_bytes=lower_bound(everything, alignment),
        solver_status=status,
        solve_time_s=time.perf_counter() - started,
        layer_plans=tuple(plans),
        layer_bases=tuple(bases),
        distinct_layer_plans=len(solved),
    )


# ---- transformer-shaped inputs -------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerTensors:
    """One layer's tensors in its own step numbering: forward steps [0, forward_steps), backward after.

    Unpacks as (intra, cross). `handoff` = (output, input): the layer's output is the next layer's input,
    one buffer. `carried`: backward tensors that pass from layer to layer unchanged in place (the gradient
    of the residual stream), one buffer for the whole backward. `stack_layers` uses both."""

    intra: tuple[TensorLife, ...]
    cross: tuple[TensorLife, ...]
    forward_steps: int
    handoff: tuple[str, str] = ("x_out", "x_in")
    carried: tuple[str, ...] = ("resid_grad",)

    def __iter__(self) -> Iterator[list[TensorLife]]:
        return iter((list(self.intra), list(self.cross)))

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> list[TensorLife]:
        return (list(self.intra), list(self.cross))[index]


class _OpSequence:
    """Records ops in order; a tensor lives from the op that creates it to the last op that reads it."""

    def __init__(self) -> None:
        self.step = -1
        self.sizes: dict[str, int] = {}
        self.start: dict[str, int] = {}
        self.end: dict[str, int] = {}

    def op(self, reads: Sequence[str] = (), creates: Mapping[str, float] | None = None) -> None:
        self.step += 1
        for name in reads:
            assert name in self.start, f"{name} read before it exists"
            self.end[name] = self.step
        for name, nbytes in (creates or {}).items():
            assert name not in self.start, f"{name} created twice"
            self.sizes[name] = round(nbytes)
            self.start[name] = self.end[name] = self.step

    def tensors(self) -> list[TensorLife]:
        return [TensorLife(n, self.sizes[n], self.start[n], self.end[n]) for n in self.sizes]


def _resolve(workload: str | WorkloadConfig) -> WorkloadConfig:
    if isinstance(workload, WorkloadConfig):
        return workload
    from workloads import load_workload

    return load_workload(workload)


@dataclass(frozen=True)
class _BlockShape:
    """What sizes one block's tensors on one device, per micro-batch (bf16 activations, as
    `workloads.transformer` counts them)."""

    tokens: int  # tokens of the micro-batch
    t_sp: int  # tokens in the norm/residual regions (split over tp under sequence parallelism)
    h: int  # hidden size
    q_w: int  # query width per device
    kv_w: int  # key/value width per device
    heads: int  # query heads per device
    f_w: int  # FFN width per device
    sp: bool  # sequence parallel (tp > 1)
    rope: bool
    swiglu: bool
    dropout: bool
    e: int = 2  # bytes per activation element


_FORWARD_NAMES = (
    "n1",
    "n1_full",
    "qkv",
    "q",
    "k",
    "v",
    "o",
    "lse",
    "attn_mask",
    "h",
    "n2",
    "n2_full",
    "gate",
    "up",
    "s",
    "u",
    "m",
    "mlp_mask",
)


def _block_shape(cfg: WorkloadConfig, micro_batch: int, seq_len: int, tp: int, recompute: str) -> _BlockShape:
    """The block's sizes, after checking that the builder covers the workload and that tp splits it."""
    for name, value in (("micro_batch", micro_batch), ("seq_len", seq_len), ("tp", tp)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MemoryPlanError(f"{name} must be a positive integer, got {value!r}")
    if recompute not in RECOMPUTE_MODES:
        raise MemoryPlanError(f"recompute must be one of {', '.join(RECOMPUTE_MODES)}; got {recompute!r}")
    if cfg.family in ("t5", "moe"):
        raise MemoryPlanError(
            f"workload {cfg.name!r} is family {cfg.family!r}; the layer tensor builder covers single-stack "
            "dense transformers (gpt, llama, bert, vit)"
        )
    a, kvh, d, f = cfg.num_heads, cfg.kv_heads, cfg.head_dim, cfg.ffn
    for name, value in (("num_heads", a), ("kv_heads", kvh), ("ffn_hidden_size", f)):
        if value % tp:
            raise MemoryPlanError(f"tp={tp} must divide {name}={value} of workload {cfg.name!r}")
    tokens = micro_batch * seq_len
    if tp > 1 and tokens % tp:
        raise MemoryPlanError(f"tp={tp} must divide micro_batch*seq_len={tokens} under sequence parallelism")
    sp = tp > 1
    return _BlockShape(
        tokens=tokens,
        t_sp=tokens // tp if sp else tokens,
        h=cfg.hidden_size,
        q_w=a * d // tp,
        kv_w=kvh * d // tp,
        heads=a // tp,
        f_w=f // tp,
        sp=sp,
        rope=cfg.position_embedding == "rope",
        swiglu=cfg.mlp == "swiglu",
        dropout=bool(cfg.dropout),
    )


def _record_forward(ops: _OpSequence, b: _BlockShape, tag: str, *, first: bool) -> dict[str, str]:
    """The block's forward ops; `tag` renames the tensors a recompute pass creates again."""
    n = {k: k + tag for k in _FORWARD_NAMES}
    tokens, t_sp, h, e, f_w = b.tokens, b.t_sp, b.h, b.e, b.f_w
    ops.op(["x_in"], {n["n1"]: t_sp * h * e})  # norm
    qkv_in = n["n1"]
    if b.sp:
        ops.op([n["n1"]], {n["n1_full"]: tokens * h * e})  # sequence-parallel all-gather
        qkv_in = n["n1_full"]
    qkv_sizes = {n["q"]: tokens * b.q_w * e, n["k"]: tokens * b.kv_w * e, n["v"]: tokens * b.kv_w * e}
    if b.rope:
        ops.op([qkv_in], {n["qkv"]: tokens * (b.q_w + 2 * b.kv_w) * e})  # qkv projection
        ops.op([n["qkv"]], qkv_sizes)  # rotary embedding
    else:
        ops.op([qkv_in], qkv_sizes)
    ops.op([n["q"], n["k"], n["v"]], {n["o"]: tokens * b.q_w * e, n["lse"]: tokens * b.heads * 4})  # flash
    ops.op([n["o"], "x_in"], {n["h"]: t_sp * h * e, **({n["attn_mask"]: t_sp * h} if b.dropout else {})})
    ops.op([n["h"]], {n["n2"]: t_sp * h * e})  # mlp norm
    mlp_in = n["n2"]
    if b.sp:
        ops.op([n["n2"]], {n["n2_full"]: tokens * h * e})
        mlp_in = n["n2_full"]
    if b.swiglu:
        ops.op([mlp_in], {n["gate"]: tokens * f_w * e, n["up"]: tokens * f_w * e})
        ops.op([n["gate"]], {n["s"]: tokens * f_w * e})  # silu(gate)
        ops.op([n["s"], n["up"]], {n["m"]: tokens * f_w * e})
    else:
        ops.op([mlp_in], {n["u"]: tokens * f_w * e})  # fc1
        ops.op([n["u"]], {n["m"]: tokens * f_w * e})  # gelu / relu
    if first:  # down projection + residual add: the block output (not re-run by a recompute pass)
        ops.op([n["m"], n["h"]], {"x_out": t_sp * h * e, **({n["mlp_mask"]: t_sp * h} if b.dropout else {})})
    elif b.dropout:  # a recompute pass regenerates the residual dropout mask from the saved RNG state
        ops.op([], {n["mlp_mask"]: t_sp * h})
    return n


def _record_mlp_backward(ops: _OpSequence, b: _BlockShape, n: dict[str, str]) -> None:
    """The MLP half of the backward, from the residual gradient to the mlp norm's backward."""
    tokens, h, e, f_w = b.tokens, b.h, b.e, b.f_w
    grad_in = "resid_grad"
    if b.sp:
        ops.op(["resid_grad"], {"grad_full": tokens * h * e})
        grad_in = "grad_full"
    ops.op([grad_in, n["m"]] + ([n["mlp_mask"]] if b.dropout else []), {"dm": tokens * f_w * e})  # fc2 backward
    if b.swiglu:
        ops.op(["dm", n["gate"], n["up"], n["s"]], {"dgate_up": 2 * tokens * f_w * e})
        d_mlp_in = "dgate_up"
    else:
        ops.op(["dm", n["u"]], {"du": tokens * f_w * e})
        d_mlp_in = "du"
    mlp_in = n["n2"]
    if b.sp:
        ops.op([n["n2"]], {"n2_full@backward": tokens * h * e})  # re-gathered for the weight gradient
        mlp_in = "n2_full@backward"
    ops.op([d_mlp_in, mlp_in], {"dn2": tokens * h * e})  # fc1 / gate-up backward
    ops.op(["dn2", n["h"], "resid_grad"])  # mlp norm backward, added into the residual gradient


def _record_attention_backward(ops: _OpSequence, b: _BlockShape, n: dict[str, str], recompute: str) -> None:
    """The attention half of the backward, down to the first norm's backward."""
    tokens, h, e = b.tokens, b.h, b.e
    grad_in = "resid_grad"
    if b.sp:
        ops.op(["resid_grad"], {"grad_full@attn": tokens * h * e})
        grad_in = "grad_full@attn"
    ops.op([grad_in, n["o"]] + ([n["attn_mask"]] if b.dropout else []), {"do": tokens * b.q_w * e})
    lse = n["lse"]
    if recompute == "selective":  # selective recompute drops the log-sum-exp; the attention core re-runs
        ops.op([n["q"], n["k"], n["v"]], {"lse@recompute": tokens * b.heads * 4})
        lse = "lse@recompute"
    ops.op(
        ["do", n["q"], n["k"], n["v"], n["o"], lse],
        {
            "dq": tokens * b.q_w * e,
            "dk": tokens * b.kv_w * e,
            "dv": tokens * b.kv_w * e,
            "dq_accum": tokens * b.q_w * 4,
            "softmax_d": tokens * b.heads * 4,
        },  # flash backward workspaces
    )
    d_qkv = ["dq", "dk", "dv"]
    if b.rope:
        ops.op(d_qkv, {"dqkv": tokens * (b.q_w + 2 * b.kv_w) * e})  # rotary backward
        d_qkv = ["dqkv"]
    qkv_in = n["n1"]
    if b.sp:
        ops.op([n["n1"]], {"n1_full@backward": tokens * h * e})
        qkv_in = "n1_full@backward"
    ops.op(d_qkv + [qkv_in], {"dn1": tokens * h * e})  # qkv projection backward
    ops.op(["dn1", "x_in", "resid_grad"])  # norm backward, added into the residual gradient


def transformer_layer_tensors(
    workload: str | WorkloadConfig, micro_batch: int, seq_len: int, tp: int = 1, recompute: str = "none"
) -> LayerTensors:
    """The tensors of one transformer block's forward and backward on one device, per micro-batch.

    Unpacks as (intra_layer, cross_layer). Cross-layer tensors are the ones created in forward and read
    in backward (what the block saves); their bytes are exactly `workloads.transformer`'s saved bytes for
    the recompute mode (flash attention, bf16, sequence parallel when tp > 1). The rest is workspace:
    forward temporaries (pre-rotary q/k/v, all-gathered inputs under sequence parallelism), the layer
    output, and backward gradients and kernel workspaces (flash attention's fp32 dq accumulator and row
    sums). Weight gradients are model states, planned elsewhere, and are left out. The down projection
    and the residual add are one op (addmm into the residual), so the block's output is written directly.
    Under full recompute, the backward first re-runs the forward from the saved input.
    """
    shape = _block_shape(_resolve(workload), micro_batch, seq_len, tp, recompute)
    ops = _OpSequence()
    ops.op([], {"x_in": shape.t_sp * shape.h * shape.e})  # written by the layer below (its x_out)
    n = _record_forward(ops, shape, "", first=True)
    forward_steps = ops.step + 1

    ops.op([], {"resid_grad": shape.t_sp * shape.h * shape.e})  # gradient of the block output, accumulated in place
    if recompute == "full":
        n = _record_forward(ops, shape, "@recompute", first=False)
    _record_mlp_backward(ops, shape, n)
    _record_attention_backward(ops, shape, n, recompute)

    intra: list[TensorLife] = []
    cross: list[TensorLife] = []
    for tensor in ops.tensors():
        (cross if tensor.start < forward_steps <= tensor.end else intra).append(tensor)
    return LayerTensors(tuple(intra), tuple(cross), forward_steps)


def stack_layers(layer: LayerTensors, num_layers: int) -> tuple[list[list[TensorLife]], list[TensorLife]]:
    """`num_layers` copies of one layer on one timeline: forwards 0..L-1, then backwards L-1..0.

    Returns (layers, cross_layer) for `plan_model`: layers[i] holds layer i's workspace, names prefixed
    "layer{i}."; cross_layer holds the saved tensors of every layer, each layer's input as one buffer
    from the op of the layer below that writes it to the backward that last reads it (the last layer's
    output lives until the backward starts), and the carried residual gradient as one buffer over the
    whole backward."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise MemoryPlanError(f"num_layers must be a positive integer, got {num_layers!r}")
    L, nf = num_layers, layer.forward_steps
    local = {t.name: t for t in layer.intra + layer.cross}
    nb = max(t.end for t in local.values()) + 1 - nf
    out_name, in_name = layer.handoff

    def at(index: int, step: int) -> int:
        return index * nf + step if step < nf else L * nf + (L - 1 - index) * nb + (step - nf)

    special = {out_name, in_name, *layer.carried}
    layers: list[list[TensorLife]] = [[] for _ in range(L)]
    cross: list[TensorLife] = []
    for i in range(L):
        for tensor in layer.intra:
            if tensor.name not in special:
                layers[i].append(
                    TensorLife(f"layer{i}.{tensor.name}", tensor.size, at(i, tensor.start), at(i, tensor.end))
                )
        for tensor in layer.cross:
            if tensor.name not in special:
                cross.append(TensorLife(f"layer{i}.{tensor.name}", tensor.size, at(i, tensor.start), at(i, tensor.end)))
        x_in = local[in_name]
        start = at(i, x_in.start) if i == 0 else at(i - 1, local[out_name].start)
        cross.append(TensorLife(f"layer{i}.{in_name}", x_in.size, start, at(i, x_in.end)))
    x_out = local[out_name]
    cross.append(TensorLife(f"layer{L - 1}.{out_name}", x_out.size, at(L - 1, x_out.start), L * nf))
    for name in layer.carried:
        tensor = local[name]
        cross.append(TensorLife(name, tensor.size, at(L - 1, tensor.start), at(0, tensor.end)))
    return layers, cross


def transformer_model_tensors(
    workload: str | WorkloadConfig,
    micro_batch: int,
    seq_len: int,
    tp: int = 1,
    recompute: str = "none",
    num_layers: int | None = None,
) -> tuple[list[list[TensorLife]], list[TensorLife]]:
    """(layers, cross_layer) of a whole stack of identical blocks (default: the workload's layer count)."""
    cfg = _resolve(workload)
    layer = transformer_layer_tensors(cfg, micro_batch, seq_len, tp, recompute)
    return stack_layers(layer, cfg.num_layers if num_layers is None else num_layers)
