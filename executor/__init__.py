"""Run plans on real devices with torch.distributed and measure them (see `execute --help`).

- `cli`: the `execute` command (and `execute calibrate`, from the `calibrate` package).
- `checks`: what is refused before any process starts, and why.
- `job`: the job every rank receives, and the result rank 0 gathers.
- `launch`: one process per rank (spawn), a torchrun rendezvous, or this process; failure watching.
- `parallel/`: the plan applied to the module in one fixed, documented order.
- `runtime`: one rank's training loop, timing and gathering.
- `memory`: what a rank's memory holds (allocator on CUDA, an account on CPU).
- `checkpoint`: torch.distributed.checkpoint save and resume.
- `results`, `render`: the measured Report, and tables.

Features, one package each, all started through `launch`: `calibrate/` (measure this machine into a spec),
`offload/` (MEMO's activation swapping), `vfl/` (the two federated parties over TLS).
"""
