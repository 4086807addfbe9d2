"""`execute calibrate`: measure this machine and write a cluster spec that `simulate` and `execute --compare`
accept.

- `cli`: the command and its progress display.
- `run`: options, orchestration (what runs in which order) and building the spec from the measurements.
- `measure`: what is timed, in rank processes started through `executor.launch`, and the storage probes.
- `fit`: pure functions from measured points to efficiency curves, rates and link figures.
- `framework`: the framework's own costs, fitted from short `execute` runs of probe plans.
"""
