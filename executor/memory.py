"""What a rank's memory holds, measured.

On CUDA the peak is the allocator's own `torch.cuda.max_memory_allocated` over the run.
On CPU there is no device allocator to ask, so the peak is an honest account of what training keeps:

- weights: bytes of the parameters this rank holds (its shards, each storage counted once);
- gradients: bytes of their gradients after a backward;
- optimizer: bytes of the optimizer's state tensors (Adam's moments and step; SGD's momentum);
- activations: the largest number of bytes saved for backward that were alive at once during a step,
  tracked with `torch.autograd.graph.saved_tensors_hooks` (each storage counted once while any saved
  tensor refers to it; parameters and views of them are weights, not activations). The inputs that a
  checkpointed region keeps to recompute itself are counted too (`count_checkpoint_inputs`).

It leaves out what neither the hooks nor the model states see: temporaries that live within one
operator, communication buffers, weights gathered by ZeRO-3/FSDP for the layer running, the allocator's
fragmentation and the runtime itself (on CPU `buffers` is reported as 0). On CUDA, `buffers` is what the
allocator's peak holds beyond the four accounted parts.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass


def _storages(t: torch.Tensor) -> Iterator[tuple[int, int]]:
    """(data pointer, bytes) of the storages a tensor occupies on this rank.

    Tensor subclasses that wrap others (a DTensor's local shard, the async result of a functional
    collective) have no storage of their own: their inner tensors are counted.
    """
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        for name in names:
            inner = getattr(t, name)
            if isinstance(inner, torch.Tensor):
                yield from _storages(inner)
        return
    if t.device.type == "meta":
        return
    storage = t.untyped_storage()
    if storage.data_ptr() != 0:
        yield storage.data_ptr(), storage.nbytes()


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the storages behind `tensors`, each storage counted once."""
    seen: dict[int, int] = {}
    for t in tensors:
        for ptr, nbytes in _storages(t):
            seen[ptr] = nbytes
    return sum(seen.values())


def parameter_bytes(params: Iterable[nn.Parameter]) -> int:
    return tensor_bytes(params)


def gradient_bytes(params: Iterable[nn.Parameter]) -> int:
    return tensor_bytes(p.grad for p in params if p.grad is not None)


def optimizer_bytes(optimizers: Iterable[torch.optim.Optimizer]) -> int:
    """Bytes of optimizer state (for a ZeroRedundancyOptimizer: the shard this rank holds)."""
    tensors: list[torch.Tensor] = []
    for opt in optimizers:
        inner = getattr(opt, "optim", opt)  # ZeroRedundancyOptimizer keeps its shard's optimizer in .optim
        for state in inner.state.values():
            tensors.extend(v for v in state.values() if isinstance(v, torch.Tensor))
    return tensor_bytes(tensors)


class _Saved:
    """What the pack hook stores: the tensor, and a finalizer that releases its storage's count."""

    __slots__ = ("__weakref__", "tensor")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class SavedTensorTracker:
    """Peak bytes of tensors saved for backward, alive at once (see the module docstring).

    Use as a context manager around forward and backward; `peak_bytes` holds the result.
    """

    active: SavedTensorTracker | None = None  # the tracker whose hooks are installed, if any

    def __init__(self) -> None:
        self.live_bytes = 0
        self.peak_bytes = 0
        self._refs: dict[int, list[int]] = {}  # storage pointer -> [references, bytes]
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _is_weight(self, t: torch.Tensor) -> bool:
        base = t._base if t._base is not None else t
        return isinstance(t, nn.Parameter) or isinstance(base, nn.Parameter)

    def add(self, t: torch.Tensor) -> object | None:
        """Count `t`'s storages as alive until the returned handle is garbage-collected."""
        keys = list(_storages(t))
        if not keys:
            return None
        handle = _Saved(t)
        for ptr, nbytes in keys:
            entry = self._refs.get(ptr)
            if entry is None:
                self._refs[ptr] = [1, nbytes]
                self.live_bytes += nbytes
            else:
                entry[0] += 1
            weakref.finalize(handle, self._release, ptr)
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return handle

    def _release(self, ptr: int) -> None:
        entry = self._refs.get(ptr)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.live_bytes -= entry[1]
            del self._refs[ptr]

    def _pack(self, t: torch.Tensor):
        if self._is_weight(t):
            return t
        handle = self.add(t)
        return handle if handle is not None else t

    @staticmethod
    def _unpack(packed):
        return packed.tensor if isinstance(packed, _Saved) else packed

    def __enter__(self) -> SavedTensorTracker:
        self._hooks.__enter__()
        SavedTensorTracker.active = self
        return self

    def __exit__(self, *exc) -> None:
        SavedTensorTracker.active = None
        self._hooks.__exit__(*exc)


class _KeepForRecompute(torch.autograd.Function):
    """Identity that saves its input for backward, so a tracker sees what a checkpointed region keeps."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def count_checkpoint_inputs(wrapper: nn.Module) -> None:
    """Let a tracker see the inputs a checkpointed region keeps to recompute itself.

    Non-reentrant checkpointing holds its inputs in a closure, not as saved tensors, so the hooks would
    miss them. While a tracker is active, a pre-hook passes them through an identity that saves them
    (the same tensors, no copy); otherwise the hook does nothing.
    """

    def pre_hook(module, args):
        if SavedTensorTracker.active is None or not torch.is_grad_enabled():
            return None
        return tuple(_KeepForRecompute.apply(a) if isinstance(a, torch.Tensor) and a.requires_grad else a for a in args)

    wrapper.register_forward_pre_hook(pre_hook)
