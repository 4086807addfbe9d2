"""What the checkpoint manifest costs (issue 20): XXH3-64 of every file of a step, against the time of the
save itself, on gpt3-125m with its Adam state (fp32, one process, DCP to local disk). Also the speed of
the candidate hashes on this machine (why XXH3-64).

    PYTHONPATH=. python benchmarks/checkpoint_checksum.py --repeats 3
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import tempfile
import time
import zlib
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import xxhash

from executor.checkpoint import verify, write_manifest
from workloads.catalog import load_workload
from workloads.torch_models import build_model


def hash_speeds() -> None:
    data = os.urandom(256 << 20)
    print("| hash | GB/s |\n|---|---|")
    for name, fn in (
        ("xxhash.xxh3_64", xxhash.xxh3_64_intdigest),
        ("zlib.crc32", zlib.crc32),
        ("hashlib.sha256", lambda b: hashlib.sha256(b).digest()),
        ("hashlib.blake2b", lambda b: hashlib.blake2b(b).digest()),
    ):
        started = time.perf_counter()
        fn(data)
        print(f"| {name} | {len(data) / (time.perf_counter() - started) / 1e9:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workload", default="gpt3-125m")
    opts = parser.parse_args()
    hash_speeds()
    model = build_model(load_workload(opts.workload), device="cpu")
    opt = torch.optim.Adam(model.parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # creates the moments: the state a checkpoint holds
    state = {"model": model.state_dict(), "optim": opt.state_dict()}
    saves, sums, verifies, size = [], [], [], 0
    with tempfile.TemporaryDirectory(prefix="ckbench-", dir=os.environ.get("CKBENCH_DIR")) as tmp:
        for i in range(opts.repeats):
            path = Path(tmp) / f"step-{i:06d}"
            started = time.perf_counter()
            dcp.save(state, checkpoint_id=str(path), no_dist=True)
            saves.append(time.perf_counter() - started)
            (path / "hetplan.json").write_text("{}")
            started = time.perf_counter()
            write_manifest(path, i)
            sums.append(time.perf_counter() - started)
            started = time.perf_counter()
            assert verify(path) is None
            verifies.append(time.perf_counter() - started)
            size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
            shutil.rmtree(path)
    save, summed = statistics.median(saves), statistics.median(sums)
    print(f"\n{opts.workload}: {size / 1e9:.2f} GB per step, {opts.repeats} saves (median)")
    print("| DCP save s | manifest (XXH3-64 + atomic write) s | manifest / save | verify s |\n|---|---|---|---|")
    print(f"| {save:.2f} | {summed:.2f} | {100 * summed / save:.1f}% | {statistics.median(verifies):.2f} |")


if __name__ == "__main__":
    main()
