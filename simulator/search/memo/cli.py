"""`simulate search memo`: MEMO's swap fraction and layout for a long-context job, beside the baselines;
with --sweep, how the chosen alpha and MFU move with sequence length, PCIe bandwidth or host memory."""

from __future__ import annotations

from pathlib import Path

import typer
import yaml
from rich.console import Console
from rich.table import Table

from hwmodel.catalog import load_cluster
from hwmodel.cli_common import JSON, YAML, check_output, make_console, write_output
from hwmodel.cluster import ClusterSpec
from hwmodel.errors import UserError
from hwmodel.units import format_bytes, parse_quantity
from hwmodel.whatif import with_link_bandwidth
from simulator.errors import InfeasiblePlan
from simulator.report import Report
from simulator.search.memo.search import best_megatron_mfu, search_memo
from simulator.search.render import render_search
from simulator.stacks import STACK_HELP, cluster_with_stack
from workloads.catalog import load_workload

SWEEP_KEYS = ("seq_len", "host_link_bandwidth", "host_memory")


def with_host_memory(cluster: ClusterSpec, memory: float) -> ClusterSpec:
    """Every node with `memory` bytes of host DRAM (what-if)."""
    if memory <= 0:
        raise UserError(f"host_memory must be positive, got {memory}")
    groups = tuple(
        g.model_copy(
            update={"node": g.node.model_copy(update={"host": g.node.host.model_copy(update={"memory": memory})})}
        )
        for g in cluster.node_groups
    )
    return cluster.replaced(node_groups=groups)


def _parse_sweep(text: str) -> tuple[str, list[str]]:
    if "=" not in text:
        raise UserError(f"--sweep: expected key=v1,v2,... with key one of {', '.join(SWEEP_KEYS)}; got {text!r}")
    key, values = (s.strip() for s in text.split("=", 1))
    if key not in SWEEP_KEYS:
        raise UserError(f"--sweep: unknown key {key!r}; accepted: {', '.join(SWEEP_KEYS)}")
    items = [v.strip() for v in values.split(",") if v.strip()]
    if not items:
        raise UserError(f"--sweep {key}: give at least one value")
    return key, items


def sweep_rows(
    workload: str,
    cluster: ClusterSpec,
    seq_len: int | None,
    key: str,
    values: list[str],
    micro_batches: tuple[int, ...],
) -> list[dict]:
    """One row per swept value: chosen alpha, plan, MFU, the best Megatron-style MFU and their ratio."""
    rows = []
    for value in values:
        wl_seq = seq_len
        cl = cluster
        if key == "seq_len":
            try:
                wl_seq = int(value)
            except ValueError:
                raise UserError(f"--sweep seq_len: {value!r} is not an integer number of tokens") from None
        elif key == "host_link_bandwidth":
            cl = with_link_bandwidth(cluster, key, parse_quantity(value, "bandwidth", allow_bare_number=False))
        else:
            cl = with_host_memory(cluster, parse_quantity(value, "bytes", allow_bare_number=False))
        wl = load_workload(workload, wl_seq)
        row: dict = {key: value}
        try:
            result = search_memo(wl, cl, micro_batches, top=1)
        except InfeasiblePlan as exc:
            rows.append({**row, "reason": str(exc)})
            continue
        best = result.best.report
        assert isinstance(best, Report)  # the MEMO planner reports training Reports
        megatron = best_megatron_mfu(result)
        rows.append(
            {
                **row,
                "alpha": result.best.plan.offload,
                "plan": result.best.plan.shorthand(),
                "mfu": best.mfu,
                "megatron_mfu": megatron,
                "ratio": best.mfu / megatron if megatron else None,
                "stall_s": best.time_breakdown_s.offload_stall,
                "host_memory_bytes": best.host_memory_bytes,
                "why": result.details.get("why"),
            }
        )
    return rows


def _render_sweep(rows: list[dict], key: str, console: Console, title: str) -> None:
    table = Table(title=title, title_justify="left")
    for col in (key, "alpha", "MFU", "best Megatron", "ratio", "stall", "host memory", "plan / reason"):
        table.add_column(col, overflow="fold")
    for r in rows:
        if "reason" in r:
            table.add_row(r[key], "-", "-", "-", "-", "-", "-", f"[red]{r['reason']}[/red]")
            continue
        table.add_row(
            r[key],
            f"{r['alpha']:.3f}",
            f"{100 * r['mfu']:.1f}%",
            f"{100 * r['megatron_mfu']:.1f}%" if r["megatron_mfu"] else "-",
            f"{r['ratio']:.2f}x" if r["ratio"] else "-",
            f"{r['stall_s']:.3g} s",
            format_bytes(r["host_memory_bytes"] or 0),
            f"{r['plan']} ({r['why']})",
        )
    console.print(table)


def memo_command(
    workload: str = typer.Option(
        ..., "--workload", "-w", help="Workload name or file (see `simulate workloads list`)."
    ),
    cluster: str = typer.Option(..., "--cluster", "-c", help="Cluster name or YAML file."),
    stack: str | None = typer.Option(None, "--stack", help=STACK_HELP),
    seq_len: int | None = typer.Option(None, "--seq-len", help="Train at this sequence length (tokens)."),
    nodes: int | None = typer.Option(None, "--nodes", "-n", help="Node count for clusters of identical nodes."),
    host_memory: str | None = typer.Option(
        None, "--host-memory", help="What-if: every node with this much host DRAM (e.g. 4TiB)."
    ),
    micro_batch: str = typer.Option("1,2", "--micro-batch", help="Micro-batch sizes to try, comma-separated."),
    top: int = typer.Option(5, "--top", help="Runners-up to list."),
    sweep: str | None = typer.Option(
        None,
        "--sweep",
        help="Re-plan for each value and tabulate alpha and MFU: seq_len=65536,131072 | "
        "host_link_bandwidth=16,32,64GB/s | host_memory=512GiB,1TiB,2TiB.",
    ),
    memory_plan_time: float = typer.Option(
        10.0, "--memory-plan-time", help="CBC time limit (s) for the memory plan of the chosen plan; 0 skips it."
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print the shared search result shape (or the sweep rows) as JSON."
    ),
    out_file: Path | None = typer.Option(
        None,
        "--out",
        help="Write the chosen plan (*.yaml) for `simulate run`/`execute` (and its memory plan beside it, "
        "*.offsets.json).",
    ),
    force: bool = typer.Option(False, "--force", help="Allow --out to replace an existing file."),
) -> None:
    """MEMO: swap a share alpha of every block's activations to host by token and recompute the rest token-wise;
    choose alpha with tp/cp/sequence parallel and micro-batch for the best MFU within device and host memory."""
    import json

    console = make_console()
    try:
        micro_batches = tuple(int(v) for v in micro_batch.split(",") if v.strip())
    except ValueError:
        raise UserError(
            f"--micro-batch: expected comma-separated integers such as 1,2,4; got {micro_batch!r}"
        ) from None
    if top < 1:
        raise UserError(f"--top must be at least 1, got {top}")
    if memory_plan_time < 0:
        raise UserError(f"--memory-plan-time must be 0 (skip) or a positive number of seconds, got {memory_plan_time}")
    if out_file is not None:
        if sweep:
            raise UserError("--out writes one plan; it cannot be combined with --sweep")
        check_output(out_file, "--out", YAML, force)
        check_output(out_file.with_suffix(".offsets.json"), "--out (its memory plan)", JSON, force)
    cl = load_cluster(cluster, nodes)
    if host_memory is not None:
        cl = with_host_memory(cl, parse_quantity(host_memory, "bytes", allow_bare_number=False))
    cl = cluster_with_stack(cl, stack)  # last: a cluster changed after stacking would be stacked again
    if sweep:
        key, values = _parse_sweep(sweep)
        rows = sweep_rows(workload, cl, seq_len, key, values, micro_batches)
        if as_json:
            print(json.dumps(rows, indent=2))
        else:
            _render_sweep(rows, key, console, f"MEMO on {cl.name}: {workload}, sweeping {key}")
        return
    wl = load_workload(workload, seq_len)
    result = search_memo(wl, cl, micro_batches, top=top, memory_plan_time_s=memory_plan_time or None)
    if out_file is not None:
        plan = result.best.plan
        offsets = result.details.get("memory_plan_offsets")
        if offsets is not None and plan.memory_plan is not None:
            # The offsets go beside the plan; the plan names the file.
            offsets_file = out_file.with_suffix(".offsets.json")
            write_output(offsets_file, json.dumps(offsets, indent=1), "--out (its memory plan)", JSON, force)
            plan = plan.model_copy(
                update={"memory_plan": plan.memory_plan.model_copy(update={"offsets": offsets_file.name})}
            )
        write_output(
            out_file,
            yaml.safe_dump({"plan": plan.model_dump(mode="json", exclude_defaults=True)}, sort_keys=False),
            "--out",
            YAML,
            force,
        )
    if as_json:
        print(result.to_json())
        return
    render_search(result, console, f"MEMO on {cl.name}: {wl.name} at {wl.seq_len:,} tokens")
    d = result.details
    console.print(f"alpha = {d['alpha']:.3f}: {d['why']}")
    if d.get("host_memory_bytes"):
        console.print(f"host memory used per node: {format_bytes(d['host_memory_bytes'])}")
    if d.get("memory_plan_peak_bytes") is not None:
        console.print(
            "memory plan (one block's frame, reused by every block): "
            f"peak {format_bytes(d['memory_plan_peak_bytes'])}, "
            f"greedy best-fit {format_bytes(d['memory_plan_greedy_peak_bytes'])}, fragmentation avoided "
            f"{format_bytes(d['fragmentation_avoided_bytes'])} "
            f"({d['memory_plan_status']}, {d['memory_plan_solve_time_s']:.2f} s)"
        )
    best = result.best.report
    assert isinstance(best, Report)
    if best.mfu_causal_in_full is not None and abs(best.mfu_causal_in_full - best.mfu) >= 0.0005:
        console.print(
            f"MFU counts the causal half of each score matrix (what FlashAttention computes; simulator/metrics.py). "
            "Counted in full, as Megatron-LM's formula does, the chosen plan reads "
            f"{100 * best.mfu_causal_in_full:.1f}%."
        )
