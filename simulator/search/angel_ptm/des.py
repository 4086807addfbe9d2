"""A SimPy model of one GPU's paged iteration, the discrete-event twin of `costs.step_cost`.

Blocks run forward then backward; each block's off-device pages come from SSD (the GPU's share of the node's
drives) and then over its PCIe link, at most `prefetch_depth` blocks ahead of the block computing. Gradients
go down the same link after each backward block; the CPU step (staleness 0) follows the iteration, or
(staleness 1) runs beside the next one, so the step is the longer of the two.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

import simpy

from hwmodel.cluster import NodeSpec
from simulator.plan import ModelStatePlacement
from simulator.search.angel_ptm.costs import StepCost, step_cost
from workloads.config import WorkloadConfig


@dataclass(frozen=True)
class Streams:
    """Per-block seconds of each stream, spread evenly over the 2L block visits of an iteration."""

    visits: int
    compute: float
    pcie: float
    ssd: float


def _streams(cost: StepCost, blocks: int) -> Streams:
    visits = 2 * blocks
    return Streams(visits, cost.compute / visits, cost.pcie / visits, cost.ssd / visits)


def _iteration(env: simpy.Environment, s: Streams, depth: int) -> Generator[simpy.Event, None, None]:
    pcie = simpy.Resource(env, capacity=1)
    ssd = simpy.Resource(env, capacity=1)
    ready = [env.event() for _ in range(s.visits)]
    done = [env.event() for _ in range(s.visits)]

    def fetch(i: int) -> Generator[simpy.Event, None, None]:
        if depth > 0 and i > depth:
            yield done[i - depth - 1]  # the window: at most `depth` blocks ahead of the one computing
        elif depth == 0 and i > 0:
            yield done[i - 1]  # no prefetch: fetch on demand after the previous block
        with ssd.request() as req:
            yield req
            yield env.timeout(s.ssd)
        with pcie.request() as req:
            yield req
            yield env.timeout(s.pcie)
        ready[i].succeed()

    for i in range(s.visits):
        env.process(fetch(i))
    for i in range(s.visits):
        yield ready[i]
        yield env.timeout(s.compute)
        done[i].succeed()


def simulate_step(
    wl: WorkloadConfig, node: NodeSpec, placement: ModelStatePlacement, micro_batch: int, grad_accum: int = 1
) -> float:
    """Seconds of one iteration from the event simulation."""
    cost = step_cost(wl, node, placement, micro_batch, grad_accum)
    env = simpy.Environment()
    env.process(_iteration(env, _streams(cost, wl.num_layers), placement.prefetch_depth))
    env.run()
    body = float(env.now)
    if placement.staleness == 1:
        return max(body, cost.cpu_step)
    return body + cost.cpu_step
