"""A paged training loop: an MLP whose layers' weights live in pages, forward and backward fetching each
layer's pages in the scheduler's order, Adam stepping pages on the CPU; staleness 1 runs step t's update in
a background worker while step t+1 computes with the previous parameters (versioned: the new pages are
installed only when the worker is done)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from executor.paging.manager import PageManager
from executor.paging.store import PageStore, check_page_dir
from hwmodel.errors import UserError
from simulator.search.angel_ptm.schedule import access_order

BETAS = (0.9, 0.999)
EPS = 1e-8


@dataclass(frozen=True)
class MlpShape:
    widths: tuple[int, ...]  # input, hidden..., output

    def layer_shapes(self) -> list[tuple[int, int]]:
        return [(o, i) for i, o in zip(self.widths[:-1], self.widths[1:], strict=True)]


def init_layers(shape: MlpShape, seed: int = 0) -> list[np.ndarray]:
    """Each layer's weight and bias flattened into one page (rows: out, columns: in + 1)."""
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 1 / np.sqrt(i), size=(o, i + 1)).ravel() for o, i in shape.layer_shapes()]


def forward_backward(
    weights: list[np.ndarray], shape: MlpShape, x: np.ndarray, y: np.ndarray, fetch: Callable[[int], np.ndarray]
) -> tuple[float, list[np.ndarray]]:
    """Loss (mean squared error) and per-layer gradients; `fetch(layer)` returns that layer's page."""
    shapes = shape.layer_shapes()
    acts = [x]
    for li, (o, i) in enumerate(shapes):
        w = fetch(li).reshape(o, i + 1)
        z = acts[-1] @ w[:, :i].T + w[:, i]
        acts.append(np.maximum(z, 0) if li < len(shapes) - 1 else z)
    diff = acts[-1] - y
    loss = float((diff**2).mean())
    grad = 2 * diff / diff.size
    grads: list[np.ndarray] = [np.empty(0)] * len(shapes)
    for li in range(len(shapes) - 1, -1, -1):
        o, i = shapes[li]
        w = fetch(li).reshape(o, i + 1)
        if li < len(shapes) - 1:
            grad = grad * (acts[li + 1] > 0)
        g = np.empty((o, i + 1))
        g[:, :i] = grad.T @ acts[li]
        g[:, i] = grad.sum(axis=0)
        grads[li] = g.ravel()
        grad = grad @ w[:, :i]
    return loss, grads


def adam_pages(
    params: list[np.ndarray], grads: list[np.ndarray], moments: list[list[np.ndarray]], step: int, lr: float
) -> list[np.ndarray]:
    """New parameter pages (torch.optim.Adam's formula); moments are updated in place."""
    b1, b2 = BETAS
    out = []
    for p, g, (m, v) in zip(params, grads, moments, strict=True):
        m *= b1
        m += (1 - b1) * g
        v *= b2
        v += (1 - b2) * g * g
        denom = np.sqrt(v) / np.sqrt(1 - b2**step) + EPS
        out.append(p - (lr / (1 - b1**step)) * m / denom)
    return out


def train_paged(
    shape: MlpShape,
    batches: list[tuple[np.ndarray, np.ndarray]],
    page_dir: Path,
    device_budget: int,
    host_pages: int,
    staleness: int = 0,
    lr: float = 1e-2,
    durable: bool = False,
) -> tuple[list[float], list[dict[str, int]]]:
    """Losses per step and the bytes each step moved (h2d, ssd_read, ssd_write).

    With `durable`, every step ends with all states on disk under a new version and a manifest renamed into
    place; a run killed at any point resumes (called again on the same folder) from the last complete step,
    returning the losses of the steps it runs."""
    layers = init_layers(shape)
    if durable and staleness:
        raise UserError("durable (resumable) paging needs staleness 0")
    check_page_dir(page_dir, 2.5 * sum(p.nbytes for p in layers) * (3 if durable else 1))
    start = read_manifest(page_dir) if durable else 0
    mgr = PageManager(layers, device_budget, host_pages, page_dir, version=start, write_initial=start == 0)
    moments = [[np.zeros_like(p), np.zeros_like(p)] for p in layers]
    if start:
        restore(mgr, moments, start)
    order = access_order([1] * len(layers))
    losses, moved = [], []
    pending: Future[list[np.ndarray]] | None = None
    with ThreadPoolExecutor(max_workers=1) as worker:
        for t, (x, y) in enumerate(batches, start=1):
            if t <= start:
                continue
            mgr.counters.reset()
            mgr.begin_step(order)
            loss, grads = forward_backward(layers, shape, x, y, lambda li: mgr.fetch([li])[0])
            losses.append(loss)
            if pending is not None:  # staleness 1: install step t-1's update now that step t has computed
                _install(mgr, pending.result())
            current = [mgr.home(i) for i in range(len(layers))]
            pending = worker.submit(adam_pages, current, grads, moments, t, lr)
            if staleness == 0:
                if durable:
                    commit_step(mgr, pending.result(), moments, t)
                else:
                    _install(mgr, pending.result())
                pending = None
            moved.append(
                {"h2d": mgr.counters.h2d, "ssd_read": mgr.counters.ssd_read, "ssd_write": mgr.counters.ssd_write}
            )
        if pending is not None:
            _install(mgr, pending.result())
    return losses, moved


def _install(mgr: PageManager, new_pages: list[np.ndarray]) -> None:
    for i, page in enumerate(new_pages):
        mgr.put(i, page)


MANIFEST = "step.json"


def read_manifest(page_dir: Path) -> int:
    """The last complete step recorded in `page_dir` (0: none)."""
    file = page_dir / MANIFEST
    if not file.exists():
        return 0
    step: int = json.loads(file.read_text())["step"]
    return step


def _ckpt_names(i: int, t: int) -> tuple[str, str, str]:
    return f"host{i:05d}-v{t}", f"m{i:05d}-v{t}", f"v{i:05d}-v{t}"


def commit_step(mgr: PageManager, new_pages: list[np.ndarray], moments: list[list[np.ndarray]], t: int) -> None:
    """Write step t's states as version t, then the manifest (atomic rename), then drop version t-1. A kill
    before the rename leaves version t-1 whole and named by the manifest."""
    ckpt = PageStore(mgr.page_dir)  # its own counters: checkpoint bytes are not the schedule's traffic
    for i, page in enumerate(new_pages):
        mgr.put(i, page, version=t)
        host_name, m_name, v_name = _ckpt_names(i, t)
        if not mgr.on_ssd(i):
            ckpt.write(host_name, page)
        ckpt.write(m_name, moments[i][0])
        ckpt.write(v_name, moments[i][1])
    tmp = mgr.page_dir / (MANIFEST + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, json.dumps({"step": t}).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, mgr.page_dir / MANIFEST)
    old = mgr.version
    mgr.version = t
    for i in range(len(new_pages)):
        for name in (mgr.name(i, old), *_ckpt_names(i, old)):
            ckpt.path(name).unlink(missing_ok=True)


def restore(mgr: PageManager, moments: list[list[np.ndarray]], t: int) -> None:
    """Host pages and moments of version t back into memory (the SSD pages are read on use)."""
    ckpt = PageStore(mgr.page_dir)
    for i in range(len(moments)):
        host_name, m_name, v_name = _ckpt_names(i, t)
        if not mgr.on_ssd(i):
            mgr.host[i] = ckpt.read(host_name)
        moments[i][0][:] = ckpt.read(m_name)
        moments[i][1][:] = ckpt.read(v_name)
