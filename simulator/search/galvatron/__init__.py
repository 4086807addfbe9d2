"""Galvatron-BMW (hybrid parallelism search): per-layer tensor/sequence/data parallelism, ZeRO stage and
recompute under a per-device memory budget, pipeline stages balanced by speed and memory, also over
mixed GPU types.

- `space`: the pruned strategy space of one layer (the candidates), and `SearchSpace`, the part of it a
  search may use.
- `costs`: what one layer costs under one strategy, and what a layout change between layers costs.
- `dp`: the dynamic programs over layers (memory-budgeted) and over stage boundaries.
- `split`: uneven micro-batch splits across replicas of different speeds.
- `search`: the whole search, from configurations to the ranked plans and the baselines.
- `cli`: `simulate search galvatron`.
"""
