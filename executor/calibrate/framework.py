"""Measure what the training framework adds around the kernels of parallel plans on a CPU node.

On a GPU the framework's host work (sharded-tensor dispatch, gradient hooks, packing gradients into
communication buffers) runs ahead of the device and hides behind the kernels. On a CPU device it runs on
the same cores as the kernels, so a plan with tensor or data parallelism is slower than its kernels and
collectives alone. This step measures that on a probe model that is not any benchmark's model:

1. With the spec calibrated so far (devices and links), `execute` runs a small GPT (`PROBES`, two
   widths) as one process (one micro-batch of `BATCH` sequences, and `BATCH` micro-batches of one), as
   tensor parallel over every rank and as data parallel over every rank.
2. The simulator predicts the same runs. Its error on the single process says how far the device model
   is off for this model (a ratio); the tensor- and data-parallel runs' time beyond their prediction
   scaled by that ratio is the framework's.
3. `compute.blocking_collectives` is set: FSDP2 issues its collectives without `async_op` and on a CPU
   there is no stream to put them on, so the compute thread waits for each. Four spec fields are fitted by
   the simulator's own sensitivity to them, so the simulator reproduces the measurements with them:
   `compute.layer_call_overhead` (per layer and micro-batch, forward and backward: the single process's
   many small micro-batches against its one large one, the ratio eliminated), `compute.sharded_kernel_overhead`
   (per kernel of a tensor-parallel layer), `compute.grad_pack_bandwidth` and `compute.dp_layer_overhead`
   (per gradient byte and per layer of a gradient reduction, least squares over the two widths, non-negative).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from hwmodel.errors import UserError

if TYPE_CHECKING:
    from workloads.config import WorkloadConfig

# Two widths so the per-byte and per-layer costs of a gradient reduction separate.
PROBES: tuple[dict[str, Any], ...] = (
    {
        "name": "framework-probe-128",
        "family": "gpt",
        "num_layers": 4,
        "hidden_size": 128,
        "num_heads": 4,
        "vocab_size": 1024,
        "seq_len": 64,
        "dropout": False,
        "source": "hetplan calibration probe",
    },
    {
        "name": "framework-probe-384",
        "family": "gpt",
        "num_layers": 4,
        "hidden_size": 384,
        "num_heads": 6,
        "vocab_size": 1024,
        "seq_len": 64,
        "dropout": False,
        "source": "hetplan calibration probe",
    },
)
BATCH = 8  # sequences per iteration in every probe run
FIELDS = ("sharded_kernel_overhead", "grad_pack_bandwidth", "dp_layer_overhead", "layer_call_overhead")
BLOCKING_SOURCE = (
    "set by `execute calibrate` on a CPU: FSDP2 calls its collectives without async_op and a CPU has no "
    "stream to run them on, so the compute thread waits for each "
    "(torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py)"
)


@dataclass
class FrameworkFit:
    sharded_kernel_overhead: float  # seconds per kernel
    grad_pack_bandwidth: float | None  # bytes per second; None when no per-byte cost was seen
    dp_layer_overhead: float  # seconds per layer and reduction
    layer_call_overhead: float = 0.0  # seconds per layer and micro-batch, in forward and again in backward
    rows: list[dict] = field(default_factory=list)  # per probe run: measured, predicted before and after

    def source(self, when: str) -> str:
        runs = ", ".join(f"{r['probe']} {r['plan']} {r['measured_s'] * 1e3:.0f} ms" for r in self.rows)
        return (
            f"measured by `execute calibrate` (framework probes) on {when}: a 4-layer GPT of width 128 and 384 run by "
            f"`execute` as one process (micro-batches of {BATCH} and of 1), tensor parallel and data parallel over "
            f"every rank ({runs}); the time beyond the simulator's prediction (scaled by its single-process error) "
            "fitted by least squares"
        )


def probe_plans(ranks: int) -> dict[str, str]:
    return {
        "single": f"micro_batch={BATCH},global_batch={BATCH},dtype=fp32",
        # The same sequences as BATCH micro-batches of one: BATCH times the framework's per-layer calls.
        "single-mb1": f"micro_batch=1,global_batch={BATCH},dtype=fp32",
        f"tp{ranks}": f"tp={ranks},micro_batch={BATCH},global_batch={BATCH},dtype=fp32",
        f"dp{ranks}": f"dp={ranks},micro_batch={BATCH // ranks},global_batch={BATCH},dtype=fp32",
    }


def _run_execute(workload: Path, spec: Path, ranks: int, plan: str, threads: int, timeout_s: float) -> float:
    """Median iteration time of one `execute` run of the probe."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [
        sys.executable,
        "-m",
        "executor.cli",
        "--workload",
        str(workload),
        "--cluster",
        str(spec),
        "--devices-per-node",
        str(ranks),
        "--plan",
        plan,
        "--steps",
        "5",
        "--warmup",
        "2",
        "--json",
        "--force",
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise UserError(f"framework probe {plan!r} did not finish within {timeout_s:.0f} s") from exc
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise UserError(f"framework probe {plan!r} failed: {' / '.join(tail)}")
    return float(json.loads(done.stdout)["iteration_time_s"])


def _with_fields(spec_mapping: dict, values: dict[str, float | None]) -> dict:
    mapping = json.loads(json.dumps(spec_mapping))
    compute = mapping["node_groups"][0]["node"]["device"]["compute"]
    # FSDP2 on CPU issues its data-parallel collectives synchronously (no streams to overlap them on).
    compute["blocking_collectives"] = True
    for key, value in values.items():
        if value is None:
            compute.pop(key, None)
        else:
            compute[key] = value
    return mapping


def _predictor(spec_mapping: dict[str, Any], workloads: dict[str, WorkloadConfig], ranks: int) -> Predictor:
    """predict(field values, probe name, plan shorthand) -> iteration seconds, on the spec with those fields
    (on one device for the single-process plan, on every rank for the parallel ones)."""
    from hwmodel.cluster import ClusterSpec
    from hwmodel.loading import validate
    from simulator.analytic import evaluate
    from simulator.plan import parse_shorthand

    def predict(values: dict[str, float | None], probe: str, plan: str) -> float:
        fields = {
            "sharded_kernel_overhead": values.get("sharded_kernel_overhead", 0.0),
            "dp_layer_overhead": values.get("dp_layer_overhead", 0.0),
            "layer_call_overhead": values.get("layer_call_overhead", 0.0),
            "grad_pack_bandwidth": values.get("grad_pack_bandwidth"),
        }
        cluster = validate(ClusterSpec, _with_fields(spec_mapping, fields), "framework probe spec")
        cluster = cluster.with_devices_per_node(1 if "tp=" not in plan and "dp=" not in plan else ranks)
        return evaluate(parse_shorthand(plan), workloads[probe], cluster).iteration_time_s

    return predict


# predict(field values, probe name, plan shorthand) -> predicted iteration seconds.
Predictor = Callable[[dict[str, float | None], str, str], float]


def _fit_layer_call(
    measured: dict[tuple[str, str], float], predict: Predictor, plans: dict[str, str], ratio0: dict[str, float]
) -> float:
    """The per layer call cost, from the two single-process runs of each probe.

    Both runs are measured = ratio * predict(o), and the per-call cost also sits in the ratio's own run, so
    eliminate the ratio (m1 / m8 = predict_1(o) / predict_8(o)). Linear in o:
    (ratio0 * c1 - m1 / K8 * c8) * o = m1 - ratio0 * K1, with K the prediction without it, c = d prediction / d o
    and ratio0 = m8 / K8. Least squares over the probes, non-negative."""
    from executor.calibrate.fit import nnls

    call_step = 1e-4  # 100 us: of the order of a Python module call with its autograd work on a CPU
    a_call, b_call = [], []
    for p in ratio0:
        if (p, "single-mb1") not in measured:
            continue
        sens = {}
        for name in ("single", "single-mb1"):
            k = predict({}, p, plans[name])
            sens[name] = (k, (predict({"layer_call_overhead": call_step}, p, plans[name]) - k) / call_step)
        (k8, c8), (k1, c1) = sens["single"], sens["single-mb1"]
        m1 = measured[(p, "single-mb1")]
        a_call.append([(ratio0[p] * c1 - m1 / k8 * c8) * call_step])
        b_call.append(m1 - ratio0[p] * k1)
    return float(nnls(np.array(a_call), np.array(b_call))[0] * call_step) if a_call else 0.0


def _fit_sharded(
    excess: Callable[[str, str], float],
    predict: Predictor,
    base_values: dict[str, float | None],
    plan: tuple[str, str],
    ratio: dict[str, float],
) -> float:
    """Tensor parallel's per-kernel overhead: the prediction is linear in it (median over the probes)."""
    name, shorthand = plan
    step = 1e-4
    estimates = []
    for p in ratio:
        with_step = predict({**base_values, "sharded_kernel_overhead": step}, p, shorthand)
        slope = (with_step - predict(base_values, p, shorthand)) / step
        if slope > 0:
            estimates.append(max(0.0, excess(p, name) / (ratio[p] * slope)))
    return statistics.median(estimates) if estimates else 0.0


def _fit_data_parallel(
    excess: Callable[[str, str], float],
    predict: Predictor,
    base_values: dict[str, float | None],
    plan: tuple[str, str],
    ratio: dict[str, float],
) -> tuple[float, float]:
    """Data parallel's cost per gradient byte (1 / bandwidth) and per layer: sensitivities by finite
    differences, non-negative least squares over the probes."""
    from executor.calibrate.fit import nnls

    name, shorthand = plan
    inv_step, fixed_step = 1e-10, 1e-4  # 10 GB/s and 100 us: of the order seen on CPUs
    a, b = [], []
    for p in ratio:
        base = predict(base_values, p, shorthand)
        d_inv = (predict({**base_values, "grad_pack_bandwidth": 1.0 / inv_step}, p, shorthand) - base) / inv_step
        d_fixed = (predict({**base_values, "dp_layer_overhead": fixed_step}, p, shorthand) - base) / fixed_step
        # In units of the steps, so both columns are seconds and the solver's tolerance fits both.
        a.append([ratio[p] * d_inv * inv_step, ratio[p] * d_fixed * fixed_step])
        b.append(excess(p, name))
    steps_inv, steps_fixed = nnls(np.array(a), np.array(b))
    return float(steps_inv * inv_step), float(steps_fixed * fixed_step)


def fit_framework(measured: dict[tuple[str, str], float], predict: Predictor, ranks: int) -> FrameworkFit:
    """Fit the four fields so the simulator's predictions of the probes meet the measurements.

    `measured[(probe, plan name)]`; plan names as in `probe_plans` ("single-mb1" may be missing: probe times
    logged before it existed; the per-call cost is then 0). Each parallel plan's excess is its measured time
    minus its prediction times the single-process ratio (measured / predicted) of the same probe.
    """
    plans = probe_plans(ranks)
    tp_name, dp_name = f"tp{ranks}", f"dp{ranks}"
    probes = sorted({p for p, _ in measured})
    ratio0 = {p: measured[(p, "single")] / predict({}, p, plans["single"]) for p in probes}
    layer_call = _fit_layer_call(measured, predict, plans, ratio0)
    # Every prediction from here on carries the per-call cost; the ratio is the device model's error alone.
    base_values: dict[str, float | None] = {"layer_call_overhead": layer_call}
    ratio = {p: measured[(p, "single")] / predict(base_values, p, plans["single"]) for p in probes}

    def excess(p: str, name: str) -> float:
        return measured[(p, name)] - ratio[p] * predict(base_values, p, plans[name])

    sharded = _fit_sharded(excess, predict, base_values, (tp_name, plans[tp_name]), ratio)
    inv_bw, fixed = _fit_data_parallel(excess, predict, base_values, (dp_name, plans[dp_name]), ratio)
    fit = FrameworkFit(
        sharded_kernel_overhead=float(sharded),
        grad_pack_bandwidth=float(1.0 / inv_bw) if inv_bw > 1e-15 else None,
        dp_layer_overhead=float(fixed),
        layer_call_overhead=layer_call,
    )
    values = {
        "sharded_kernel_overhead": fit.sharded_kernel_overhead,
        "grad_pack_bandwidth": fit.grad_pack_bandwidth,
        "dp_layer_overhead": fit.dp_layer_overhead,
        "layer_call_overhead": fit.layer_call_overhead,
    }
    for (p, name), seconds in sorted(measured.items()):
        fit.rows.append(
            {
                "probe": p,
                "plan": name,
                "measured_s": seconds,
                "predicted_before_s": ratio0[p] * predict({}, p, plans[name]),
                "predicted_after_s": ratio[p] * predict(values, p, plans[name]),
            }
        )
    return fit


def calibrate_framework(
    spec_mapping: dict, ranks: int, threads: int, advance: Callable[[], None] = lambda: None, timeout_s: float = 300.0
) -> FrameworkFit:
    """Run the probes with `execute` on the spec `spec_mapping` and fit the framework fields."""
    from hwmodel.loading import validate
    from workloads.config import WorkloadConfig

    if ranks < 2:
        raise UserError("the framework probes need at least 2 ranks (tensor and data parallel over them)")
    workloads = {p["name"]: validate(WorkloadConfig, p, "probe") for p in PROBES}
    plans = probe_plans(ranks)
    measured: dict[tuple[str, str], float] = {}
    with tempfile.TemporaryDirectory(prefix="hetplan-framework-") as tmp:
        spec = Path(tmp) / "spec.yaml"
        spec.write_text(yaml.safe_dump(_with_fields(spec_mapping, dict.fromkeys(FIELDS)), sort_keys=False))
        for probe in PROBES:
            workload = Path(tmp) / f"{probe['name']}.yaml"
            workload.write_text(yaml.safe_dump(probe, sort_keys=False))
            for name, plan in plans.items():
                processes = 1 if name.startswith("single") else ranks
                measured[(probe["name"], name)] = _run_execute(workload, spec, processes, plan, threads, timeout_s)
                advance()
    if os.environ.get("HETPLAN_FRAMEWORK_LOG"):  # keep the raw probe times for re-fitting
        Path(os.environ["HETPLAN_FRAMEWORK_LOG"]).write_text(
            json.dumps({f"{p}|{n}": t for (p, n), t in measured.items()})
        )
    return fit_framework(measured, _predictor(spec_mapping, workloads, ranks), ranks)


def fit_measured(spec_mapping: dict, measured: dict[tuple[str, str], float], ranks: int) -> FrameworkFit:
    """Fit from probe times measured earlier (for tests and re-fitting)."""
    from hwmodel.loading import validate
    from workloads.config import WorkloadConfig

    workloads = {p["name"]: validate(WorkloadConfig, p, "probe") for p in PROBES}
    return fit_framework(measured, _predictor(spec_mapping, workloads, ranks), ranks)


def probe_count() -> int:
    return len(PROBES) * len(probe_plans(2))
