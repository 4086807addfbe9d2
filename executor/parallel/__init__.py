"""The plan applied to one rank's module, in one fixed, documented order (`parallelize`).

- `parallelize`: the order (pipeline split, tensor/sequence parallel, context parallel, checkpointing,
  data parallel / ZeRO, materialize) and the rank's layout on the device mesh.
- `tensor_parallel`: DTensor tensor and sequence parallelism of one block, shared by the uniform and the
  per-layer paths.
- `context_parallel`: which tokens a context-parallel rank holds, and attention over gathered keys.
- `mixed_layout`: per-layer layouts (a Galvatron-style plan): each block on its own mesh, activations
  redistributed between them.
"""
