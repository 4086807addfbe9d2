"""Chaos run of the executor (issue 20): runs with faults drawn at random, each followed by what a user
would do next (resume, verify), counting faults injected, detected or survived, runs resumed, and whether
every resumed loss curve equals the uninterrupted one bit for bit (CPU, gloo).

Faults: kill a rank at a random step (2 ranks), kill the run inside a checkpoint save (after the data or the
fingerprint, before the manifest: HETPLAN_FAIL_IN_SAVE), corrupt a random byte of a random checkpoint file,
truncate a step's manifest, start a second run on the folder of a running one. A silent corruption is a
resumed run that exits 0 with a curve other than the uninterrupted one, or a damaged checkpoint that
`checkpoint verify` passes.

    PYTHONPATH=. python benchmarks/chaos.py --runs 20 --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

TINY = dict(
    name="tiny-gpt", family="gpt", num_layers=2, hidden_size=32, num_heads=2, vocab_size=128, seq_len=16, dropout=False
)
STEPS = 6
PLANS = {1: "micro_batch=2,global_batch=4,dtype=fp32", 2: "dp=2,micro_batch=2,global_batch=4,dtype=fp32"}
FAULTS = ("kill_rank", "kill_during_checkpoint", "corrupt_file", "truncate_manifest", "two_runs")


def cli(*args, env: dict | None = None, wait: bool = True):
    full = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "executor.cli", *map(str, args)]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full)
    return subprocess.run(cmd, capture_output=True, text=True, env=full, timeout=600)


def base_args(workload: Path, ranks: int) -> list:
    return ["--workload", workload, "--cluster", "cpu-local", "--devices-per-node", ranks, "--plan", PLANS[ranks]]


def train(workload: Path, ranks: int, folder: Path, *extra, env=None, wait=True):
    return cli(
        *base_args(workload, ranks), "--warmup", 0, "--steps", STEPS, "--checkpoint-dir", folder,
        "--checkpoint-every", 1, "--json", *extra, env=env, wait=wait,
    )  # fmt: skip


def resume(workload: Path, ranks: int, folder: Path, baseline: list[float]) -> tuple[bool, bool | None]:
    """(resumed, curve identical) after a fault; identical is None where resume rightly refused (the run had
    finished, or no step verifies: start over) and False for any other failure to resume."""
    proc = train(workload, ranks, folder, "--resume")
    if proc.returncode != 0:
        refused = proc.returncode == 2 and ("already finished" in proc.stderr or "no complete" in proc.stderr)
        return False, None if refused else False
    out = json.loads(proc.stdout)
    return True, out["losses"] == baseline[out["execution"]["first_step"] :]


def damage(folder: Path, rng: random.Random, truncate_manifest: bool) -> Path:
    steps = sorted(p for p in folder.iterdir() if p.name.startswith("step-"))
    step = steps[-1] if rng.random() < 0.7 else rng.choice(steps)
    if truncate_manifest:
        target = step / "manifest.json"
        target.write_bytes(target.read_bytes()[: rng.randrange(1, target.stat().st_size)])
        return target
    files = sorted(p for p in step.rglob("*") if p.is_file() and p.name != "manifest.json")
    target = rng.choice(files)
    data = bytearray(target.read_bytes())
    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    target.write_bytes(bytes(data))
    return target


def one(fault: str, rng: random.Random, workload: Path, baselines: dict, work: Path) -> dict:
    folder = work / "ck"
    row = {"fault": fault, "detected": False, "survived": False, "resumed": False, "identical": None, "silent": False}
    if fault == "kill_rank":
        step, rank = rng.randrange(1, STEPS), rng.randrange(2)
        proc = train(workload, 2, folder, env={"HETPLAN_FAIL_AT_STEP": str(step), "HETPLAN_FAIL_RANK": str(rank)})
        row["detected"] = proc.returncode == 1 and f"rank {rank}" in proc.stderr
        row["resumed"], row["identical"] = resume(workload, 2, folder, baselines[2])
    elif fault == "kill_during_checkpoint":
        step, phase = rng.randrange(1, STEPS + 1), rng.choice(("data", "fingerprint"))
        proc = train(workload, 1, folder, env={"HETPLAN_FAIL_IN_SAVE": f"{step}:{phase}"})
        # The run is dead (SIGKILL: no message of its own); what counts is that the torn step is not taken.
        row["survived"] = proc.returncode == -signal.SIGKILL
        row["resumed"], row["identical"] = resume(workload, 1, folder, baselines[1])
        row["detected"] = row["resumed"] or row["identical"] is None
    elif fault in ("corrupt_file", "truncate_manifest"):
        assert train(workload, 1, folder).returncode == 0
        target = damage(folder, rng, fault == "truncate_manifest")
        verify = cli("checkpoint", "verify", folder)
        row["detected"] = verify.returncode == 2 and target.name in verify.stdout
        row["silent"] = not row["detected"]
        row["resumed"], row["identical"] = resume(workload, 1, folder, baselines[1])
    else:  # two_runs: a long first run, so the second surely starts while it holds the folder
        first = cli(
            *base_args(workload, 1), "--warmup", 0, "--steps", 3000, "--checkpoint-dir", folder,
            "--checkpoint-every", 1000, "--json", wait=False,
        )  # fmt: skip
        while not (folder / ".hetplan.lock").exists() and first.poll() is None:
            time.sleep(0.05)
        second = train(workload, 1, folder)
        out, _ = first.communicate()
        row["detected"] = second.returncode == 2 and "in use by another run" in second.stderr
        row["survived"] = first.returncode == 0 and cli("checkpoint", "verify", folder).returncode == 0
        row["identical"] = first.returncode == 0 and json.loads(out)["losses"][:STEPS] == baselines[1]
    row["silent"] = row["silent"] or row["identical"] is False
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args()
    rng = random.Random(opts.seed)
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        workload = Path(tmp) / "tiny.yaml"
        workload.write_text(yaml.safe_dump(TINY))
        baselines = {}
        for ranks in (1, 2):
            proc = cli(*base_args(workload, ranks), "--warmup", 0, "--steps", STEPS, "--json")
            assert proc.returncode == 0, proc.stderr
            baselines[ranks] = json.loads(proc.stdout)["losses"]
        faults = [FAULTS[i % len(FAULTS)] for i in range(opts.runs)]  # every kind, in a random order
        rng.shuffle(faults)
        rows = []
        for i, fault in enumerate(faults):
            work = Path(tmp) / f"run{i}"
            work.mkdir()
            rows.append(one(fault, rng, workload, baselines, work))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| fault | injected | detected | survived | resumed | resumed curve identical | silent corruptions |")
    print("|---|---|---|---|---|---|---|")
    for fault in (*FAULTS, "all"):
        sel = [r for r in rows if fault in ("all", r["fault"])]
        resumed = [r for r in sel if r["resumed"]]
        print(
            f"| {fault} | {len(sel)} | {sum(r['detected'] for r in sel)} | {sum(r['survived'] for r in sel)} | "
            f"{len(resumed)} | {sum(bool(r['identical']) for r in resumed)}/{len(resumed)} | "
            f"{sum(r['silent'] for r in sel)} |"
        )
    handled = sum(r["detected"] or r["survived"] for r in rows)
    print(f"\nfaults detected or survived: {handled}/{len(rows)}; silent corruptions: {sum(r['silent'] for r in rows)}")


if __name__ == "__main__":
    main()
