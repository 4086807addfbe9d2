"""Step time of paged training with pages in real SSD files on this machine, against a prediction from the
storage measured here (page write+fsync and read bandwidth) plus the all-in-memory step time.
Usage: python benchmarks/angel_ptm_ssd.py [page_dir]"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from executor.paging.store import PageStore
from executor.paging.train import MlpShape, init_layers, train_paged

SHAPE = MlpShape((1024,) * 9)  # 8 layers, one 8.4 MB page each
STEPS = 6


def measure_storage(directory: Path, nbytes: int) -> tuple[float, float]:
    """Seconds per byte to write (crash-safe: fsync + rename) and to read (checksummed) one page."""
    directory.mkdir(parents=True, exist_ok=True)
    store = PageStore(directory)
    page = np.random.default_rng(0).normal(size=nbytes // 8)
    t0 = time.perf_counter()
    for i in range(4):
        store.write(f"probe{i}", page)
    t1 = time.perf_counter()
    for i in range(4):
        store.read(f"probe{i}")
    t2 = time.perf_counter()
    for i in range(4):
        store.path(f"probe{i}").unlink()
    return (t1 - t0) / (4 * page.nbytes), (t2 - t1) / (4 * page.nbytes)


def main() -> None:
    base = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="angel-ptm-"))
    rng = np.random.default_rng(1)
    batch = (rng.normal(size=(64, 1024)), rng.normal(size=(64, 1024)))
    batches = [batch] * STEPS
    page_bytes = init_layers(SHAPE)[0].nbytes
    write_s, read_s = measure_storage(base, page_bytes)
    train_paged(SHAPE, batches[:2], base / "warm", device_budget=8, host_pages=8)  # imports, allocator
    t0 = time.perf_counter()
    train_paged(SHAPE, batches, base / "mem", device_budget=8, host_pages=8)
    in_memory = (time.perf_counter() - t0) / STEPS
    print("| device pages | host pages | SSD pages | measured step s | predicted step s | measured/predicted |")
    print("|---|---|---|---|---|---|")
    for device, host in ((8, 8), (3, 4), (3, 2), (2, 0)):
        t0 = time.perf_counter()
        _, moved = train_paged(SHAPE, batches, base / f"d{device}h{host}", device_budget=device, host_pages=host)
        measured = (time.perf_counter() - t0) / STEPS
        reads = np.mean([m["ssd_read"] for m in moved])
        writes = np.mean([m["ssd_write"] for m in moved])
        predicted = in_memory + reads * read_s + writes * write_s
        print(f"| {device} | {host} | {8 - host} | {measured:.3f} | {predicted:.3f} | {measured / predicted:.2f} |")
    print(f"storage measured in {base}: write {1 / write_s / 1e9:.2f} GB/s, read {1 / read_s / 1e9:.2f} GB/s")


if __name__ == "__main__":
    main()
