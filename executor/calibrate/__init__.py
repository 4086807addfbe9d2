"""`execute calibrate`: measure this machine and write a cluster spec that `simulate` and `execute --compare`
accept.

- `cli`: the command and its progress display.
- `run`: options, orchestration (what runs in which order), writing the files and the printed summary.
- `spec`: the device and cluster specs built from the measurements, with a `sources` text per figure.
- `measure`: what is timed, in rank processes started through `executor.ranks.start_ranks` (the launcher's
  primitive), and the storage probes.
- `fit`: pure functions from measured points to efficiency curves, rates and link figures.
- `framework`: the framework's own costs, fitted from short `execute` runs of probe plans.
"""
