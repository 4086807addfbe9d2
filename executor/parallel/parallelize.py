"""Applying a plan to the workload's module on one rank, in one fixed order.

The order (as torchtitan composes the same PyTorch pieces):

1. **Build on meta.** `workloads.torch_models.build_model(cfg, "meta")`: shapes only, no memory.
2. **Pipeline split.** The bound plan's stages (`simulator.binding.bind`) say which layer indices of
   `layer_kinds` each pipeline stage holds; with `schedule=interleaved` a rank holds `virtual_stages`
   chunks (global stage j on pipeline rank j % pp, as bind and `ScheduleInterleaved1F1B` both number
   them). Each chunk is a deep copy of the meta model with the other layers removed; parameter names
   do not change (`blocks.5...` stays `blocks.5...`).
3. Per chunk:
   a. **Tensor parallel** (tp > 1), DTensor `parallelize_module` on the mesh's `tp` axis: q/k/v and the
      MLP's first linears column-wise, the attention output and the MLP's last linear row-wise (the
      Megatron-LM split), the token embedding vocab-parallel (row-wise), the LM head column-wise with
      a vocabulary-parallel cross-entropy (`loss_parallel`). With **sequence parallel** the norms run
      on sequence shards (`SequenceParallel`), blocks all-gather their input before attention/MLP and
      reduce-scatter their output. (The embedding's output is all-reduced and then split along the
      sequence, since learned positions are added to the full sequence.)
   a'. **Context parallel** (cp > 1, `executor.parallel.context_parallel`): the embedding, the rotary angles and
      the attention cores learn which of each sequence's tokens this rank holds, and attention gathers
      keys and values over the mesh's `cp` axis.
   b. **Tied embeddings** are re-tied after the tensor-parallel split (both halves are sharded the same
      way, along the vocabulary). When a pipeline puts the embedding and the head on different stages,
      each holds a copy; their gradients are summed between the first and the last stage before the
      optimizer step (as Megatron-LM does), so the copies stay equal.
   c. **Activation checkpointing**: `full` wraps each block with `checkpoint_wrapper` (non-reentrant
      `torch.utils.checkpoint`); `selective` wraps the attention core only (scores, softmax, dropout,
      context); per-layer `recompute` overrides of the plan are honoured.
   d. **Data parallel** (dp x cp > 1) on the mesh's `dp` axis, or on `dp` and `cp` flattened into one when
      cp > 1 (context-parallel ranks hold the same weights, so their gradients are averaged too): `ddp` is
      FSDP2's `replicate`; `zero2` is FSDP2 `fully_shard(reshard_after_forward=False)`; `zero3` is
      `fully_shard` resharding after forward; both per block and on the chunk's root. `zero1` is
      `DistributedDataParallel` with a `ZeroRedundancyOptimizer` (optimizer state sharded, gradients
      all-reduced in full).
   e. **Mixed precision**: for `bf16`, FSDP2's `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`
      when FSDP2/replicate hold the chunk, else `torch.autocast(bf16)` around forward; master weights,
      gradients and optimizer state stay fp32 in both. `fp32` runs everything in fp32.
   Plans whose blocks have their own tp, sequence parallelism or dp_type (`plan.layers`, as a
   Galvatron-style search writes them) take `executor.parallel.mixed_layout` for a-e instead: each block is split
   and wrapped on its own layout's mesh, the edges on the plan's, and activations are redistributed
   between layouts in forward and backward.
   f. **Materialize and initialize**: `to_empty` on the device, then every parameter gets the shard a
      rank owns of the full tensor `workloads.torch_models.full_init_tensor` gives for its name, so
      every plan starts from exactly the weights of the single-process model.
4. **Schedule.** pp > 1: a `PipelineStage` per chunk on the `pp` axis's group and `ScheduleGPipe`,
   `Schedule1F1B` or `ScheduleInterleaved1F1B` with the bound number of micro-batches (gradients scaled
   by 1/micro-batches, losses per micro-batch). pp = 1: micro-batches run one after the other with the
   gradient synchronization of data parallelism only on the last one.

The optimizer is AdamW (`adam`) or SGD with momentum (`sgd`) with the fixed hyper-parameters below.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.pipelining.schedules import PipelineScheduleMulti, PipelineScheduleSingle
    from torch.distributed.pipelining.stage import _PipelineStageBase

from executor.offload.memo import apply_offload, arena_for
from executor.parallel import mixed_layout
from executor.parallel.context_parallel import apply_context_parallel
from executor.parallel.precision import DTYPES, mixed_precision_policy
from executor.parallel.recompute import apply_recompute
from executor.parallel.tensor_parallel import apply_tensor_parallel
from simulator.binding import BoundPlan
from workloads.torch_models import CausalLM, build_model, canonical_name, full_init_tensor, loss_fn

# Fixed optimizer hyper-parameters: every plan of a job trains with the same ones.
ADAMW = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
SGD = dict(lr=1e-2, momentum=0.9, weight_decay=0.0)


@dataclass
class Layout:
    """Where this rank sits: its coordinates on the (pp, dp, cp, tp) mesh and the groups it talks in."""

    rank: int
    world_size: int
    pp: int
    dp: int
    tp: int
    pp_rank: int
    dp_rank: int
    tp_rank: int
    mesh: DeviceMesh | None  # with axes ("pp", "dp", "tp"), and "cp" when cp > 1; None for one process
    device: torch.device
    cp: int = 1
    cp_rank: int = 0

    @classmethod
    def of(cls, bound: BoundPlan, rank: int, world_size: int, device: torch.device) -> Layout:
        plan = bound.plan
        pp, dp, cp, tp = plan.pp, plan.dp or 1, plan.cp, plan.tp
        assert pp * dp * cp * tp == world_size, (pp, dp, cp, tp, world_size)
        # bind's rank layout: tp innermost, then cp, then dp, pipeline stages outermost.
        tp_rank, rest = rank % tp, rank // tp
        cp_rank, rest = rest % cp, rest // cp
        dp_rank, pp_rank = rest % dp, rest // dp
        mesh = None
        if world_size > 1:
            from torch.distributed.device_mesh import init_device_mesh

            shape, names = (
                ((pp, dp, cp, tp), ("pp", "dp", "cp", "tp")) if cp > 1 else ((pp, dp, tp), ("pp", "dp", "tp"))
            )
            mesh = init_device_mesh(device.type, shape, mesh_dim_names=names)
        return cls(rank, world_size, pp, dp, tp, pp_rank, dp_rank, tp_rank, mesh, device, cp, cp_rank)

    def group(self, axis: str):
        """The process group of this rank's `axis` ('pp', 'dp', 'cp' or 'tp')."""
        assert self.mesh is not None
        return self.mesh.get_group(axis)

    def submesh(self, axis: str):
        assert self.mesh is not None
        return self.mesh[axis]

    @property
    def grad_replicas(self) -> int:
        """Ranks of one stage holding the same weights, whose gradients are averaged: dp x cp."""
        return self.dp * self.cp

    def grad_mesh(self):
        """The mesh those gradients are averaged over: 'dp', or 'dp' and 'cp' flattened into one axis."""
        if self.cp == 1:
            return self.submesh("dp")
        assert self.mesh is not None
        return self.mesh["dp", "cp"]._flatten("dp_cp")


@dataclass
class Chunk:
    """One pipeline stage's part of the model on this rank."""

    stage_index: int
    indices: list[int]  # layer indices of layer_kinds(cfg)
    module: nn.Module  # the (wrapped) module that runs
    model: CausalLM  # the underlying model part (for names and tying)
    has_embed: bool
    has_head: bool


@dataclass
class RankModel:
    """Everything this rank trains: its chunks, the optimizers and how one iteration runs."""

    layout: Layout
    chunks: list[Chunk]
    optimizers: list[torch.optim.Optimizer]
    num_stages: int
    num_micro_batches: int
    dp_type: str
    uses_fsdp: bool  # FSDP2 fully_shard/replicate hold the chunks (else DDP or nothing)
    autocast_dtype: torch.dtype | None  # autocast around forward (bf16 without FSDP2's policy)
    schedule: PipelineScheduleSingle | PipelineScheduleMulti | None = None  # the pipeline schedule when pp > 1
    tied_group: object | None = None  # first + last stage group that sums the tied embedding's gradients
    tied_params: list[torch.Tensor] = field(default_factory=list)
    token_positions: torch.Tensor | None = None  # the sequence positions this rank holds (cp > 1)

    @property
    def is_first_stage(self) -> bool:
        return any(c.has_embed for c in self.chunks)

    @property
    def is_last_stage(self) -> bool:
        return any(c.has_head for c in self.chunks)

    def parameters(self) -> Iterator[nn.Parameter]:
        seen: set[int] = set()
        for chunk in self.chunks:
            for p in chunk.module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p

    @contextmanager
    def forward_context(self) -> Iterator[None]:
        """What must surround forward and backward: the vocab-parallel loss, autocast."""
        with ExitStack() as stack:
            if self.layout.tp > 1:
                from torch.distributed.tensor.parallel import loss_parallel

                stack.enter_context(loss_parallel())
            if self.autocast_dtype is not None:
                stack.enter_context(torch.autocast(self.layout.device.type, dtype=self.autocast_dtype))
            yield

    def sync_tied_gradients(self) -> None:
        """Sum the tied embedding's gradients of the first and the last pipeline stage."""
        if self.tied_group is None:
            return
        from torch.distributed.tensor import DTensor

        for p in self.tied_params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grad = p.grad
            if isinstance(grad, DTensor):
                weight = cast(DTensor, p)  # a DTensor gradient belongs to a DTensor weight
                if grad.placements != weight.placements:
                    # The vocab-parallel embedding's gradient comes out partial (summed over tp ranks
                    # later); bring it to the weight's own sharding so both stages hold the same shard.
                    grad = grad.redistribute(weight.device_mesh, weight.placements)
                    p.grad = grad
                grad = grad.to_local()
            dist.all_reduce(grad, group=self.tied_group)


# ---- 2. pipeline split ------------------------------------------------------------------------------
def stage_chunks(bound: BoundPlan, pp_rank: int) -> list[tuple[int, list[int]]]:
    """(global stage index, layer indices) of the chunks pipeline rank `pp_rank` holds, in order.

    A bound stage lists runs of layers; consecutive indices form one chunk (the embedding joins the
    first chunk, the head the last). With the interleaved schedule stage `pp_rank` holds chunks
    `pp_rank, pp_rank + pp, ...`.
    """
    stage = bound.stages[pp_rank]
    spans: list[list[int]] = []
    for run in stage.runs:
        idx = list(run.indices)
        if spans and spans[-1][-1] + 1 == idx[0]:
            spans[-1].extend(idx)
        else:
            spans.append(idx)
    pp = len(bound.stages)
    return [(pp_rank + j * pp, span) for j, span in enumerate(spans)]


def split_chunk(whole: CausalLM, indices: list[int]) -> CausalLM:
    """A deep copy of the (meta) model that keeps only the layers at `indices`."""
    part = copy.deepcopy(whole)
    keep = set(indices)
    last = whole.cfg.num_layers + 1
    if 0 not in keep:
        part.embed = None
    for i in range(whole.cfg.num_layers):
        if i + 1 not in keep:
            del part.blocks[str(i)]
    if last not in keep:
        part.head = None
    return part


# ---- 3a. tensor and sequence parallel: executor.parallel.tensor_parallel ---------------------------------
# ---- 3c. activation checkpointing: executor.parallel.recompute -------------------------------------------


# ---- 3d/e. data parallel and mixed precision ----------------------------------------------------------
def apply_fsdp(model: CausalLM, layout: Layout, dp_type: str, dtype: str, grad_reduce_dtype: str | None) -> None:
    """FSDP2: `replicate` for ddp, `fully_shard` for zero2 (keep gathered weights) and zero3 (reshard)."""
    from torch.distributed.fsdp import fully_shard

    mp = mixed_precision_policy(dtype, grad_reduce_dtype)
    dp_mesh = layout.grad_mesh()
    if dp_type == "ddp":
        from torch.distributed._composable.replicate_with_fsdp import replicate

        wrap = lambda m: replicate(m, mesh=dp_mesh, mp_policy=mp)
    else:
        reshard = dp_type == "zero3"
        wrap = lambda m: fully_shard(m, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard)
    # One communication group per block (gathers and reductions overlap the neighbouring blocks'
    # compute); the root takes the embedding, the head and the tied weight they share.
    for name in list(model.blocks.keys()):
        wrap(model.blocks[name])
    wrap(model)


def apply_ddp(model: nn.Module, layout: Layout) -> nn.Module:
    """Classic DistributedDataParallel (for zero1, whose optimizer shards the state)."""
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [layout.device.index] if layout.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, process_group=layout.group("dp"))


# ---- 3f. materialize and initialize ---------------------------------------------------------------------
@torch.no_grad()
def materialize(part: CausalLM, module: nn.Module, device: torch.device, seed: int) -> None:
    """Allocate the chunk on `device` and give every parameter its shard of the seeded full tensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    module.to_empty(device=device)
    part.tie_weights()  # to_empty gives plain parameters new storage per module; ties must be restored
    cfg = part.cfg
    for name, param in module.named_parameters():
        full = full_init_tensor(canonical_name(name, cfg), param.shape, cfg, seed, device)
        if isinstance(param, DTensor):
            # Every rank computes the same full tensor, so each keeps its own shard without communication.
            param.copy_(distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None))
        else:
            param.copy_(full)


def make_optimizer(params: list[nn.Parameter], kind: str, layout: Layout, zero1: bool) -> torch.optim.Optimizer:
    """AdamW (or SGD with momentum) with fixed hyper-parameters; ZeroRedundancyOptimizer for zero1."""
    cls, hyper = (torch.optim.AdamW, ADAMW) if kind == "adam" else (torch.optim.SGD, SGD)
    if zero1:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(params, optimizer_class=cls, process_group=layout.group("dp"), **hyper)
    from torch.distributed.tensor import DTensor

    # Tensor parallelism leaves some parameters plain (learned positions, norms outside sequence
    # parallelism); foreach kernels cannot mix them with DTensors, so each kind gets its own group.
    groups: list[dict[str, Any]] = [
        {"params": [p for p in params if isinstance(p, DTensor)]},
        {"params": [p for p in params if not isinstance(p, DTensor)]},
    ]
    return cls([g for g in groups if g["params"]], foreach=True, **hyper)


# ---- the whole order ----------------------------------------------------------------------------------
def build_rank_model(bound: BoundPlan, layout: Layout, seed: int) -> RankModel:
    """Apply `bound`'s plan to the workload's module for this rank (steps 1-4 of the module docstring)."""
    plan, cfg = bound.plan, bound.workload
    whole = build_model(cfg, "meta", attention=plan.attention)  # 1
    chunks_spec = stage_chunks(bound, layout.pp_rank)  # 2
    recompute = {i: run.recompute for stage in bound.stages for run in stage.runs for i in run.indices}
    offload = {i: run.offload for stage in bound.stages for run in stage.runs for i in run.indices}
    dp_type = plan.dp_type
    use_fsdp = layout.grad_replicas > 1 and dp_type != "zero1"
    use_ddp = layout.grad_replicas > 1 and dp_type == "zero1"  # zero1 with cp > 1 is refused (checks)
    num_stages = len(bound.stages) * plan.virtual_stages
    # Per-layer tp / sequence parallel / dp_type: executor.parallel.mixed_layout does steps 3a-3e for each chunk.
    mixed = mixed_layout.make_meshes(bound, layout.device.type, layout.mesh) if mixed_layout.is_mixed(bound) else None
    chunks: list[Chunk] = []
    token_positions = None
    for stage_index, indices in chunks_spec:
        part = split_chunk(whole, indices)
        if mixed is not None:
            stage_rank = layout.rank % len(bound.stages[0].ranks)
            use_fsdp = mixed_layout.parallelize_chunk(
                part, bound, mixed, stage_rank, lambda block: recompute[block + 1]
            )
            materialize(part, part, layout.device, seed)  # 3f
            chunks.append(Chunk(stage_index, indices, part, part, part.embed is not None, part.head is not None))
            continue
        if layout.tp > 1:  # 3a
            apply_tensor_parallel(part, layout.submesh("tp"), plan.sequence_parallel)
        part.tie_weights()  # 3b
        if layout.cp > 1:  # before recompute wraps the blocks: the positions and the gather live on them
            token_positions = apply_context_parallel(part, layout.group("cp"), layout.cp, layout.cp_rank, layout.device)
        apply_recompute(part, lambda block: recompute[block + 1])  # 3c
        apply_offload(
            part, lambda block: (recompute[block + 1], offload[block + 1]), arena_for(plan, layout.device)
        )  # 3c: MEMO
        module: nn.Module = part
        if use_fsdp:  # 3d, 3e
            apply_fsdp(part, layout, dp_type, plan.dtype, plan.grad_reduce_dtype)
        materialize(part, part, layout.device, seed)  # 3f
        if use_ddp:
            module = apply_ddp(part, layout)
        chunks.append(Chunk(stage_index, indices, module, part, part.embed is not None, part.head is not None))

    zero1 = use_ddp
    optimizers = [make_optimizer(list(c.module.parameters()), plan.optimizer, layout, zero1) for c in chunks]
    autocast = DTYPES[plan.dtype] if plan.dtype != "fp32" and (not use_fsdp or mixed is not None) else None
    rank_model = RankModel(
        layout,
        chunks,
        optimizers,
        num_stages,
        bound.num_micro_batches,
        dp_type,
        use_fsdp,
        autocast,
        token_positions=token_positions,
    )
    if layout.pp > 1:  # 4
        rank_model.schedule = _make_schedule(rank_model, plan.schedule, replica_loss_scale(plan, layout.dp_rank))
        if cfg.tied_embeddings:
            _tie_across_stages(rank_model)
    return rank_model


def replica_sequences(plan, dp_rank: int) -> int:
    """Sequences this data-parallel replica takes per micro-step (`plan.batch_split`, else micro_batch)."""
    return plan.batch_split[dp_rank] if plan.batch_split else plan.micro_batch


def replica_loss_scale(plan, dp_rank: int) -> float:
    """Factor on this replica's mean loss so that the data-parallel average of the gradients (a plain mean
    over dp replicas) is the gradient of the mean over every sequence: dp * its share of the micro-step.
    1 for an even split."""
    if not plan.batch_split:
        return 1.0
    return len(plan.batch_split) * plan.batch_split[dp_rank] / sum(plan.batch_split)


def _make_schedule(
    rank_model: RankModel, schedule: str, loss_scale: float = 1.0
) -> PipelineScheduleSingle | PipelineScheduleMulti:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    layout = rank_model.layout
    group = layout.group("pp")
    # torch types the interleaved schedule's stages as list[_PipelineStageBase] (a list: invariant).
    stages: list[_PipelineStageBase] = [
        PipelineStage(c.module, c.stage_index, rank_model.num_stages, layout.device, group=group)
        for c in rank_model.chunks
    ]
    m = rank_model.num_micro_batches
    scaled = loss_fn if loss_scale == 1.0 else (lambda logits, targets: loss_fn(logits, targets) * loss_scale)
    if schedule == "interleaved":
        return ScheduleInterleaved1F1B(stages, m, loss_fn=scaled, scale_grads=True)
    cls = Schedule1F1B if schedule == "1f1b" else ScheduleGPipe
    return cls(stages[0], m, loss_fn=scaled, scale_grads=True)


def _tie_across_stages(rank_model: RankModel) -> None:
    """Group the first and the last stage of each (dp, cp, tp) coordinate to sum the tied weight's gradients.

    Every rank creates every pair group (new_group is collective), then keeps its own.
    """
    layout = rank_model.layout
    if layout.pp == 2:
        rank_model.tied_group = layout.group("pp")
    per_stage = layout.dp * layout.cp * layout.tp
    mine = rank_model.tied_group
    for offset in range(per_stage if layout.pp > 2 else 0):
        ranks = [offset, (layout.pp - 1) * per_stage + offset]
        group = dist.new_group(ranks)
        if layout.rank in ranks:
            mine = group
    rank_model.tied_group = mine
    for chunk in rank_model.chunks:
        embed, head = chunk.model.embed, chunk.model.head
        if chunk.has_embed and not chunk.has_head:
            assert embed is not None
            rank_model.tied_params.append(embed.tok.weight)
        if chunk.has_head and not chunk.has_embed:
            assert head is not None
            rank_model.tied_params.append(head.lm_head.weight)
