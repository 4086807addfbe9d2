"""Paged training on real page files: losses equal the all-in-memory run (staleness 0) and the one-step-late
reference (staleness 1), bytes moved equal the schedule's prediction, and faults are clear errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from executor.paging.store import CorruptPage, PageStore, check_page_dir
from executor.paging.train import MlpShape, init_layers, train_paged
from hwmodel.errors import UserError
from simulator.search.angel_ptm.schedule import access_order, simulate_belady

SHAPE = MlpShape((8, 16, 16, 16, 4))
LR = 1e-2


def _batches(n: int = 10) -> list[tuple[np.ndarray, np.ndarray]]:
    # One batch seen every step, so that training must lower its loss (a check that updates happen at all).
    rng = np.random.default_rng(1)
    batch = (rng.normal(size=(6, 8)), rng.normal(size=(6, 4)))
    return [batch] * n


def _reference(staleness: int) -> list[float]:
    """All in memory with torch autograd and torch.optim.Adam; staleness 1 computes each step with the
    parameters from before the previous update (the update is applied one step late)."""
    pages = init_layers(SHAPE)
    master = [torch.tensor(p.copy(), dtype=torch.float64, requires_grad=True) for p in pages]
    compute = [m.detach().clone() for m in master]
    opt = torch.optim.Adam(master, lr=LR, betas=(0.9, 0.999), eps=1e-8)
    losses = []
    for x, y in _batches():
        used = [c.clone().requires_grad_(True) for c in compute] if staleness else master
        h = torch.tensor(x)
        shapes = SHAPE.layer_shapes()
        for li, (o, i) in enumerate(shapes):
            w = used[li].view(o, i + 1)
            h = h @ w[:, :i].T + w[:, i]
            if li < len(shapes) - 1:
                h = torch.relu(h)
        loss = ((h - torch.tensor(y)) ** 2).mean()
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        if staleness:
            for m, u in zip(master, used, strict=True):
                m.grad = u.grad
            compute = [m.detach().clone() for m in master]  # next step sees the parameters before this update
        opt.step()
    return losses


@pytest.mark.parametrize("staleness", [0, 1])
def test_losses_equal_reference_with_pages_on_host_and_ssd(tmp_path: Path, staleness: int):
    # 4 layer pages, device room for 2, one on host and three in page files: pages really travel.
    losses, moved = train_paged(SHAPE, _batches(), tmp_path, device_budget=2, host_pages=1, staleness=staleness, lr=LR)
    ref = _reference(staleness)
    np.testing.assert_allclose(losses, ref, rtol=1e-6)
    assert losses[-1] < losses[0]
    if staleness:  # the one-step-late run really is a different trajectory from the synchronous one
        assert not np.allclose(losses, _reference(0), rtol=1e-6)
    # Bytes moved per step, counted by the manager, against the schedule's prediction (Belady on the order).
    page_bytes = [p.nbytes for p in init_layers(SHAPE)]
    traffic = simulate_belady(access_order([1] * 4), 2)
    ssd_pages = [1, 2, 3]
    predicted = {
        "h2d": sum(n * page_bytes[p] for p, n in traffic.per_page.items()),
        # SSD pages are read on each fetch and once more by the CPU optimizer, written once by the update.
        "ssd_read": sum((traffic.per_page.get(p, 0) + 1) * page_bytes[p] for p in ssd_pages),
        "ssd_write": sum(page_bytes[p] for p in ssd_pages),
    }
    assert traffic.fetched > 4  # the budget really forces refetches
    for step in moved[staleness:]:  # staleness 1: step 1 installs no update yet
        for key, value in predicted.items():
            assert step[key] == pytest.approx(value, rel=0.05), key


def test_corrupt_page_is_detected_naming_page_and_file(tmp_path: Path):
    store = PageStore(tmp_path)
    store.write("p00001", np.arange(16.0))
    file = store.path("p00001")
    raw = bytearray(file.read_bytes())
    raw[-3] ^= 0xFF
    file.write_bytes(bytes(raw))
    with pytest.raises(CorruptPage, match=r"page p00001: checksum mismatch in .*p00001\.page"):
        store.read("p00001")


def test_write_is_atomic_old_page_survives_a_failed_write(tmp_path: Path):
    store = PageStore(tmp_path)
    store.write("a", np.ones(4))
    # A crash after the temporary file is written but before the rename leaves the old page whole.
    (tmp_path / "a.tmp").write_bytes(b"half-written")
    np.testing.assert_array_equal(store.read("a"), np.ones(4))


def test_page_dir_errors_before_training(tmp_path: Path):
    file = tmp_path / "f"
    file.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        check_page_dir(file, 1)
    with pytest.raises(UserError, match="MB free"):
        check_page_dir(tmp_path, 1e18)
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        if os.access(ro, os.W_OK):  # root ignores the mode bits
            pytest.skip("running as root: a read-only folder is still writable")
        with pytest.raises(UserError, match="not writable"):
            check_page_dir(ro, 1)
    finally:
        os.chmod(ro, 0o700)


def test_corrupt_page_stops_the_manager_naming_page_and_file(tmp_path: Path):
    from executor.paging.manager import PageManager

    mgr = PageManager([np.arange(8.0) + i for i in range(4)], device_budget=1, host_pages=1, page_dir=tmp_path)
    file = mgr.store.path(mgr.name(2))
    raw = bytearray(file.read_bytes())
    raw[-1] ^= 0x01  # one flipped bit
    file.write_bytes(bytes(raw))
    mgr.begin_step(access_order([1, 1, 1, 1]))
    mgr.fetch([0])
    mgr.fetch([1])
    with pytest.raises(CorruptPage, match=r"page p00002-v0: checksum mismatch in .*p00002-v0\.page"):
        mgr.fetch([2])


def test_execute_paging_cli_errors_exit_2(tmp_path: Path):
    from typer.testing import CliRunner

    from executor.cli import app

    file = tmp_path / "f"
    file.write_text("x")
    # The real entry point: run_app turns the UserError into one line and exit status 2.
    result = subprocess.run(
        [sys.executable, "-m", "executor.cli", "paging", "--page-dir", str(file), "--steps", "1"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2 and "is a file" in result.stderr + result.stdout
    runner = CliRunner()
    ok = runner.invoke(app, ["paging", "--page-dir", str(tmp_path / "pages"), "--steps", "2", "--layers", "3"])
    assert ok.exit_code == 0, ok.output
    assert "step 2: loss" in ok.output


_CHILD = """
import os, signal, sys
from pathlib import Path
import numpy as np
from executor.paging import store
from executor.paging.train import MlpShape, train_paged
writes = {"n": 0}
original = store.PageStore.write
def write(self, name, data):
    # SIGKILL in the middle of step 5's commit: after some of its page files are written, before the manifest.
    if name.endswith("-v5"):
        writes["n"] += 1
        if writes["n"] == 4:
            os.kill(os.getpid(), signal.SIGKILL)
    original(self, name, data)
store.PageStore.write = write
rng = np.random.default_rng(1)
batch = (rng.normal(size=(6, 8)), rng.normal(size=(6, 4)))
train_paged(MlpShape((8, 16, 16, 16, 4)), [batch] * 10, Path(sys.argv[1]), 2, 1, durable=True)
"""


def test_sigkill_during_ssd_write_resumes_from_last_complete_step(tmp_path: Path):
    from executor.paging.train import read_manifest

    pages = tmp_path / "pages"
    child = subprocess.run([sys.executable, "-c", _CHILD, str(pages)], capture_output=True, text=True, check=False)
    assert child.returncode == -9, child.stderr
    assert read_manifest(pages) == 4  # step 5 never completed
    resumed, _ = train_paged(SHAPE, _batches(), pages, 2, 1, durable=True, lr=LR)
    uninterrupted, _ = train_paged(SHAPE, _batches(), tmp_path / "clean", 2, 1, lr=LR)
    assert len(resumed) == 6
    np.testing.assert_allclose(resumed, uninterrupted[4:], rtol=1e-12)
