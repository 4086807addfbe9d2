"""Per-layer mixed strategies within a pipeline stage: blocks with their own tp / dp / ZeRO layout.

A Galvatron-style plan gives each block of a stage its own tensor-parallel degree (and with it its
data-parallel degree: the stage's n devices run a block as dp = n / tp replicas of tp ranks), its own
sequence parallelism and its own `dp_type`. This module builds such a stage; `parallelize` calls it
in place of its uniform steps 3a-3d when `is_mixed(bound)` says a plan needs it.

**Activation layouts.** Within a stage of n ranks (stage-local index s = rank mod n; tp innermost, as
`bind` lays ranks out) a layout `(tp, sp)` means: rank s holds micro-step sequences of its dp index
s // tp (a contiguous slice of B * tp / n sequences of the micro-step's B), replicated over its tp
group; with sequence parallelism each tp rank keeps only its chunk s mod tp of the sequence. The
embedding and the head run in the stage's *home* layout (the plan's tp and sequence_parallel), which
the data loader and the loss already assume; every chunk starts and ends in it, so pipeline stages
exchange exactly what a uniform plan would.

**Redistribution.** Where adjacent blocks differ, a forward pre-hook converts the activations (and a
forward hook after the chunk's last block converts back to home), in three autograd steps:

1. leave sequence parallelism: all-gather the sequence over the old tp group (backward: keep one's
   own chunk of the replicated gradient);
2. change the batch split: to a larger tp (fewer replicas) all-gather the batch over the ranks whose
   slices merge; to a smaller tp keep one's own part of the batch (backward: all-gather the gradient);
3. enter sequence parallelism: keep one's sequence chunk (backward: all-gather the gradient chunks).

**Gradient scale.** Each rank's loss is the mean over its own batch slice (as in plain data
parallelism), so in a layout with dp replicas the gradient a rank holds for its activations is dp
times its share of the gradient of the global mean loss; FSDP2's average over the dp group then gives
exactly the single-process parameter gradient. A batch step from dp_a to dp_b replicas therefore
scales the gradient it passes back by dp_a / dp_b, and the whole run trains like one process.

**Model states.** Blocks with dp > 1 get FSDP2 on their own layout's dp mesh (`replicate` for ddp,
`fully_shard` for zero2/zero3, per the block's `dp_type`); blocks with dp = 1 need no reduction (their
tensor-parallel ranks compute identical replicated gradients). The chunk's root (embedding, head, the
tied weight) gets the plan's dp_type on the home dp mesh when home dp > 1, ignoring the parameters of
the blocks that have no data parallelism. ZeRO-1 (DistributedDataParallel + ZeroRedundancyOptimizer
over the whole chunk) cannot mix per layer and is refused by `executor.checks`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from executor.parallel.precision import mixed_precision_policy
from executor.parallel.recompute import apply_recompute
from executor.parallel.tensor_parallel import ModelPart, apply_tensor_parallel
from simulator.binding import EDGE_KINDS, BoundPlan

# ---- which plans need this -------------------------------------------------------------------------


@dataclass(frozen=True)
class ActLayout:
    """How one layer's activations lie over the stage's ranks: tensor-parallel degree and sequence parallel."""

    tp: int
    sp: bool


def home_layout(bound: BoundPlan) -> ActLayout:
    plan = bound.plan
    return ActLayout(plan.tp, bool(plan.sequence_parallel and plan.tp > 1))


def block_strategies(bound: BoundPlan) -> dict[int, tuple[ActLayout, str]]:
    """Block number -> (activation layout, dp_type), as `bind` resolved the plan's per-layer overrides."""
    out: dict[int, tuple[ActLayout, str]] = {}
    for stage in bound.stages:
        for run in stage.runs:
            if run.kind in EDGE_KINDS:
                continue
            for idx in run.indices:
                out[idx - 1] = (ActLayout(run.tp, run.sequence_parallel), run.dp_type)
    return out


def is_mixed(bound: BoundPlan) -> bool:
    """True when some block's tp, sequence parallelism or dp_type differs from the plan's (on stages of
    more than one device: with one, there is nothing to lay out differently)."""
    if len(bound.stages[0].ranks) < 2:
        return False
    home, dp_type = home_layout(bound), bound.plan.dp_type
    return any(layout != home or kind != dp_type for layout, kind in block_strategies(bound).values())


# ---- process groups --------------------------------------------------------------------------------


class MixedMeshes:
    """The device meshes of every tp degree a plan uses, and the groups that regroup batches between them.

    Every rank creates every mesh in the same order (group creation is collective). For degree tp the
    mesh is (pp, n / tp, tp) over all ranks, named ("pp", "dp", "tp"), n the devices of a stage; for
    two degrees small < big the exchange mesh (pp, n / big, big / small, small) has, along "x", the
    ranks whose batch slices merge when going from tp=small to tp=big.
    """

    def __init__(self, device_type: str, pp: int, stage_devices: int, degrees: set[int], home_tp: int, home_mesh):
        from torch.distributed.device_mesh import init_device_mesh

        self.n = stage_devices
        self.meshes = {home_tp: home_mesh}  # the executor's (pp, dp, tp) mesh is the home degree's
        self.exchange = {}
        for tp in sorted(degrees - {home_tp}):
            self.meshes[tp] = init_device_mesh(
                device_type, (pp, stage_devices // tp, tp), mesh_dim_names=("pp", "dp", "tp")
            )
        for small in sorted(degrees):
            for big in sorted(degrees):
                if small < big:
                    shape = (pp, stage_devices // big, big // small, small)
                    mesh = init_device_mesh(device_type, shape, mesh_dim_names=("pp", "dp", "x", "tp"))
                    self.exchange[small, big] = mesh.get_group("x")

    def tp_group(self, tp: int):
        return self.meshes[tp].get_group("tp")


# ---- the redistribution's autograd steps ---------------------------------------------------------------


def _all_gather(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    size = dist.get_world_size(group)
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _chunk(x: torch.Tensor, parts: int, index: int, dim: int) -> torch.Tensor:
    return x.chunk(parts, dim=dim)[index].contiguous()


class _Gather(torch.autograd.Function):
    """Forward: all-gather along `dim`; backward: this rank's chunk of the (replicated) gradient, scaled."""

    @staticmethod
    def forward(ctx, x, group, dim: int, index: int, grad_scale: float):
        ctx.group, ctx.dim, ctx.index, ctx.scale = group, dim, index, grad_scale
        return _all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        part = _chunk(grad, dist.get_world_size(ctx.group), ctx.index, ctx.dim)
        return (part * ctx.scale if ctx.scale != 1.0 else part), None, None, None, None


class _Scatter(torch.autograd.Function):
    """Forward: keep chunk `index` along `dim`; backward: all-gather the gradient chunks, scaled."""

    @staticmethod
    def forward(ctx, x, group, dim: int, index: int, grad_scale: float):
        ctx.group, ctx.dim, ctx.scale = group, dim, grad_scale
        return _chunk(x, dist.get_world_size(group), index, dim)

    @staticmethod
    def backward(ctx, grad):
        full = _all_gather(grad, ctx.group, ctx.dim)
        return (full * ctx.scale if ctx.scale != 1.0 else full), None, None, None, None


def relayout(x: torch.Tensor, src: ActLayout, dst: ActLayout, meshes: MixedMeshes, stage_rank: int) -> torch.Tensor:
    """Activations (batch, seq, hidden) of layout `src` as layout `dst` on stage-local rank `stage_rank`."""
    if src == dst:
        return x
    s = stage_rank
    if src.sp:  # 1. the whole sequence on every tp rank
        x = _Gather.apply(x, meshes.tp_group(src.tp), 1, s % src.tp, 1.0)
    if dst.tp > src.tp:  # 2. fewer, larger batch slices: dp_src / dp_dst = dst.tp / src.tp
        group = meshes.exchange[src.tp, dst.tp]
        x = _Gather.apply(x, group, 0, (s % dst.tp) // src.tp, dst.tp / src.tp)
    elif dst.tp < src.tp:  # more, smaller slices
        group = meshes.exchange[dst.tp, src.tp]
        x = _Scatter.apply(x, group, 0, (s % src.tp) // dst.tp, dst.tp / src.tp)
    if dst.sp:  # 3. this rank's part of the sequence
        x = _Scatter.apply(x, meshes.tp_group(dst.tp), 1, s % dst.tp, 1.0)
    return x


# ---- building a chunk ----------------------------------------------------------------------------------


def _tensor_parallel(part, home: ActLayout, layouts: dict[int, ActLayout], meshes: MixedMeshes) -> None:
    """DTensor tp/sp of the edges in the home layout and of each block in its own (parallelize's split)."""
    groups: dict[ActLayout, list[str]] = {}
    for name in part.blocks:
        groups.setdefault(layouts[int(name)], []).append(name)
    if part.embed is not None or part.head is not None:
        groups.setdefault(home, [])
    for layout, names in groups.items():
        if layout.tp == 1:
            continue
        # A holder that shares the modules: parallelize_module edits them in place, so `part` sees the split.
        holder = ModelPart(
            part.embed if layout == home else None,
            part.head if layout == home else None,
            nn.ModuleDict({name: part.blocks[name] for name in names}),
        )
        apply_tensor_parallel(holder, meshes.meshes[layout.tp]["tp"], layout.sp)


def _data_parallel(
    part,
    home: ActLayout,
    strategies: dict[int, tuple[ActLayout, str]],
    meshes: MixedMeshes,
    plan_dp_type: str,
    dtype: str,
    grad_reduce_dtype: str | None,
) -> bool:
    """FSDP2 per block on its layout's dp mesh, then on the root; True when anything is data parallel."""
    from torch.distributed._composable.replicate_with_fsdp import replicate
    from torch.distributed.fsdp import fully_shard

    mp = mixed_precision_policy(dtype, grad_reduce_dtype)

    def wrap(module: nn.Module, dp_type: str, mesh, ignored: set | None = None) -> None:
        if dp_type == "ddp":
            replicate(module, mesh=mesh, mp_policy=mp, ignored_params=ignored)
        else:
            fully_shard(
                module, mesh=mesh, mp_policy=mp, reshard_after_forward=dp_type == "zero3", ignored_params=ignored
            )

    any_dp = False
    unreduced: set[nn.Parameter] = set()
    for name in list(part.blocks.keys()):
        layout, dp_type = strategies[int(name)]
        if meshes.n // layout.tp > 1:
            wrap(part.blocks[name], dp_type, meshes.meshes[layout.tp]["dp"])
            any_dp = True
        else:
            unreduced.update(part.blocks[name].parameters())
    if meshes.n // home.tp > 1:
        wrap(part, plan_dp_type, meshes.meshes[home.tp]["dp"], unreduced or None)
        any_dp = True
    return any_dp


def _hook_relayouts(part, home: ActLayout, layouts: dict[int, ActLayout], meshes: MixedMeshes, stage_rank: int) -> None:
    """Forward (pre-)hooks that move activations between the blocks' layouts, home at both ends."""
    names = list(part.blocks.keys())
    previous = home
    for name in names:
        current = layouts[int(name)]
        if current != previous:
            src, dst = previous, current

            def pre_hook(module, args, src=src, dst=dst):
                return (relayout(args[0], src, dst, meshes, stage_rank), *args[1:])

            part.blocks[name].register_forward_pre_hook(pre_hook, prepend=True)
        previous = current
    if names and previous != home:
        src = previous

        def post_hook(module, args, output, src=src):
            return relayout(output, src, home, meshes, stage_rank)

        part.blocks[names[-1]].register_forward_hook(post_hook)


def parallelize_chunk(part, bound: BoundPlan, meshes: MixedMeshes, stage_rank: int, recompute_of) -> bool:
    """Steps 3a-3e of `parallelize` for a chunk of a mixed plan; True when FSDP2 holds any of its modules.

    The chunk's module stays `part` (hooks and FSDP2 change it in place); materialize it afterwards.
    """
    plan = bound.plan
    home = home_layout(bound)
    strategies = block_strategies(bound)
    layouts = {b: layout for b, (layout, _) in strategies.items()}
    _tensor_parallel(part, home, layouts, meshes)  # 3a
    part.tie_weights()  # 3b
    apply_recompute(part, recompute_of)  # 3c
    any_dp = _data_parallel(part, home, strategies, meshes, plan.dp_type, plan.dtype, plan.grad_reduce_dtype)  # 3d, 3e
    _hook_relayouts(part, home, layouts, meshes, stage_rank)
    return any_dp


def make_meshes(bound: BoundPlan, device_type: str, home_mesh) -> MixedMeshes:
    """Every rank's meshes for a mixed plan (collective: call on every rank, in the same order).

    `home_mesh` is the executor's (pp, dp, tp) mesh of the plan's own degrees (`Layout.mesh`).
    """
    n = len(bound.stages[0].ranks)
    degrees = {bound.plan.tp} | {layout.tp for layout, _ in block_strategies(bound).values()}
    return MixedMeshes(device_type, len(bound.stages), n, degrees, bound.plan.tp, home_mesh)


__all__ = ["ActLayout", "MixedMeshes", "is_mixed", "make_meshes", "parallelize_chunk", "relayout"]
