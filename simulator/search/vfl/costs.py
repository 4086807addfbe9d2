"""Seconds and bytes of one VFL round: the parties' compute from their device specs, the messages from the WAN.

Compute. Each party runs one process on the first device of its site (one CPU process per host, as the
executor runs it). Its work per mini-batch is the workload's operator list, timed with the same roofline as
the training engine (`simulator.cost.compute.op_times`: size-keyed GEMM efficiency, memory-bound
elementwise work and embedding gathers, a per-kernel overhead for every eager op):

- a linear layer forward is one GEMM (bias fused) and its ReLU; backward is the input-gradient GEMM (not for a
  party's first layer), the weight-gradient GEMM, the bias reduction and the ReLU mask;
- the passive embedding is a gather forward and a zero-fill plus scatter-add into a dense gradient backward
  (`nn.Embedding` without `sparse=True`);
- Adam streams every parameter's value, gradient and two moments through memory (read 4, write 3 floats),
  one multi-tensor kernel group per step;
- a local update is the party's forward and backward on cached statistics plus its step; the active party's
  instance weighting adds one more backward of the top model (the fresh gradient it compares with).

The FLOPs, parameters and bytes are the workload's own (`workloads.vfl`), so the simulator and the executor
cannot disagree on what a batch is.

Messages. One direction of the cluster's WAN link between the parties' sites (`ClusterSpec.path`: bandwidth x
efficiency, one-way latency) plus the TLS work at both ends (AES-GCM encrypt and decrypt of the payload).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hwmodel.cluster import ClusterSpec
from hwmodel.errors import UserError
from simulator.cost.compute import op_times, roofline
from simulator.search.vfl.engine import Direction, PartyCompute, TimingModel
from workloads import vfl as wl
from workloads.ops import MATRIX, VECTOR

# AES-GCM with AES-NI on one core encrypts ~1.5-3 GB/s; Python's ssl adds record framing and copies [E].
TLS_BYTES_PER_S = 1.5e9
# Adam reads value, gradient and both moments and writes three of them back, 4 bytes each.
ADAM_BYTES_PER_PARAMETER = 7 * 4
# Eager kernels of one torch.optim.Adam step (foreach implementation): lerp, mul, addcmul, sqrt, div, add...
ADAM_KERNELS_PER_TENSOR = 12
# The fp32 plan dtype: the executor trains VFL models in float32.
DTYPE = "fp32"
FLOAT_BYTES = 4

ACTIVE, PASSIVE = "active", "passive"


@dataclass(frozen=True)
class Ops:
    """Operator arrays for `op_times`."""

    flops: list[float]
    nbytes: list[float]
    kernels: list[float]
    unit: list[int]
    min_dim: list[float]

    @classmethod
    def empty(cls) -> Ops:
        return cls([], [], [], [], [])

    def add(self, flops: float, nbytes: float, kernels: float, unit: int, min_dim: float = 0.0) -> None:
        self.flops.append(flops)
        self.nbytes.append(nbytes)
        self.kernels.append(kernels)
        self.unit.append(unit)
        self.min_dim.append(min_dim)

    def seconds(self, device) -> float:
        if not self.flops:
            return 0.0
        line = roofline(device, DTYPE)
        return float(
            op_times(
                np.array(self.flops, dtype=float),
                np.array(self.nbytes, dtype=float),
                np.array(self.kernels, dtype=float),
                np.array(self.unit, dtype=int),
                np.array(self.min_dim, dtype=float),
                line,
            ).sum()
        )


def _gemm(ops: Ops, m: int, k: int, n: int) -> None:
    ops.add(2.0 * m * k * n, FLOAT_BYTES * (m * k + k * n + m * n), 1, MATRIX, min(m, k, n))


def _elementwise(ops: Ops, elements: int, reads: int = 1, writes: int = 1, kernels: int = 1) -> None:
    ops.add(float(elements), FLOAT_BYTES * elements * (reads + writes), kernels, VECTOR)


def _mlp_forward(ops: Ops, dims: list[tuple[int, int]], batch: int) -> None:
    for n, (i, o) in enumerate(dims):
        _gemm(ops, batch, i, o)
        if n < len(dims) - 1:
            _elementwise(ops, batch * o)  # ReLU


def _mlp_backward(ops: Ops, dims: list[tuple[int, int]], batch: int, first_needs_input_grad: bool) -> None:
    for n, (i, o) in reversed(list(enumerate(dims))):
        if n < len(dims) - 1:
            _elementwise(ops, batch * o, reads=2)  # ReLU mask
        _gemm(ops, i, batch, o)  # weight gradient: x^T @ dy
        _elementwise(ops, batch * o, reads=1, writes=0)  # bias gradient: a reduction over the batch
        if n > 0 or first_needs_input_grad:
            _gemm(ops, batch, o, i)  # input gradient: dy @ W


def _adam(ops: Ops, num_params: int, num_tensors: int) -> None:
    ops.add(
        12.0 * num_params, float(ADAM_BYTES_PER_PARAMETER * num_params), ADAM_KERNELS_PER_TENSOR * num_tensors, VECTOR
    )


def party_ops(cfg: wl.VflWorkloadConfig, party: str, weighting: bool = True) -> tuple[Ops, Ops, Ops]:
    """(fresh forward, fresh backward with the Adam step, one local update) operator lists of a party; a
    weighted local update (CELU-VFL) also computes the instance weights."""
    b = cfg.batch_size
    forward, backward, local = Ops.empty(), Ops.empty(), Ops.empty()
    if party == PASSIVE:
        dims = wl.passive_dims(cfg)
        fields, dim = cfg.passive_num_fields, cfg.passive_embedding_dim
        table = fields * cfg.passive_hash_buckets * dim
        for ops in (forward, local):
            _elementwise(ops, b * fields * dim, kernels=3)  # index offset, gather, flatten
            _mlp_forward(ops, dims, b)
        for ops in (backward, local):
            _mlp_backward(ops, dims, b, first_needs_input_grad=True)  # down to the embedding rows
            _elementwise(ops, table, reads=0, writes=1)  # dense gradient of the table: zero-fill
            _elementwise(ops, b * fields * dim, reads=2, writes=1)  # scatter-add of the rows
            _adam(ops, wl.passive_parameter_count(cfg), 1 + 2 * len(dims))
        if weighting:  # cosine of the Z_B sent and the one the bottom model gives now
            _elementwise(local, b * cfg.interface_dim, reads=2, writes=0, kernels=4)
        return forward, backward, local
    bottom, top = wl.active_dims(cfg), wl.top_dims(cfg)
    for ops in (forward, local):
        _mlp_forward(ops, bottom, b)
        _elementwise(ops, b * (cfg.interface_dim + cfg.active_output_dim), kernels=1)  # concat
        _mlp_forward(ops, top, b)
        _elementwise(ops, b, kernels=3)  # sigmoid cross-entropy loss
    for ops in (backward, local):
        _elementwise(ops, b, kernels=3)  # loss backward
        _mlp_backward(ops, top, b, first_needs_input_grad=True)  # dL/dZ_B is what goes back
        _mlp_backward(ops, bottom, b, first_needs_input_grad=False)
        _adam(ops, wl.active_parameter_count(cfg), 2 * (len(bottom) + len(top)))
    if weighting:  # the fresh dL/dZ_B of the cached batch (one more top backward), compared with the cached one
        _mlp_backward(local, top, b, first_needs_input_grad=True)
        _elementwise(local, b * cfg.interface_dim, reads=2, writes=0, kernels=4)
    return forward, backward, local


def party_compute(
    cfg: wl.VflWorkloadConfig, party: str, device, mode: str = "vanilla", weighting: bool = True
) -> PartyCompute:
    """A party's seconds per batch in `mode`. FedBCD's local steps are unweighted. In CELU-VFL the passive
    party's forward runs without a graph (local updates may change the weights before the gradients come
    back), so its fresh update is a local update: forward again, weights, backward and step."""
    weighted = mode == "celu" and weighting
    forward, backward, local = party_ops(cfg, party, weighted)
    local_s = local.seconds(device)
    backward_s = local_s if (mode == "celu" and party == PASSIVE) else backward.seconds(device)
    return PartyCompute(forward.seconds(device), backward_s, local_s)


def party_ranks(cluster: ClusterSpec, sites: tuple[str, str]) -> tuple[int, int]:
    """The first device of each party's site: (active, passive)."""
    ranks = []
    for site in sites:
        found = [loc.rank for loc in cluster.topology.locations if loc.site == site]
        if not found:
            raise UserError(
                f"party site {site!r} is not a site of cluster {cluster.name!r}; "
                f"its sites are {', '.join(cluster.sites)}"
            )
        ranks.append(found[0])
    return ranks[0], ranks[1]


def default_sites(cluster: ClusterSpec) -> tuple[str, str]:
    """(active, passive) sites when the plan names none: the cluster's first two sites."""
    sites = cluster.sites
    if len(sites) < 2:
        raise UserError(
            f"cluster {cluster.name!r} has one site ({sites[0]}); vertical federated learning needs two parties "
            "at two sites joined by a WAN link (e.g. --cluster two-sites-wan)"
        )
    return sites[0], sites[1]


def direction(cluster: ClusterSpec, src: int, dst: int) -> Direction:
    path = cluster.path(src, dst)
    return Direction(bandwidth=path.bandwidth, latency=path.latency)


def timing_model(
    cfg: wl.VflWorkloadConfig,
    cluster: ClusterSpec,
    sites: tuple[str, str] | None = None,
    mode: str = "vanilla",
    weighting: bool = True,
) -> TimingModel:
    """The round's figures for workload `cfg` in `mode`, the active party at sites[0], the passive at sites[1]."""
    sites = sites or default_sites(cluster)
    active_rank, passive_rank = party_ranks(cluster, sites)
    if active_rank == passive_rank:
        raise UserError(f"the two parties need two sites; got {sites[0]!r} twice")
    fwd_bytes, bwd_bytes = float(wl.activation_bytes(cfg)), float(wl.gradient_bytes(cfg))
    to_active, to_passive = direction(cluster, passive_rank, active_rank), direction(cluster, active_rank, passive_rank)
    return TimingModel(
        active=party_compute(cfg, ACTIVE, cluster.device(active_rank), mode, weighting),
        passive=party_compute(cfg, PASSIVE, cluster.device(passive_rank), mode, weighting),
        forward_bytes=fwd_bytes,
        backward_bytes=bwd_bytes,
        to_active=Direction(to_active.bandwidth, to_active.latency, 2 * fwd_bytes / TLS_BYTES_PER_S),
        to_passive=Direction(to_passive.bandwidth, to_passive.latency, 2 * bwd_bytes / TLS_BYTES_PER_S),
        rounds_per_epoch=wl.batches_per_epoch(cfg),
    )
