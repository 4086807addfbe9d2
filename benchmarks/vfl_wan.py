"""CELU-VFL against vanilla VFL and FedBCD through a shaped WAN (two network namespaces, each party its own process).

Part 1, convergence, at one link (default 100 Mbit/s, 40 ms round trip): vanilla, FedBCD (R), CELU-VFL (W, R) and
its two ablations (no uniform sampling: the newest cached batch is reused; no weighting: all instance weights 1),
each for the same number of epochs. Reported: training time (evaluation left out), epochs, final test AUC, and
the time to the target AUC = vanilla's final AUC - 0.005 (the first evaluation at or above it; evaluations every
--eval-every rounds). Target of issue 7: CELU-VFL reaches it in at most half of vanilla's wall time.

Part 2, time per epoch of vanilla and CELU-VFL at each --epoch-links setting (default 100 Mbit/s / 40 ms and
1 Gbit/s / 10 ms), one epoch each, for the simulator's prediction to be checked against.

The link: `benchmarks/wan/netns.py` (veth pair between two namespaces; tc netem where the kernel has it,
otherwise tc tbf for the rate plus a delaying TCP relay). Needs root. The parties run
`python -m executor.vfl.cli run` with fresh certificates, exactly as a user would on two hosts.

    # both parts, writes benchmarks/results/vfl_measured.json
    sudo .venv/bin/python benchmarks/vfl_wan.py
    .venv/bin/python benchmarks/vfl_wan.py --part epochs --epoch-links 100mbit/40ms
    .venv/bin/python benchmarks/vfl_wan.py --epochs 1 --set num_samples=50000 --out /tmp/quick.json

Output file (JSON, `--out`, default benchmarks/results/vfl_measured.json):

    {
      "workload": {...VflWorkloadConfig fields...}, "workload_fingerprint": str,
      "created": ISO time, "command": str, "host": {"cpus": int, "load_average_1m": float},
      "link_model": "tc tbf + delay relay" | "tc netem",
      "convergence": {                               # part 1 (absent if not run)
        "bandwidth_bit_s": float, "rtt_s": float, "epochs": int, "target_auc": float,
        "runs": [{"name": str, "mode": "vanilla"|"fedbcd"|"celu", "workset": W, "local_updates": R,
                  "sampling": "uniform"|"latest", "weighting": bool, "rounds": int, "train_time_s": float,
                  "wall_time_s": float, "final_auc": float, "time_to_target_s": float | null,
                  "local_updates_done": int, "max_staleness": int, "epoch_times_s": [float, ...],
                  "evals": [{"round": int, "epoch": float, "train_time_s": float, "auc": float}, ...]}, ...]},
      "epoch_times": [                                # part 2 (absent if not run)
        {"mode": str, "workset": W, "local_updates": R, "bandwidth_bit_s": float, "rtt_s": float,
         "rounds": int, "epoch_time_s": float, "round_time_s": float, "local_updates_done": int}, ...]
    }

R counts every update a batch's statistics feed, the fresh one included (W=1, R=1 is vanilla); `local_updates_done`
counts the cached (non-fresh) updates the active party made. Times are the active party's training clock.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
# Run as a script (python benchmarks/vfl_wan.py): the repository's packages and benchmarks/wan are importable
# only after these lines, hence the imports below them carry noqa: E402.
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks" / "wan"))

from netns import ShapedLink, namespaces_available  # noqa: E402

from executor.vfl.cli import party_command_line  # noqa: E402
from executor.vfl.keys import make_keys  # noqa: E402
from workloads import vfl as wl  # noqa: E402

console = Console(width=150)


def parse_link(text: str) -> tuple[float, float]:
    """'100mbit/40ms' -> (bit/s, round trip s)."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([mg])bit\s*/\s*([\d.]+)\s*ms\s*", text, re.I)
    if not m:
        raise SystemExit(f"link {text!r}: expected RATE/RTT such as 100mbit/40ms or 1gbit/10ms")
    rate = float(m.group(1)) * (1e6 if m.group(2).lower() == "m" else 1e9)
    return rate, float(m.group(3)) / 1e3


def run_pair(link: ShapedLink, certs: Path, args: list[str], timeout: float) -> dict:
    """One run: the active party in its namespace, the passive in the other; returns the active's result."""
    with tempfile.TemporaryDirectory(prefix="vfl-bench-") as tmp:
        result = Path(tmp) / "active.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        active = link.run_in(
            "active",
            party_command_line("active", certs, link.active_listen, [*args, "--quiet", "--out", str(result)]),
            env=env,
            cwd=ROOT,
        )
        time.sleep(0.5)
        passive = link.run_in(
            "passive", party_command_line("passive", certs, link.active_address, [*args, "--quiet"]), env=env, cwd=ROOT
        )
        try:
            codes = (active.wait(timeout=timeout), passive.wait(timeout=60))
        except Exception:
            active.kill()
            passive.kill()
            raise
        if any(codes) or not result.exists():
            raise RuntimeError(f"run {' '.join(args)} failed with exit codes {codes}")
        return json.loads(result.read_text())


def time_to(evals: list[dict], target: float) -> float | None:
    for e in evals:
        if e["auc"] >= target:
            return e["train_time_s"]
    return None


def _save_partial(opts, key: str, value) -> None:
    """Keep what has been measured so far in --out, so an interrupted benchmark still leaves its runs."""
    opts.result[key] = value
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps({**opts.result, "partial": True}, indent=2))


def convergence(certs: Path, opts, common: list[str]) -> dict:
    rate, rtt = parse_link(opts.link)
    per_epoch = wl.batches_per_epoch(opts.workload_cfg)
    eval_every = opts.eval_every or max(1, per_epoch // 8)
    base = [*common, "--epochs", str(opts.epochs), "--eval-every", str(eval_every)]
    configs = [
        ("vanilla", ["--mode", "vanilla"]),
        (f"FedBCD R={opts.fedbcd_r}", ["--mode", "fedbcd", "-W", "1", "-R", str(opts.fedbcd_r)]),
        (f"CELU-VFL W={opts.w} R={opts.r}", ["--mode", "celu", "-W", str(opts.w), "-R", str(opts.r)]),
        (
            "CELU-VFL, no uniform sampling",
            ["--mode", "celu", "-W", str(opts.w), "-R", str(opts.r), "--sampling", "latest"],
        ),
        ("CELU-VFL, no weighting", ["--mode", "celu", "-W", str(opts.w), "-R", str(opts.r), "--no-weighting"]),
    ]
    runs = []
    with ShapedLink(rate, rtt / 2) as link:
        console.print(f"[bold]convergence[/bold]: {link.describe()}")
        for name, extra in configs:
            started = time.perf_counter()
            data = run_pair(link, certs, [*base, *extra], timeout=opts.run_timeout)
            runs.append(
                {
                    "name": name,
                    "mode": data["mode"],
                    "workset": data["workset"],
                    "local_updates": data["local_updates_per_batch"],
                    "sampling": data["sampling"],
                    "weighting": data["weighting"],
                    "rounds": data["rounds"],
                    "train_time_s": data["train_time_s"],
                    "wall_time_s": data["wall_time_s"],
                    "final_auc": data["final_auc"],
                    "local_updates_done": data["local_updates_done"],
                    "max_staleness": data["max_staleness"],
                    "epoch_times_s": data["epoch_times_s"],
                    "evals": data["evals"],
                }
            )
            _save_partial(opts, "convergence_runs_so_far", runs)
            console.print(
                f"  {name}: {data['train_time_s']:.1f} s training, final AUC {data['final_auc']:.4f} "
                f"({time.perf_counter() - started:.0f} s with start-up and evaluation)"
            )
    target = runs[0]["final_auc"] - 0.005
    for run in runs:
        run["time_to_target_s"] = time_to(run["evals"], target)
    return {
        "bandwidth_bit_s": rate,
        "rtt_s": rtt,
        "epochs": opts.epochs,
        "target_auc": target,
        "eval_every": eval_every,
        "runs": runs,
    }


def epoch_times(certs: Path, opts, common: list[str]) -> list[dict]:
    rows = []
    for text in opts.epoch_links:
        rate, rtt = parse_link(text)
        with ShapedLink(rate, rtt / 2) as link:
            console.print(f"[bold]epoch time[/bold]: {link.describe()}")
            for mode, extra in (
                ("vanilla", ["--mode", "vanilla"]),
                ("celu", ["--mode", "celu", "-W", str(opts.w), "-R", str(opts.r)]),
            ):
                for _ in range(opts.repeats):
                    data = run_pair(link, certs, [*common, "--epochs", "1", *extra], timeout=opts.run_timeout)
                    epoch = data["epoch_times_s"][0]
                    rows.append(
                        {
                            "mode": mode,
                            "workset": data["workset"],
                            "local_updates": data["local_updates_per_batch"],
                            "bandwidth_bit_s": rate,
                            "rtt_s": rtt,
                            "rounds": data["rounds"],
                            "epoch_time_s": epoch,
                            "round_time_s": epoch / data["rounds"],
                            "local_updates_done": data["local_updates_done"],
                        }
                    )
                    _save_partial(opts, "epoch_times", rows)
                    console.print(f"  {mode}: {epoch:.1f} s per epoch")
    return rows


def render(result: dict) -> None:
    if "convergence" in result:
        conv = result["convergence"]
        vanilla = conv["runs"][0]
        table = Table(
            title=f"Convergence at {conv['bandwidth_bit_s'] / 1e6:g} Mbit/s, {conv['rtt_s'] * 1e3:g} ms RTT, "
            f"{conv['epochs']} epochs; target AUC {conv['target_auc']:.4f} (vanilla's final - 0.005)"
        )
        for col in (
            "run",
            "training time",
            "epochs",
            "final AUC",
            "time to target",
            "vs vanilla wall time",
            "local updates",
            "max staleness",
        ):
            table.add_column(col, justify="left" if col == "run" else "right")
        for run in conv["runs"]:
            ttt = run["time_to_target_s"]
            table.add_row(
                run["name"],
                f"{run['train_time_s']:.1f} s",
                f"{run['rounds'] / wl.batches_per_epoch(_cfg(result)):.2f}",
                f"{run['final_auc']:.4f}",
                "not reached" if ttt is None else f"{ttt:.1f} s",
                "-" if ttt is None else f"{ttt / vanilla['train_time_s']:.2f}",
                str(run["local_updates_done"]),
                str(run["max_staleness"]),
            )
        console.print(table)
    if result.get("epoch_times"):
        frame = pd.DataFrame(result["epoch_times"])
        frame["link"] = [f"{b / 1e6:g} Mbit/s / {r * 1e3:g} ms" for b, r in zip(frame.bandwidth_bit_s, frame.rtt_s)]
        summary = frame.groupby(["link", "mode"], sort=False).agg(
            W=("workset", "first"),
            R=("local_updates", "first"),
            epoch_time_s=("epoch_time_s", "median"),
            round_time_ms=("round_time_s", lambda s: 1e3 * s.median()),
            runs=("epoch_time_s", "size"),
        )
        console.print(summary.round(2).to_string())


def markdown(result: dict) -> str:
    """The tables of a result file as Markdown (for BENCHMARKS.md)."""
    lines = []
    if "convergence" in result:
        conv = result["convergence"]
        vanilla = conv["runs"][0]
        per_epoch = wl.batches_per_epoch(_cfg(result))
        lines += [
            f"Convergence at {conv['bandwidth_bit_s'] / 1e6:g} Mbit/s, {conv['rtt_s'] * 1e3:g} ms round trip, "
            f"{conv['epochs']} epochs each; target AUC {conv['target_auc']:.4f} = vanilla's final AUC - 0.005; "
            f"AUC evaluated every {conv['eval_every']} rounds (evaluation time left out of the training time)",
            "",
            "| run | training time | epochs | final AUC | time to target | / vanilla's wall time "
            "| / vanilla's time to target | cached updates (active) | max staleness |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for run in conv["runs"]:
            ttt = run["time_to_target_s"]
            rel = "-" if ttt is None else f"{ttt / vanilla['train_time_s']:.2f}"
            rel_t = (
                "-" if ttt is None or not vanilla["time_to_target_s"] else f"{ttt / vanilla['time_to_target_s']:.2f}"
            )
            lines.append(
                f"| {run['name']} | {run['train_time_s']:.1f} s | {run['rounds'] / per_epoch:.2f} | "
                f"{run['final_auc']:.4f} | {'not reached' if ttt is None else f'{ttt:.1f} s'} | {rel} | {rel_t} | "
                f"{run['local_updates_done']} | {run['max_staleness']} |"
            )
        lines.append("")
    if result.get("epoch_times"):
        lines += [
            "Time per epoch (training, one epoch per run; median of runs)",
            "",
            "| link | mode | W | R | epoch time | per round | runs |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        frame = pd.DataFrame(result["epoch_times"])
        for (rate, rtt, mode), group in frame.groupby(["bandwidth_bit_s", "rtt_s", "mode"], sort=False):
            lines.append(
                f"| {rate / 1e6:g} Mbit/s, {rtt * 1e3:g} ms RTT | {mode} | {group.workset.iloc[0]} | "
                f"{group.local_updates.iloc[0]} | {group.epoch_time_s.median():.1f} s | "
                f"{1e3 * group.round_time_s.median():.0f} ms | {len(group)} |"
            )
    return "\n".join(lines)


def _cfg(result: dict) -> wl.VflWorkloadConfig:
    return wl.VflWorkloadConfig(**result["workload"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("all", "convergence", "epochs"), default="all")
    parser.add_argument("--workload", default="vfl-wdl")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="workload field override")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of each convergence run")
    parser.add_argument("--link", default="100mbit/40ms", help="link of the convergence runs")
    parser.add_argument("--epoch-links", nargs="+", default=["100mbit/40ms", "1gbit/10ms"])
    parser.add_argument("-W", dest="w", type=int, default=4, help="CELU-VFL workset size")
    parser.add_argument("-R", dest="r", type=int, default=5, help="CELU-VFL uses per batch (fresh included)")
    parser.add_argument("--fedbcd-r", type=int, default=5)
    parser.add_argument("--eval-every", type=int, default=0, help="rounds between AUC evaluations (default epoch/8)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per epoch-time setting (median reported)")
    parser.add_argument("--run-timeout", type=float, default=1800)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "vfl_measured.json")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--from", dest="from_file", type=Path, help="render this result file instead of measuring")
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    opts = parser.parse_args()
    if opts.from_file is not None:
        result = json.loads(opts.from_file.read_text())
        print(markdown(result)) if opts.markdown else render(result)
        return
    ok, why = namespaces_available()
    if not ok:
        raise SystemExit(f"cannot build the shaped link: {why}")
    if opts.out.exists() and not opts.force:
        raise SystemExit(f"{opts.out} exists; pass --force to replace it or --out another file")
    overrides = {}
    for item in opts.set:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value) if value.replace(".", "", 1).isdigit() else value
    opts.workload_cfg = wl.load_vfl_workload(opts.workload, **overrides)
    common = ["--workload", opts.workload, *[a for item in opts.set for a in ("--set", item)]]
    result = {
        "workload": opts.workload_cfg.model_dump(mode="json"),
        "workload_fingerprint": opts.workload_cfg.fingerprint(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "host": {"cpus": os.cpu_count(), "load_average_1m": os.getloadavg()[0]},
    }
    opts.result = result
    with tempfile.TemporaryDirectory(prefix="vfl-certs-") as tmp:
        certs = Path(tmp)
        make_keys(certs, force=True)
        with ShapedLink(1e9, 0.001) as probe:
            result["link_model"] = "tc netem" if probe.use_netem else "tc tbf + delay relay"
        if opts.part in ("all", "convergence"):
            result["convergence"] = convergence(certs, opts, common)
        if opts.part in ("all", "epochs"):
            result["epoch_times"] = epoch_times(certs, opts, common)
    result.pop("convergence_runs_so_far", None)
    result["host"]["load_average_1m_end"] = os.getloadavg()[0]
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(result, indent=2))
    print(markdown(result)) if opts.markdown else render(result)
    console.print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
