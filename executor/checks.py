"""What `execute` refuses before any process starts, and why.

A plan runs only if the simulator's `bind` accepts it for the workload and cluster, the executor can
run every feature it uses (principle 1: a feature the executor cannot run is refused, never
approximated), the devices are there, and its predicted peak memory fits (unless --force). Every
refusal is a `UserError` (exit status 2) naming the feature and what is supported.
"""

from __future__ import annotations

import os

import torch

from hwmodel.cluster import ClusterSpec
from hwmodel.errors import UserError
from simulator.analytic import evaluate_bound
from simulator.binding import BoundPlan, bind
from simulator.errors import UnsupportedPlan
from simulator.plan import Plan
from workloads.config import WorkloadConfig
from workloads.torch_models import check_executable

SUPPORTED = (
    "supported: tp, pp (gpipe, 1f1b, interleaved), dp with dp_type ddp/zero1/zero2/zero3, sequence_parallel, "
    "recompute none/selective/op-selective/full/every-N/tokenwise (MEMO, with offload), "
    "offload with recompute none or tokenwise, "
    "per-layer tp/sequence_parallel/dp_type (not zero1) and recompute, dtype fp32/bf16, "
    "cp (context parallel) with tp, pp, dp, recompute and MEMO on uniform plans, attention flash/naive, optimizer "
    "adam/sgd, explicit stages (uneven layer counts) with the plan's tp and an even "
    "share of consecutive devices"
)


def _refuse(feature: str, why: str) -> UnsupportedPlan:
    return UnsupportedPlan(f"{feature} cannot be executed: {why}. ({SUPPORTED})")


def device_type_of(cluster: ClusterSpec) -> str:
    """'cuda' for a cluster of GPUs, 'cpu' for CPU devices; refuses mixed kinds."""
    kinds = {g.node.device.kind for g in cluster.node_groups}
    if len(kinds) > 1:
        raise UserError(
            f"cluster {cluster.name!r} mixes device kinds ({', '.join(sorted(kinds))}); execute runs one kind at a time"
        )
    kind = kinds.pop()
    return "cpu" if kind == "cpu" else "cuda"


def check_features(plan: Plan, device_type: str) -> None:
    """Refuse plan features the executor cannot run (raises UnsupportedPlan)."""
    if plan.tasks:
        raise _refuse(
            "plan.tasks (multi-task wavefront schedules)", "the multi-task scheduler is not part of the executor yet"
        )
    if plan.federated is not None:
        raise _refuse(
            "plan.federated (vertical federated parties)", "the federated runtime is not part of the executor yet"
        )
    if plan.model_states is not None and plan.model_states.gpu < 1.0:
        raise _refuse("plan.model_states with CPU/SSD pages", "page-based model-state placement is not implemented yet")
    if plan.cp > 1:
        _check_context_parallel(plan)
    if plan.ep > 1:
        raise _refuse(f"ep={plan.ep} (expert parallel)", "mixture-of-experts models cannot be executed yet")
    if plan.attention == "flash_triton":
        raise _refuse(
            "attention=flash_triton",
            "it names MPT's Triton kernel, which this executor does not ship (the "
            "simulator models it for published runs of that stack); use attention=flash",
        )
    _check_offload(plan, plan.recompute, plan.offload, "")
    if plan.dtype == "fp16":
        raise _refuse(
            "dtype=fp16", "fp16 training needs loss scaling, which this executor does not implement; use bf16 or fp32"
        )
    if plan.grad_reduce_dtype not in (None, "fp32") and plan.dp_type == "zero1":
        raise _refuse(
            f"grad_reduce_dtype={plan.grad_reduce_dtype} with dp_type=zero1",
            "DistributedDataParallel under ZeroRedundancyOptimizer reduces in the parameters' dtype; use "
            "ddp/zero2/zero3",
        )
    if plan.grad_reduce_dtype == "fp16":
        raise _refuse("grad_reduce_dtype=fp16", "use fp32 or bf16")
    for i, layer in enumerate(plan.layers):
        # Per-layer tp / sequence_parallel / dp_type run as mixed layouts (executor.parallel.mixed_layout), except
        # ZeRO-1: DistributedDataParallel + ZeroRedundancyOptimizer hold a whole chunk, not single blocks.
        differs = [
            key
            for key in ("tp", "dp_type", "sequence_parallel")
            if getattr(layer, key) is not None and getattr(layer, key) != getattr(plan, key)
        ]
        if differs and "zero1" in (layer.dp_type, plan.dp_type):
            raise _refuse(
                f"layers[{i}] with {', '.join(f'{k}={getattr(layer, k)}' for k in differs)} and dp_type=zero1",
                "ZeRO-1 (DistributedDataParallel + ZeroRedundancyOptimizer) wraps a whole stage and cannot mix with "
                "per-layer layouts; use zero2 (gradients and optimizer state sharded), ddp or zero3 for these layers",
            )
        _check_offload(
            plan,
            layer.recompute or plan.recompute,
            plan.offload if layer.offload is None else layer.offload,
            f"layers[{i}].",
        )
    if plan.schedule == "interleaved" and plan.pp < 2:
        raise _refuse("schedule=interleaved with pp=1", "ScheduleInterleaved1F1B needs at least two pipeline ranks")
    if plan.tp > 1 and plan.dp_type == "zero1" and (plan.dp or 0) != 1:
        # Measured with torch 2.13 (gloo): DistributedDataParallel cannot hold DTensor parameters (its
        # initial broadcast fails: "aten.cat.default got mixed torch.Tensor and DTensor"), and
        # ZeroRedundancyOptimizer over FSDP2's replicate fails at its parameter broadcast
        # ("c10d.broadcast_.default does not have a sharding strategy registered").
        raise _refuse(
            "dp_type=zero1 with tp > 1",
            "torch's ZeroRedundancyOptimizer and DistributedDataParallel cannot hold tensor-parallel (DTensor) "
            "parameters; use dp_type=zero2 (gradients sharded too) or ddp",
        )


def _check_context_parallel(plan: Plan) -> None:
    """Context parallelism (executor.parallel.context_parallel) composes with tp (and sequence parallel), pp, dp,
    recompute and MEMO on uniform plans; what else it would have to compose with is refused, naming it."""
    cp = f"cp={plan.cp}"
    if plan.layers or plan.stages:
        raise _refuse(f"{cp} with per-layer strategies or explicit stages", "context parallelism runs on uniform plans")
    if plan.batch_split:
        raise _refuse(f"{cp} with batch_split", "uneven replica batches are not combined with context parallelism")
    if plan.dp_type == "zero1":
        raise _refuse(
            f"{cp} with dp_type=zero1",
            "ZeRO-1's DistributedDataParallel averages over the dp group only, not dp x cp; use ddp, zero2 or zero3",
        )


def _check_offload(plan: Plan, recompute: str, offload: float, where: str) -> None:
    """Swapping by token (executor.offload.memo) runs with recompute none (plain swapping) or tokenwise (MEMO)."""
    if offload > 0 and recompute not in ("none", "tokenwise"):
        raise _refuse(
            f"{where}offload={offload:g} with recompute={recompute}",
            "swapping runs with recompute=none (plain swapping) or recompute=tokenwise (MEMO)",
        )
    if (offload > 0 or recompute == "tokenwise") and plan.sequence_parallel:
        raise _refuse(
            f"{where}offload/tokenwise with sequence_parallel",
            "token slices of a sequence-parallel shard are not cut yet; use tp without sequence_parallel",
        )
    if (
        (offload > 0 or recompute == "tokenwise")
        and plan.layers
        and any(
            getattr(layer, k) not in (None, getattr(plan, k))
            for layer in plan.layers
            for k in ("tp", "dp_type", "sequence_parallel")
        )
    ):
        raise _refuse(f"{where}offload/tokenwise with per-layer layouts", "swapping is wired into uniform layouts only")


def check_stages(bound: BoundPlan) -> None:
    """Explicit stages are honoured when they are the default layout with an uneven layer split."""
    plan = bound.plan
    if not plan.stages:
        return
    per_stage = plan.tp * (plan.dp or 1)
    for i, (spec, stage) in enumerate(zip(plan.stages, bound.stages)):
        if (spec.tp or plan.tp) != plan.tp:
            raise _refuse(f"stages[{i}].tp={spec.tp}", "every stage must use the plan's tp")
        expected = list(range(i * per_stage, (i + 1) * per_stage))
        if list(stage.ranks) != expected:
            raise _refuse(
                f"stages[{i}].devices",
                f"each stage must take tp*dp = {per_stage} consecutive devices in order (stage {i}: ranks "
                f"{expected[0]}-{expected[-1]}); got {list(stage.ranks)[:8]}",
            )


def check_pipeline(bound: BoundPlan) -> None:
    plan = bound.plan
    if plan.pp > 1 and plan.schedule in ("1f1b",) and bound.num_micro_batches < plan.pp:
        raise UserError(
            f"schedule=1f1b with pp={plan.pp} needs at least {plan.pp} micro-batches (torch's Schedule1F1B), but "
            f"global_batch / (micro_batch*dp) = {bound.num_micro_batches}; raise global_batch or use schedule=gpipe"
        )


def check_devices(world_size: int, device_type: str, cluster: ClusterSpec) -> list[str]:
    """The devices are there (CUDA) or can be shared (CPU); returns warnings."""
    warnings = []
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(
                f"cluster {cluster.name!r} has GPUs but this machine has no CUDA device; run on a GPU machine or use "
                "a CPU cluster such as cpu-local (--devices-per-node N for N ranks)"
            )
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        if torch.cuda.device_count() < local:
            raise UserError(
                f"the plan needs {local} GPUs on this machine but it has {torch.cuda.device_count()}; use a plan for "
                f"{torch.cuda.device_count()} devices (e.g. --devices-per-node {torch.cuda.device_count()}) or "
                "torchrun across nodes"
            )
    else:
        cores = os.cpu_count() or 1
        if world_size > cores:
            warnings.append(
                f"{world_size} ranks share {cores} CPU cores: they take turns, so times are slower than the plan's "
                "devices"
            )
    return warnings


def check_torchrun(world_size: int) -> None:
    """Under torchrun the rendezvous's world size must be the plan's."""
    env = os.environ.get("WORLD_SIZE")
    if env is not None and int(env) != world_size:
        raise UserError(
            f"torchrun started {env} processes but the plan runs on {world_size} devices; start torchrun with "
            f"--nnodes/--nproc-per-node multiplying to {world_size}, or change the plan"
        )


def admit(plan: Plan, workload: WorkloadConfig, cluster: ClusterSpec, force: bool) -> tuple[BoundPlan, str, list[str]]:
    """Everything checked before a process starts; returns (bound plan, device type, warnings).

    Raises:
        UserError: the workload, plan or machine cannot run this (exit status 2).
    """
    check_executable(workload)
    device_type = device_type_of(cluster)
    check_features(plan, device_type)
    if plan.cp > 1 and workload.seq_len % (2 * plan.cp):
        # The load-balanced split gives each cp rank two of 2*cp equal chunks (executor.parallel.context_parallel).
        raise _refuse(
            f"cp={plan.cp} with seq_len={workload.seq_len}",
            f"the sequence is cut into 2*cp = {2 * plan.cp} equal chunks; use a seq_len divisible by it",
        )
    bound = bind(plan, workload, cluster)
    check_stages(bound)
    check_pipeline(bound)
    world_size = len(bound.ranks)
    check_torchrun(world_size)
    warnings = list(bound.warnings) + check_devices(world_size, device_type, cluster)
    predicted = evaluate_bound(bound)
    if not predicted.fits_memory:
        detail = next((w for w in predicted.warnings if w.startswith("out of memory")), "out of memory")
        if not force:
            raise UserError(
                "the plan is predicted not to fit in device memory "
                f"(peak {predicted.peak_memory_bytes / 2**30:.2f} GiB "
                f"of {predicted.memory_capacity_bytes / 2**30:.2f} GiB: {detail}); change the plan (ZeRO, recompute, "
                "more tp/pp, smaller micro_batch) or pass --force to run it anyway"
            )
        warnings.append(f"running although the plan is predicted not to fit ({detail}) because of --force")
    return bound, device_type, warnings
