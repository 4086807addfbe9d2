"""Predicted versus published: the llm-foundry MPT throughput table.

Each row becomes (cluster, workload, plan): the catalog cluster for its GPU type with gpus/8 nodes, the
MPT shape of its columns, and ZeRO-3 data parallelism with the row's micro-batch, gradient accumulation
and activation checkpointing. The prediction's tokens/s is compared with the measured one.
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from pathlib import Path

from hwmodel.catalog import load_cluster
from hwmodel.errors import SpecError
from simulator.analytic import evaluate
from simulator.plan import Plan
from workloads.config import WorkloadConfig

GPU_CLUSTERS = {"a100_40gb": "dgx-a100-40g", "a100_80gb": "dgx-a100-80g", "h100_80gb": "dgx-h100"}
GPUS_PER_NODE = 8
REQUIRED_COLUMNS = (
    "model",
    "hidden_size",
    "num_heads",
    "num_layers",
    "ffn_hidden_size",
    "vocab_size",
    "seq_len",
    "gpus",
    "gpu",
    "micro_batch",
    "grad_accum",
    "global_batch",
    "tokens_per_s",
    "act_ckpt",
)


@dataclass(frozen=True)
class ValidationRow:
    model: str
    gpu: str
    gpus: int
    seq_len: int
    micro_batch: int
    grad_accum: int
    act_ckpt: bool
    measured_tokens_per_s: float
    predicted_tokens_per_s: float
    predicted_mfu: float
    measured_mfu: float | None
    predicted_peak_memory_gib: float
    error_pct: float
    fits_memory: bool = True

    def as_dict(self) -> dict:
        return asdict(self)


def builtin_csv() -> Path:
    return Path(__file__).parent / "data" / "llm_foundry_mfu.csv"


def _bool(text: str) -> bool:
    return text.strip().lower() in ("true", "1", "yes")


def row_inputs(row: dict[str, str], source: str, line: int) -> tuple[WorkloadConfig, str, int, Plan]:
    """The workload, cluster name, node count and plan that reproduce one table row."""
    gpu = row["gpu"].strip()
    if gpu not in GPU_CLUSTERS:
        raise SpecError(f"{source}: line {line}: gpu: {gpu!r} is not one of {', '.join(GPU_CLUSTERS)}")
    for column in (
        "gpus",
        "num_layers",
        "hidden_size",
        "ffn_hidden_size",
        "num_heads",
        "vocab_size",
        "seq_len",
        "micro_batch",
        "global_batch",
        "grad_accum",
        "tokens_per_s",
    ):
        try:
            float(row[column])
        except (TypeError, ValueError):
            raise SpecError(f"{source}: line {line}: {column}: {row[column]!r} is not a number") from None
    try:
        gpus = int(row["gpus"])
        workload = WorkloadConfig(
            name=row["model"],
            family="gpt",
            num_layers=int(row["num_layers"]),
            hidden_size=int(row["hidden_size"]),
            ffn_hidden_size=int(row["ffn_hidden_size"]),
            num_heads=int(row["num_heads"]),
            vocab_size=int(row["vocab_size"]),
            seq_len=int(row["seq_len"]),
            dropout=False,
        )
        micro_batch = int(row["micro_batch"])
        global_batch = int(row["global_batch"])
    except (ValueError, TypeError) as exc:
        raise SpecError(f"{source}: line {line}: {exc}") from None
    if gpus % GPUS_PER_NODE:
        raise SpecError(f"{source}: line {line}: gpus: {gpus} is not a multiple of {GPUS_PER_NODE} GPUs per node")
    plan = Plan(
        dp=gpus,
        dp_type="zero3",
        micro_batch=micro_batch,
        global_batch=global_batch,
        recompute="full" if _bool(row["act_ckpt"]) else "none",
        dtype="bf16",
        # llm-foundry's benchmark runs used MPT's Triton flash attention (submit_benchmarks.py: --attn_impl
        # defaults to triton and sweep.sh does not override it): a slower kernel than FlashAttention-2.
        attention="flash_triton",
    )
    return workload, GPU_CLUSTERS[gpu], gpus // GPUS_PER_NODE, plan


def read_rows(path: Path) -> list[dict[str, str]]:
    return read_table(path, REQUIRED_COLUMNS)


def read_table(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    """The rows of a CSV file that must have the `required` columns and at least one row."""
    if not path.exists():
        raise SpecError(f"{path}: no such file")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise SpecError(f"{path}: missing columns {', '.join(missing)}; needed: {', '.join(required)}")
        rows = list(reader)
    if not rows:
        raise SpecError(f"{path}: the table has a header but no data rows")
    return rows


def validate_llm_foundry(
    path: Path | None = None, progress=None, predict=evaluate, stack: str = "llm-foundry"
) -> list[ValidationRow]:
    """Predict every row of the table at `path` (default: the built-in copy) with `predict(plan,
    workload, cluster) -> Report` (default: the analytic model)."""
    path = path or builtin_csv()
    rows = read_rows(path)
    out = []
    for line, row in enumerate(rows, start=2):
        workload, cluster_name, nodes, plan = row_inputs(row, str(path), line)
        plan = plan.model_copy(update={"stack": stack})
        report = predict(plan, workload, load_cluster(cluster_name, nodes=nodes))
        measured = float(row["tokens_per_s"])
        mfu = row.get("mfu_pct")
        try:
            measured_mfu = float(mfu) / 100 if mfu else None
        except ValueError:
            raise SpecError(f"{path}: line {line}: mfu_pct: {mfu!r} is not a number") from None
        out.append(
            ValidationRow(
                model=row["model"],
                gpu=row["gpu"],
                gpus=int(row["gpus"]),
                seq_len=workload.seq_len,
                micro_batch=plan.micro_batch,
                grad_accum=int(row["grad_accum"]),
                act_ckpt=plan.recompute == "full",
                measured_tokens_per_s=measured,
                predicted_tokens_per_s=report.tokens_per_s,
                # llm-foundry's MFU counts causal attention in full: the prediction in the same convention.
                predicted_mfu=report.mfu_causal_in_full,
                measured_mfu=measured_mfu,
                predicted_peak_memory_gib=report.peak_memory_bytes / 2**30,
                error_pct=100.0 * (report.tokens_per_s - measured) / measured,
                fits_memory=report.fits_memory,
            )
        )
        if progress is not None:
            progress()
    return out


MEGATRON_COLUMNS = (
    "model",
    "num_layers",
    "hidden_size",
    "num_heads",
    "ffn_hidden_size",
    "vocab_size",
    "seq_len",
    "gpus",
    "tp",
    "pp",
    "dp",
    "micro_batch",
    "global_batch",
    "layers_per_virtual_stage",
    "precision",
    "recompute",
    "iteration_time_s",
)
MEGATRON_CLUSTER = "dgx-a100-80g"


def megatron_csv() -> Path:
    return Path(__file__).parent / "data" / "megatron_narayanan2021.csv"


def megatron_inputs(row: dict[str, str], source: str, line: int) -> tuple[WorkloadConfig, int, Plan]:
    """The workload, node count and plan of one row of the Megatron-LM Table 1 set (see its README)."""
    ints = {}
    for column in MEGATRON_COLUMNS:
        if column in ("model", "precision", "recompute", "layers_per_virtual_stage", "iteration_time_s"):
            continue
        try:
            ints[column] = int(row[column])
        except (TypeError, ValueError):
            raise SpecError(f"{source}: line {line}: {column}: {row[column]!r} is not a whole number") from None
    per_chunk = (row.get("layers_per_virtual_stage") or "").strip()
    layers_per_stage = ints["num_layers"] // ints["pp"]
    try:
        chunks = layers_per_stage // int(per_chunk) if per_chunk else 1
    except ValueError:
        raise SpecError(f"{source}: line {line}: layers_per_virtual_stage: {per_chunk!r} is not a number") from None
    if ints["gpus"] % GPUS_PER_NODE:
        raise SpecError(f"{source}: line {line}: gpus: {ints['gpus']} is not a multiple of {GPUS_PER_NODE}")
    try:
        workload = WorkloadConfig(
            name=row["model"],
            family="gpt",
            num_layers=ints["num_layers"],
            hidden_size=ints["hidden_size"],
            ffn_hidden_size=ints["ffn_hidden_size"],
            num_heads=ints["num_heads"],
            vocab_size=ints["vocab_size"],
            seq_len=ints["seq_len"],
            dropout=False,
        )
        plan = Plan(
            tp=ints["tp"],
            pp=ints["pp"],
            dp=ints["dp"],
            micro_batch=ints["micro_batch"],
            global_batch=ints["global_batch"],
            schedule="interleaved" if chunks > 1 else "1f1b",
            virtual_stages=chunks,
            recompute=row["recompute"].strip(),  # checked by the Plan model
            dtype=row["precision"].strip(),  # type: ignore[arg-type]  # checked by the Plan model
            # The 2021 stack materializes the attention scores (no fused kernel): see the set's README.
            attention="naive",
        )
    except (ValueError, TypeError) as exc:
        raise SpecError(f"{source}: line {line}: {exc}".splitlines()[0]) from None
    return workload, ints["gpus"] // GPUS_PER_NODE, plan


def validate_megatron(
    path: Path | None = None, progress=None, predict=evaluate, stack: str = "megatron-lm"
) -> list[ValidationRow]:
    """Predict every row of the Megatron-LM set at `path` (default: the built-in copy of Narayanan et al.
    2021 Table 1) under `stack`, comparing tokens/s (global batch x sequence / iteration time)."""
    path = path or megatron_csv()
    rows = read_table(path, MEGATRON_COLUMNS)
    out = []
    for line, row in enumerate(rows, start=2):
        workload, nodes, plan = megatron_inputs(row, str(path), line)
        plan = plan.model_copy(update={"stack": stack})
        report = predict(plan, workload, load_cluster(MEGATRON_CLUSTER, nodes=nodes))
        try:
            measured_s = float(row["iteration_time_s"])
        except ValueError:
            raise SpecError(
                f"{path}: line {line}: iteration_time_s: {row['iteration_time_s']!r} is not a number"
            ) from None
        measured = (plan.global_batch or 0) * workload.seq_len / measured_s
        out.append(
            ValidationRow(
                model=row["model"],
                gpu="a100_80gb",
                gpus=int(row["gpus"]),
                seq_len=workload.seq_len,
                micro_batch=plan.micro_batch,
                grad_accum=(plan.global_batch or 0) // (plan.micro_batch * (plan.dp or 1)),
                act_ckpt=plan.recompute != "none",
                measured_tokens_per_s=measured,
                predicted_tokens_per_s=report.tokens_per_s,
                predicted_mfu=report.mfu_causal_in_full or report.mfu,
                measured_mfu=None,
                predicted_peak_memory_gib=report.peak_memory_bytes / 2**30,
                error_pct=100.0 * (report.tokens_per_s - measured) / measured,
                fits_memory=report.fits_memory,
            )
        )
        if progress is not None:
            progress()
    return out


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    import pandas as pd

    return float(pd.Series(xs).rank().corr(pd.Series(ys).rank()))


def summarize(rows: list[ValidationRow]) -> dict:
    errors = [abs(r.error_pct) for r in rows]
    return {
        "rows": [r.as_dict() for r in rows],
        "mean_abs_pct_error": sum(errors) / len(errors) if errors else 0.0,
        "max_abs_pct_error": max(errors) if errors else 0.0,
        "spearman": spearman([r.measured_tokens_per_s for r in rows], [r.predicted_tokens_per_s for r in rows]),
        "predicted_not_to_fit": sum(not r.fits_memory for r in rows),
    }
