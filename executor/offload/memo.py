"""Activation swapping by token (MEMO) with saved-tensor hooks, and token-wise recomputation of the rest.

A block's forward runs in three token-wise or attention pieces so each saved tensor can be handled by the
token share it belongs to (`workloads.activations` gives the same split to the simulator):

    segment 1 (token-wise): attention norm, q/k/v projections, rotary embedding
    attention core (mixes tokens): scaled-dot-product attention over all tokens
    segment 2 (token-wise): output projection, residual, MLP norm, MLP, residual

`recompute=tokenwise` with `offload=alpha` (MEMO):

- the first alpha share of tokens runs segments 1 and 2 under a hook that copies every tensor they save
  to host memory (pinned, on a side CUDA stream on GPU; on CPU into a separate host buffer so the device
  account does not hold it), fetched back when backward unpacks it;
- the other tokens run under a hook that drops what they save; the first unpack in backward re-runs that
  segment on those tokens alone from their block input and attention output (kept on host as anchors)
  and hands out the re-made tensors in the order they were saved (as non-reentrant checkpointing does);
- the attention core's saved q, k and v are split the same way (their head slice to host, their tail
  re-made by segment 1's recompute); what only the core makes (output, log-sum-exp) goes to host whole.

`recompute=none` with `offload=alpha` (plain swapping): each saved tensor with a token dimension sends its
first alpha share of tokens to host and keeps the rest on the device, so the device-side bytes a block
holds between forward and backward fall by alpha.

Device-side bytes kept are reported to `executor.memory.SavedTensorTracker` (the CPU memory account);
host bytes are counted in `OffloadStats`. On CUDA the copies back of a block start when backward reaches
the block after it (`_Frame`), into one preallocated arena sized by the MIP memory plan when the plan
carries one (`Plan.memory_plan.peak_bytes`, `PlannedArena`); without it they are ordinary allocations.
Dropout under token-wise recompute replays the random generators' state, so recomputed tokens draw the
masks they drew in forward.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from executor.memory import SavedTensorTracker
from workloads.torch_models import Block, rope_tables, rotate_half


@dataclass
class OffloadStats:
    """Bytes moved and kept, summed over blocks since the last `reset`."""

    host_bytes: int = 0  # copied to host during forward
    fetched_bytes: int = 0  # copied back during backward
    device_bytes: int = 0  # kept on the device for backward
    recomputed_segments: int = 0
    host_live: int = 0
    host_peak: int = 0

    def reset(self) -> None:
        self.host_bytes = self.fetched_bytes = self.device_bytes = self.recomputed_segments = 0
        self.host_live = self.host_peak = 0


STATS = OffloadStats()


def _is_weight(t: torch.Tensor) -> bool:
    """A parameter, a view of one, or autocast's lower-precision copy of one (or a view of that copy):
    autocast keeps its casts of the weights for the whole forward, so swapping them would only move bytes."""
    base = t._base if t._base is not None else t
    if isinstance(t, nn.Parameter) or isinstance(base, nn.Parameter):
        return True
    fn = base.grad_fn
    if fn is None or fn.name() != "ToCopyBackward0":
        return False
    return any(type(node).__name__ == "AccumulateGrad" for node, _ in fn.next_functions if node is not None)


class _HostCopy:
    """A tensor's copy in host memory; `fetch` brings it back to the device.

    On CUDA the copy out runs on the block's side stream; the copy back is started early by `prefetch`
    (when backward reaches the block after this one, see `_Frame`) into the planned arena when there is one.
    """

    __slots__ = ("__weakref__", "device", "event", "frame", "host", "nbytes", "ready", "ready_event", "source")
    device: torch.device
    nbytes: int
    frame: _Frame | None
    host: torch.Tensor
    event: torch.cuda.Event | None  # the copy to host has finished (CUDA)
    source: torch.Tensor | None  # the device tensor, held until the copy is done (CUDA)
    ready: torch.Tensor | None  # the prefetched copy back on the device
    ready_event: torch.cuda.Event | None

    def __init__(self, t: torch.Tensor, stream: torch.cuda.Stream | None, frame: _Frame | None = None):
        self.device = t.device
        self.nbytes = t.numel() * t.element_size()
        self.frame = frame
        self.ready = self.ready_event = self.source = None
        if t.is_cuda:
            self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            assert stream is not None
            stream.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(stream):
                self.host.copy_(t, non_blocking=True)
                self.event = torch.cuda.Event()
                self.event.record(stream)
            # Not `record_stream`: the allocator would then free `t` only once the copy's event has passed
            # when the CPU next allocates, and the CPU runs a whole forward ahead of the GPU, so nothing
            # swapped would be freed before backward. Instead `t` is held until `release`, which makes the
            # compute stream wait for the copy (MEMO's stall when PCIe falls behind) and then lets the
            # allocator reuse the memory in the compute stream's order.
            self.source = t
        else:
            # A separate host buffer: the device account (and the autograd graph) no longer holds `t`.
            self.host = _HOST_POOL.take(t.shape, t.dtype).copy_(t)
            self.event = None
        if frame is not None:
            frame.copies.append(weakref.ref(self))
        STATS.host_bytes += self.nbytes
        STATS.host_live += self.nbytes
        STATS.host_peak = max(STATS.host_peak, STATS.host_live)

    def release(self) -> None:
        """Drop the device tensor once the compute stream has waited for its copy to host (CUDA)."""
        if self.source is not None:
            assert self.event is not None  # recorded with the copy that holds `source`
            torch.cuda.current_stream(self.device).wait_event(self.event)
            self.source = None

    def prefetch(self, stream, arena: PlannedArena | None, slot: int) -> None:
        """Start the copy back on `stream` (CUDA), into the arena's `slot` when it has room."""
        if self.device.type != "cuda" or self.ready is not None:
            return
        # The destination belongs to the compute stream (it is freed there after backward uses it), so the
        # copy waits for the compute work queued so far: memory the compute stream freed, and an arena slot
        # it may still be reading, are reused only after that work is done.
        main = torch.cuda.current_stream(self.device)
        dst = arena.allocate(slot, self.host.shape, self.host.dtype) if arena is not None else None
        if dst is None:
            dst = torch.empty(self.host.shape, dtype=self.host.dtype, device=self.device)
        assert self.event is not None  # a CUDA tensor's copy to host records one
        with torch.cuda.stream(stream):
            stream.wait_stream(main)
            stream.wait_event(self.event)
            dst.copy_(self.host, non_blocking=True)
            self.ready_event = torch.cuda.Event()
            self.ready_event.record(stream)
        self.ready = dst

    def fetch(self) -> torch.Tensor:
        STATS.fetched_bytes += self.nbytes
        if self.frame is not None:
            self.frame.reached()
        if self.device.type == "cuda":
            self.release()
            if self.ready is None:
                assert self.event is not None
                torch.cuda.current_stream(self.device).wait_event(self.event)
                return self.host.to(self.device, non_blocking=True)
            assert self.ready_event is not None  # recorded by `prefetch` with `ready`
            torch.cuda.current_stream(self.device).wait_event(self.ready_event)
            return self.ready
        return self.host

    def __del__(self):
        STATS.host_live -= self.nbytes
        if self.source is not None:
            self.release()
        if self.device.type != "cuda":
            _HOST_POOL.give(self.host)


class _Frame:
    """One forward of one block: its host copies, and the frame before it (the block backward reaches
    next), whose copies back start as soon as backward reaches this one."""

    last: ClassVar[weakref.ref[_Frame] | None] = None  # the most recent frame of this process (forward order)
    # Frames whose device tensors may still be held for their copies to host (CUDA), oldest first. A
    # block's copies may run behind the compute of the next block; when the block after that starts, the
    # compute stream waits for them and their tensors are freed (see `_HostCopy.release`).
    in_flight: ClassVar[list[weakref.ref[_Frame]]] = []
    COPY_LAG_BLOCKS = 1

    def __init__(self, stream, arena: PlannedArena | None, block: int):
        self.copies: list = []
        self.stream, self.arena, self.block = stream, arena, block
        if stream is not None:
            while len(_Frame.in_flight) > _Frame.COPY_LAG_BLOCKS:
                old = _Frame.in_flight.pop(0)()
                if old is not None:
                    old.release()
            _Frame.in_flight.append(weakref.ref(self))
        before = _Frame.last() if _Frame.last is not None else None
        # Only the block just before in the same forward pass (another micro-batch's pass breaks the chain).
        self.previous: weakref.ref[_Frame] | None = None
        self.index = 0
        if before is not None and before.block == block - 1:
            self.previous, self.index = _Frame.last, before.index + 1
        self.started = False
        # Registries for the block's forward only (they hold the tensors they map): `close` drops them.
        self.seen, self.by_storage = _Seen(), _Seen()
        _Frame.last = weakref.ref(self)

    def to_host(self, t: torch.Tensor):
        """`t` to host whole, once: a tensor saved by several ops, or a view of one already copied that
        covers its storage (the attention output and the output projection's 2-D view of it), is not
        copied again."""
        key = _key(t)
        done = self.seen.get(key)
        if done is not None:
            return done
        first = self.by_storage.get(_storage_key(t))
        if first is not None and _inside(t, _Layout(first[0])):
            done = _ViewOf(first[1], t, _Layout(first[0]))
        else:
            done = _HostCopy(t, self.stream, self)
            if _covers_storage(t):
                self.by_storage.put(_storage_key(t), t, (t, done))
        self.seen.put(key, t, done)
        return done

    def release(self) -> None:
        for ref in self.copies:
            copy = ref()
            if copy is not None:
                copy.release()

    def reached(self) -> None:
        if self.started:
            return
        self.started = True
        before = self.previous() if self.previous is not None else None
        if before is None or self.stream is None:
            return
        # Double buffering: this frame's fetches use one half of the arena, the prefetch the other.
        slot = before.index % 2
        if self.arena is not None:
            self.arena.reset(slot)
        for ref in before.copies:
            copy = ref()
            if copy is not None:
                copy.prefetch(self.stream, self.arena, slot)


class _HostPool:
    """Host buffers kept for reuse by size (CPU devices), as CUDA's pinned host allocator caches its blocks:
    a fresh large allocation is new pages from the OS, and touching them costs more than the copy itself."""

    def __init__(self) -> None:
        self.free: dict[int, list[torch.Tensor]] = {}

    def take(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        stack = self.free.get(nbytes)
        raw = stack.pop() if stack else torch.empty(nbytes, dtype=torch.uint8)
        return raw.view(dtype).view(shape) if nbytes else torch.empty(shape, dtype=dtype)

    def give(self, t: torch.Tensor) -> None:
        """Keep `t`'s buffer for reuse, unless anything else still refers to it (autograd may hold the
        unpacked tensor a moment longer than the packed handle)."""
        if t.numel() == 0 or not t.is_contiguous():
            return
        raw = t.view(-1).view(torch.uint8)
        if raw.untyped_storage().nbytes() != raw.numel() or _users(raw) > _users_alone():
            return
        self.free.setdefault(raw.numel(), []).append(raw)

    def clear(self) -> None:
        self.free.clear()


def _users(raw: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(raw.untyped_storage()._cdata)


def _users_alone() -> int:
    """What `_users` counts for a buffer from `take` that only `give` (its argument, the buffer it views
    and its byte view) refers to."""
    global _ALONE
    if _ALONE is None:
        t = torch.empty(16, dtype=torch.uint8).view(torch.float32).view(2, 2)
        raw = t.view(-1).view(torch.uint8)
        _ALONE = _users(raw)
    return _ALONE


_ALONE: int | None = None
_HOST_POOL = _HostPool()


class _Kept:
    """A tensor (or token slice) kept on the device, counted by the active memory tracker."""

    __slots__ = ("handle", "tensor")

    def __init__(self, t: torch.Tensor):
        self.tensor = t
        tracker = SavedTensorTracker.active
        self.handle = tracker.add(t) if tracker is not None else None
        STATS.device_bytes += t.numel() * t.element_size()


class _Split:
    """A saved tensor cut along its token dimension: a head on host, a tail kept or re-made."""

    __slots__ = ("dim", "head", "tail")

    def __init__(self, dim: int, head: _HostCopy | None, tail: Callable[[], torch.Tensor | None]):
        self.dim, self.head, self.tail = dim, head, tail

    def get(self) -> torch.Tensor:
        parts = ([self.head.fetch()] if self.head is not None else []) + [t for t in [self.tail()] if t is not None]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=self.dim)


class _Dropped:
    __slots__ = ("group", "index")

    def __init__(self, group: _RecomputeGroup, index: int):
        self.group, self.index = group, index


class _ViewOf:
    """A saved tensor on the storage of another saved tensor that covers that whole storage (the SDPA output
    and the output projection's 2-D view of it): rebuilt from it on unpack, so its bytes are not held twice."""

    __slots__ = ("base_size", "base_stride", "offset", "size", "source", "stride")

    def __init__(self, source, t: torch.Tensor, base: _Layout):
        self.source = source
        self.base_size, self.base_stride = base.shape, base.stride
        self.size, self.stride, self.offset = tuple(t.shape), tuple(t.stride()), t.storage_offset()

    def get(self) -> torch.Tensor:
        full = _unpack(self.source)
        # Lay the rebuilt tensor out as the original storage was, then take the view.
        layout = torch.empty_strided(self.base_size, self.base_stride, dtype=full.dtype, device=full.device)
        layout.copy_(full)
        return layout.as_strided(self.size, self.stride, self.offset)


class _Layout:
    """dtype, shape and strides of a tensor: what `_ViewOf` keeps of its base, without holding the base
    (holding it past forward would keep the device memory the swap is meant to free; the registries that
    hold bases during a block's forward are dropped when it ends)."""

    __slots__ = ("dtype", "shape", "stride")

    def __init__(self, t: torch.Tensor):
        self.dtype, self.shape, self.stride = t.dtype, tuple(t.shape), tuple(t.stride())

    def size(self):
        return self.shape


def _inside(t: torch.Tensor, base: _Layout) -> bool:
    """`base` covers its whole storage, so `t` (same storage, same dtype) reads only its elements."""
    return t.dtype == base.dtype


def _covers_storage(t: torch.Tensor) -> bool:
    if is_traceable_wrapper_subclass(t):
        return False
    return t.storage_offset() == 0 and t.numel() * t.element_size() == t.untyped_storage().nbytes()


class _Distributed:
    """A DTensor saved for backward (tensor parallelism): its local shard is packed, the DTensor rebuilt."""

    __slots__ = ("local", "mesh", "placements", "shape", "stride")

    def __init__(self, t, pack_local: Callable):
        self.mesh, self.placements, self.shape, self.stride = t.device_mesh, t.placements, t.shape, t.stride()
        self.local = pack_local(t.to_local())

    def get(self):
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(
            _unpack(self.local), self.mesh, self.placements, run_check=False, shape=self.shape, stride=self.stride
        )


def _distributed_aware(pack: Callable) -> Callable:
    """`pack` for plain tensors, applied to a DTensor's local shard (its token dimension is not sharded
    without sequence parallelism)."""

    def wrapped(t):
        if _is_weight(t):
            return t
        if _is_dtensor(t):
            return _Distributed(t, pack)
        return pack(t)

    return wrapped


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


def _unpack(packed):
    if isinstance(packed, _HostCopy):
        return packed.fetch()
    if isinstance(packed, _Kept):
        return packed.tensor
    if isinstance(packed, (_Split, _ViewOf, _Distributed)):
        return packed.get()
    if isinstance(packed, _Dropped):
        return packed.group.saved_tensor(packed.index)
    return packed


class _RecomputeGroup:
    """A token-wise segment run on the tokens that backward recomputes: what it saves is dropped and re-made
    by re-running `fn` on its anchors (copied to host) the first time backward asks for any of it."""

    def __init__(self, fn: Callable, anchors: list[torch.Tensor], stream, frame: _Frame | None = None):
        self.fn = fn
        self.anchors = [
            (frame.to_host(a.detach()) if frame is not None else _HostCopy(a.detach(), stream), a.requires_grad)
            for a in anchors
        ]
        self.count = 0
        self.saved: list | None = None
        self.outputs: tuple[torch.Tensor, ...] | torch.Tensor | None = None
        # Dropout in the segment draws the same masks again when recomputed (as torch.utils.checkpoint does).
        self.device = anchors[0].device
        self.rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None

    def pack(self, t: torch.Tensor):
        if _is_weight(t):
            return t
        self.count += 1
        return _Dropped(self, self.count - 1)

    def saved_tensor(self, index: int) -> torch.Tensor:
        self.recompute()
        assert self.saved is not None
        return self.saved[index]

    def recompute(self) -> None:
        if self.saved is not None:
            return
        inputs = [_unpack(copy).detach().requires_grad_(rg) for copy, rg in self.anchors]
        saved: list[torch.Tensor] = []

        def capture(t: torch.Tensor):
            if _is_weight(t):
                return t
            # Detached, as torch.utils.checkpoint keeps its recomputed tensors: the original graph needs their
            # data only, and a tensor holding its recomputed grad_fn would close a cycle through this hook
            # (tensor -> node -> saved-variable hook -> `saved` -> tensor) that no collector frees: every
            # recomputed segment leaked, ~0.5 GB per step for gpt-30m.
            saved.append(t.detach())
            return None

        with torch.random.fork_rng(devices=[self.device] if self.cuda_rng is not None else []):
            torch.set_rng_state(self.rng)
            if self.cuda_rng is not None:
                torch.cuda.set_rng_state(self.cuda_rng, self.device)
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(capture, lambda x: x):
                outputs = self.fn(*inputs)
        # Only the outputs' data is used (the attention core's tail of q, k, v); the recomputed graph goes.
        self.outputs = tuple(o.detach() for o in outputs) if isinstance(outputs, tuple) else outputs.detach()
        assert len(saved) == self.count, f"recompute saved {len(saved)} tensors, forward saved {self.count}"
        self.saved = saved
        STATS.recomputed_segments += 1


class MemoBlock(Block):
    """A transformer block whose saved activations are swapped by token (and, under `tokenwise`, the rest
    recomputed token-wise). `alpha` is the share of tokens swapped to host.

    `apply_offload` turns existing blocks into this class in place (as FSDP2 does), so parameter names,
    initialization and checkpoints do not change.
    """

    def memo_init(self, alpha: float, recompute: str, arena: PlannedArena | None = None, index: int = 0) -> None:
        if recompute not in ("none", "tokenwise"):
            raise ValueError(f"MemoBlock runs recompute none or tokenwise, not {recompute!r}")
        self.alpha = float(alpha)
        self.recompute = recompute
        self.arena = arena
        self.index = index
        self._stream: torch.cuda.Stream | None = None

    # ---- helpers -------------------------------------------------------------------------------
    def _side_stream(self, device: torch.device):
        if device.type != "cuda":
            return None
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    @contextmanager
    def _to_host(self, stream, frame: _Frame):
        """Every non-weight tensor saved inside goes to host whole (once per forward, see `_Frame.to_host`)."""

        def pack(t):
            return t if _is_weight(t) else frame.to_host(t)

        with torch.autograd.graph.saved_tensors_hooks(_distributed_aware(pack), _unpack):
            yield

    def _seg1(self, x: torch.Tensor, start: int, seq: int):
        """q, k, v of tokens start.. of x as (batch, tokens, heads, head_dim): concatenated along tokens and
        then transposed, they have the memory layout the plain block gives the attention core."""
        attn = self.attn
        h = self.attn_norm(x)
        b, s, _ = h.shape
        q = attn.wq(h).view(b, s, -1, attn.head_dim)
        k = attn.wk(h).view(b, s, -1, attn.head_dim)
        v = attn.wv(h).view(b, s, -1, attn.head_dim)
        if attn.rope:
            # Under context parallelism this rank's tokens sit at `positions` of the whole sequence.
            where = slice(start, start + s) if attn.positions is None else attn.positions[start : start + s]
            cos, sin = rope_tables(attn.num_positions or seq, attn.head_dim, q.device, q.dtype)
            cos, sin = cos[where][:, None], sin[where][:, None]
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        return q, k, v

    def _seg2(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        blk = self
        y = x + blk.dropout(blk.attn.wo(o))
        return y + blk.dropout(blk.mlp(blk.mlp_norm(y)))

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return Block.forward(self, x)
        if self.recompute == "none":
            return self._swap_only(x)
        return self._tokenwise(x)

    def _swap_only(self, x: torch.Tensor) -> torch.Tensor:
        """Plain swapping: the first alpha share of tokens of each saved tensor to host, the rest kept."""
        b, s = x.shape[0], x.shape[1]
        stream = self._side_stream(x.device)
        frame = _Frame(stream, self.arena, self.index)
        packed = _Seen()  # a tensor saved by several ops (q/k/v's input) is moved once
        by_storage = _Seen()

        def pack(t: torch.Tensor):
            if _is_weight(t):
                return t
            key = _key(t)
            done = packed.get(key)
            if done is not None:
                return done
            first = by_storage.get(_storage_key(t))
            if first is not None and _inside(t, _Layout(first[0])):
                # Another view of a tensor already split (the output projection's 2-D view of the attention
                # output): rebuilt from that one, so its bytes are not held twice.
                done = _ViewOf(first[1], t, _Layout(first[0]))
            else:
                done = split(t)
                if _covers_storage(t):
                    by_storage.put(_storage_key(t), t, (t, done))
            packed.put(key, t, done)
            return done

        def split(t: torch.Tensor):
            dim = _token_dim(t, b, s)
            if dim is None:
                return _Kept(t)
            length = t.shape[dim]
            cut = round(self.alpha * length)
            if cut == 0:
                return _Kept(t)
            if cut >= length:
                return _HostCopy(t, stream, frame)
            head = _HostCopy(t.narrow(dim, 0, cut), stream, frame)
            kept = _Kept(t.narrow(dim, cut, length - cut).clone())  # a copy, so the full tensor's storage is freed
            return _Split(dim, head, lambda: kept.tensor)

        with torch.autograd.graph.saved_tensors_hooks(_distributed_aware(pack), _unpack):
            out = Block.forward(self, x)
        # Every tensor packed above keeps `pack` alive until backward, and with it these registries, which
        # hold the whole tensors whose token slices were split: empty them, or nothing split is ever freed.
        packed.clear()
        by_storage.clear()
        return out

    def _tokenwise(self, x: torch.Tensor) -> torch.Tensor:
        b, s = x.shape[0], x.shape[1]
        n = round(self.alpha * s)
        stream = self._side_stream(x.device)
        frame = _Frame(stream, self.arena, self.index)
        seg1_tail = seg2_tail = None
        # Segment 1.
        parts = []
        if n > 0:
            with self._to_host(stream, frame):
                parts.append(self._seg1(x[:, :n], 0, s))
        if n < s:
            seg1_tail = _RecomputeGroup(lambda xt: self._seg1(xt, n, s), [x[:, n:]], stream, frame)
            with torch.autograd.graph.saved_tensors_hooks(seg1_tail.pack, _unpack):
                parts.append(self._seg1(x[:, n:], n, s))
        q, k, v = ((p[0] if len(parts) == 1 else torch.cat(p, dim=1)).transpose(1, 2) for p in zip(*parts))
        # Attention core: q, k, v split by token, the rest to host whole.
        qkv = {_key(t): i for i, t in enumerate((q, k, v))}

        def core_pack(t: torch.Tensor):
            if _is_weight(t):
                return t
            which = qkv.get(_key(t))
            if which is None or t.dim() != 4 or t.shape[2] != s:
                return frame.to_host(t)
            head = _HostCopy(t.narrow(2, 0, n), stream, frame) if n > 0 else None
            if seg1_tail is None:
                return _Split(2, head, lambda: None)
            group = seg1_tail

            def tail(group=group, which=which):
                group.recompute()
                return group.outputs[which].detach().transpose(1, 2)

            return _Split(2, head, tail)

        with torch.autograd.graph.saved_tensors_hooks(_distributed_aware(core_pack), _unpack):
            o = self.attn.core(q, k, v)
        o = o.transpose(1, 2).reshape(b, s, -1)
        # Segment 2.
        outs = []
        if n > 0:
            with self._to_host(stream, frame):
                outs.append(self._seg2(x[:, :n], o[:, :n]))
        if n < s:
            seg2_tail = _RecomputeGroup(self._seg2, [x[:, n:], o[:, n:]], stream, frame)
            with torch.autograd.graph.saved_tensors_hooks(seg2_tail.pack, _unpack):
                outs.append(self._seg2(x[:, n:], o[:, n:]))
        # Forward is over: release the tensors the registries held (the saved tensors keep `frame` alive).
        frame.seen = frame.by_storage = _Seen()
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


class _Seen:
    """Tensors already packed in one forward, by a key of their memory. An entry counts only while its
    tensor lives: a freed tensor's address may be reused by a new one."""

    def __init__(self) -> None:
        self._entries: dict = {}

    def get(self, key):
        entry = self._entries.get(key)
        if entry is None or entry[0]() is None:
            return None
        return entry[1]

    def put(self, key, t: torch.Tensor, value) -> None:
        self._entries[key] = (weakref.ref(t), value)

    def clear(self) -> None:
        self._entries.clear()


def _key(t: torch.Tensor) -> tuple:
    if is_traceable_wrapper_subclass(t):  # no storage of its own (an async collective's result)
        return ("object", id(t))
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()))


def _storage_key(t: torch.Tensor) -> int | None:
    return None if is_traceable_wrapper_subclass(t) else t.untyped_storage().data_ptr()


def _token_dim(t: torch.Tensor, batch: int, seq: int) -> int | None:
    """The token dimension of an activation: (batch, seq, ...), (batch, heads, seq, ...), or the tokens of
    the micro-batch flattened (batch * seq, ...) as a linear saves its input."""
    if t.dim() >= 2 and t.shape[0] == batch and t.shape[1] == seq:
        return 1
    if t.dim() >= 3 and t.shape[0] == batch and t.shape[2] == seq:
        return 2
    if t.dim() >= 1 and t.shape[0] == batch * seq and batch > 1:
        return 0
    return None


class PlannedArena:
    """One preallocated device buffer for the tensors fetched back from host (CUDA), sized by the MIP memory
    plan: two slots of the planned peak of one block's frame (`Plan.memory_plan.peak_bytes`), one for the
    block backward is in and one for the block it prefetches. Within a slot tensors are placed one after
    the other (512-byte aligned); a tensor that does not fit gets an ordinary allocation. The plan's
    per-tensor offsets name the builder's tensors, not the hooks' saved tensors, so the arena takes the
    plan's peak, not its offsets. `take` places a tensor at an explicit offset."""

    ALIGN = 512

    def __init__(self, peak_bytes: int, device: torch.device, slots: int = 2):
        self.slot_bytes = int(peak_bytes)
        self.buffer = torch.empty(self.slot_bytes * slots, dtype=torch.uint8, device=device)
        self.cursor = [0] * slots

    def take(self, offset: int, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        nbytes = int(torch.tensor([], dtype=dtype).element_size() * torch.Size(shape).numel())
        if offset + nbytes > self.buffer.numel():
            raise ValueError(
                f"planned tensor [{offset}, {offset + nbytes}) is beyond the arena of {self.buffer.numel()} bytes"
            )
        return self.buffer[offset : offset + nbytes].view(dtype).view(shape)

    def reset(self, slot: int) -> None:
        self.cursor[slot] = 0

    def allocate(self, slot: int, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor | None:
        nbytes = int(torch.tensor([], dtype=dtype).element_size() * torch.Size(shape).numel())
        start = self.cursor[slot]
        if start + nbytes > self.slot_bytes:
            return None
        self.cursor[slot] = start + -(-nbytes // self.ALIGN) * self.ALIGN
        return self.take(slot * self.slot_bytes + start, shape, dtype)


def arena_for(plan, device: torch.device) -> PlannedArena | None:
    """The arena of a plan with a memory plan, on CUDA; None elsewhere."""
    if device.type != "cuda" or plan.memory_plan is None:
        return None
    return PlannedArena(plan.memory_plan.peak_bytes, device)


def apply_offload(
    model: nn.Module, mode_of: Callable[[int], tuple[str, float]], arena: PlannedArena | None = None
) -> int:
    """Wrap the blocks whose (recompute, offload) asks for it in `MemoBlock`; returns how many."""
    wrapped = 0
    blocks = model.get_submodule("blocks")
    assert isinstance(blocks, nn.ModuleDict), f"blocks is a {type(blocks).__name__}"
    for name in list(blocks.keys()):
        recompute, alpha = mode_of(int(name))
        if recompute == "tokenwise" or alpha > 0:
            block = blocks[name]
            if not isinstance(block, Block):
                raise TypeError(f"blocks.{name} is a {type(block).__name__}; offload applies before other wrappers")
            if not isinstance(block, MemoBlock):
                block.__class__ = MemoBlock
            assert isinstance(block, MemoBlock)
            block.memo_init(alpha, recompute, arena, int(name))
            wrapped += 1
    return wrapped
