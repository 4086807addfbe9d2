"""Analytic cost of a paged iteration on one node: tier bytes, transfer volumes and step time.

Per parameter (mixed-precision Adam, ZeRO paper): 2 B parameters, 2 B gradients, 4 B fp32 master weights and
8 B moments (`simulator.cost.memory.state_bytes`). States are ZeRO-3 sharded over the node's GPUs; each GPU
moves its own shard over its PCIe link, the node's SSD drives are shared by all GPUs, and the CPU step shares
the host's memory bandwidth and cores. With prefetch depth >= 1 transfers overlap compute (the step is the
slowest stream); with depth 0 they serialize. Staleness 1 also hides the CPU update behind the next step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from hwmodel.cluster import NodeSpec
from simulator.cost.compute import layer_times, roofline
from simulator.cost.memory import OPTIMIZER_TRAFFIC, state_bytes
from simulator.errors import InfeasiblePlan
from simulator.plan import ModelStatePlacement
from workloads.config import WorkloadConfig
from workloads.ops import ShardShape
from workloads.transformer import layer_kinds, layer_profile, parameter_count

StateClass = Literal["parameters", "gradients", "master_weights", "moments"]
STATE_CLASSES: tuple[StateClass, ...] = ("parameters", "gradients", "master_weights", "moments")
TIERS = ("gpu", "cpu", "ssd")
# Adam on a CPU core with AVX-512/AVX2 (DeepSpeed CPU-Adam reaches ~1 GFLOP-equivalent param/s per core
# order); ~12 FLOPs per parameter update [E].
ADAM_FLOPS_PER_PARAM = 12.0
CPU_CORE_FLOPS = 16e9
HOST_USABLE = 0.9  # of host DRAM, the rest for the OS, pinned buffers and data loading [E]


def class_bytes_per_param(dtype: str = "bf16") -> dict[str, float]:
    """Bytes per parameter of each state class."""
    per = state_bytes(dtype, "adam")
    master = 4.0 if dtype in ("fp16", "bf16") else 0.0
    return {
        "parameters": per.weights,
        "gradients": per.gradients,
        "master_weights": master,
        "moments": per.optimizer - master,
    }


@dataclass(frozen=True)
class TierBytes:
    """Bytes of model states each tier of the node holds (all GPUs together for `gpu`)."""

    gpu: float
    cpu: float
    ssd: float

    @property
    def total(self) -> float:
        return self.gpu + self.cpu + self.ssd


def tier_bytes(num_params: float, placement: ModelStatePlacement, dtype: str = "bf16") -> TierBytes:
    """Where the node's model state bytes lie under `placement`; they add up to the model states."""
    per = class_bytes_per_param(dtype)
    out = dict.fromkeys(TIERS, 0.0)
    for cls in STATE_CLASSES:
        shares = placement.shares(cls)
        for tier in TIERS:
            out[tier] += num_params * per[cls] * getattr(shares, tier)
    return TierBytes(**out)


@dataclass(frozen=True)
class Working:
    """Device bytes not available to resident pages: activations and the prefetch window of pages."""

    activations: float
    window: float


def working_set(wl: WorkloadConfig, placement: ModelStatePlacement, micro_batch: int, gpus: int) -> Working:
    """Per GPU: checkpointed activations (one hidden state per block, full recompute) plus one block's full
    activations, and the pages of `prefetch_depth + 1` gathered operators (fp16 parameters and gradients).

    Pages are scheduled per operator, as Angel-PTM schedules tensors, so the window is the largest
    operator's weights (the MLP's h x ffn matrix) times the depth, not whole blocks."""
    shape = ShardShape(micro_batch=micro_batch, seq_len=wl.seq_len)
    block = layer_profile(wl, "decoder", shape) if "decoder" in layer_kinds(wl) else None
    tokens = micro_batch * wl.seq_len
    checkpoints = wl.num_layers * tokens * wl.hidden_size * 2.0
    block_act = block.saved_bytes["none"] if block is not None else 0.0
    largest_op = float(wl.hidden_size) * wl.ffn
    window = (placement.prefetch_depth + 1) * largest_op * 4.0  # gathered bf16 weights + their gradients
    return Working(activations=checkpoints + block_act, window=window)


@dataclass(frozen=True)
class StepCost:
    """One iteration's predicted figures (seconds, bytes per GPU unless named per node)."""

    compute: float
    pcie_bytes: float  # per GPU, both directions summed on its link
    pcie: float
    ssd_read_bytes: float  # per node
    ssd_write_bytes: float
    ssd: float
    cpu_step: float
    step: float
    bound: float  # slowest of compute, PCIe and SSD: no plan of this placement runs faster

    @property
    def ssd_bytes(self) -> float:
        return self.ssd_read_bytes + self.ssd_write_bytes


def compute_time(wl: WorkloadConfig, node: NodeSpec, micro_batch: int, dtype: str = "bf16") -> float:
    """Forward + backward + recompute (full) of one micro-batch on one GPU, from the cost model."""
    line = roofline(node.device, dtype)
    shape = ShardShape(micro_batch=micro_batch, seq_len=wl.seq_len)
    total = 0.0
    for kind in layer_kinds(wl):
        t = layer_times(layer_profile(wl, kind, shape), line)
        total += t.forward + t.backward + t.recompute_full
    return total


def check_fits(wl: WorkloadConfig, node: NodeSpec, placement: ModelStatePlacement, micro_batch: int) -> None:
    """Raise InfeasiblePlan naming the tier and the bytes when a tier cannot hold what is placed on it."""
    num_params = float(parameter_count(wl))
    tiers = tier_bytes(num_params, placement)
    gpus = node.num_devices
    work = working_set(wl, placement, micro_batch, gpus)
    gpu_cap = node.device.memory.capacity - node.device.memory.reserved
    gpu_need = tiers.gpu / gpus + work.activations + work.window
    if gpu_need > gpu_cap:
        raise InfeasiblePlan(
            f"GPU tier overflows: {gpu_need / 1e9:.1f} GB per GPU needed ({tiers.gpu / gpus / 1e9:.1f} GB states, "
            f"{(work.activations + work.window) / 1e9:.1f} GB working set), {gpu_cap / 1e9:.1f} GB available"
        )
    host_cap = node.host.memory * HOST_USABLE
    if tiers.cpu > host_cap:
        raise InfeasiblePlan(
            f"host tier overflows: {tiers.cpu / 1e9:.1f} GB of states, {host_cap / 1e9:.1f} GB usable host memory"
        )
    ssd_cap = node.storage.capacity if node.storage is not None else 0.0
    if tiers.ssd > ssd_cap:
        raise InfeasiblePlan(f"SSD tier overflows: {tiers.ssd / 1e9:.1f} GB of states, {ssd_cap / 1e9:.1f} GB of SSD")


def _volumes(num_params: float, placement: ModelStatePlacement) -> tuple[float, float, float]:
    """Node-wide bytes per step: over PCIe (both ways), read from SSD, written to SSD."""
    per = class_bytes_per_param()
    p, g = placement.shares("parameters"), placement.shares("gradients")
    m, v = placement.shares("master_weights"), placement.shares("moments")
    off_p = p.cpu + p.ssd
    pcie = 2 * off_p * num_params * per["parameters"]  # fetched for forward and again for backward
    ssd_read = 2 * p.ssd * num_params * per["parameters"]
    ssd_write = 0.0
    if placement.optimizer != "gpu":
        # Gradients go down to the CPU step; the updated bf16 parameters of GPU-resident pages come back up.
        pcie += num_params * per["gradients"] + p.gpu * num_params * per["parameters"]
        opt = num_params * (m.ssd * per["master_weights"] + v.ssd * per["moments"])
        ssd_read += opt + g.ssd * num_params * per["gradients"]
        ssd_write += opt + p.ssd * num_params * per["parameters"] + g.ssd * num_params * per["gradients"]
    else:
        # A GPU step streams off-device optimizer states up and back down.
        off_opt = num_params * ((m.cpu + m.ssd) * per["master_weights"] + (v.cpu + v.ssd) * per["moments"])
        pcie += 2 * off_opt
        opt_ssd = num_params * (m.ssd * per["master_weights"] + v.ssd * per["moments"])
        ssd_read += opt_ssd
        ssd_write += opt_ssd
    return pcie, ssd_read, ssd_write


def step_cost(
    wl: WorkloadConfig, node: NodeSpec, placement: ModelStatePlacement, micro_batch: int, grad_accum: int = 1
) -> StepCost:
    """The analytic step time of a paged iteration (raises InfeasiblePlan when a tier overflows)."""
    check_fits(wl, node, placement, micro_batch)
    num_params = float(parameter_count(wl))
    gpus = node.num_devices
    compute = grad_accum * compute_time(wl, node, micro_batch)
    pcie_node, ssd_read, ssd_write = _volumes(num_params, placement)
    # Parameters are re-fetched for every micro-batch; the optimizer traffic happens once per step.
    p = placement.shares("parameters")
    refetch = (grad_accum - 1) * 2 * num_params * class_bytes_per_param()["parameters"]
    pcie_node += refetch * (p.cpu + p.ssd)
    ssd_read += refetch * p.ssd
    link = node.host_link
    pcie_bytes = pcie_node / gpus
    pcie = pcie_bytes / (link.bandwidth * link.efficiency)
    storage = node.storage
    ssd = 0.0
    if ssd_read + ssd_write > 0:
        if storage is None:
            raise InfeasiblePlan("SSD tier overflows: the node has no storage in its spec")
        ssd = ssd_read / storage.read_bandwidth + ssd_write / storage.write_bandwidth
    cpu_step = 0.0
    if placement.optimizer != "gpu":
        traffic = OPTIMIZER_TRAFFIC[("adam", True)] * num_params
        cpu_step = max(
            traffic / node.host.memory_bandwidth,
            num_params * ADAM_FLOPS_PER_PARAM / (node.host.num_cores * CPU_CORE_FLOPS),
        )
    bound = max(compute, pcie, ssd)
    body = compute + pcie + ssd if placement.prefetch_depth == 0 else bound
    step = max(body, cpu_step) if placement.staleness == 1 else body + cpu_step
    return StepCost(compute, pcie_bytes, pcie, ssd_read, ssd_write, ssd, cpu_step, step, bound)
