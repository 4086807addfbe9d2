"""The two parties' training loops: vanilla VFL, FedBCD and CELU-VFL over a `Channel`.

Each round r (epoch r // batches_per_epoch, batch r % batches_per_epoch of that epoch's shared order):

    passive  Z_B = bottom_B(x_B)                -> ACTIVATIONS(r) ->
    active   loss(top(Z_B, bottom_A(x_A)), y)   <- GRADIENTS(r) = dL/dZ_B <-   (and its own update)
    passive  backward of Z_B with dL/dZ_B, update

Modes (R counts every update a batch's statistics feed, the fresh one included; `workset.py`):

- vanilla: the above, one update per batch per party;
- fedbcd: after the fresh update each party makes R-1 more updates on the same (now stale) statistics, in
  turn with the network (nothing overlaps), unweighted;
- celu: each party caches the statistics of the last W batches; a background thread makes local updates from
  the cache (uniform sampling, R uses per batch, staleness <= W*R, instance weights) while the main loop
  waits on the network. The active party weights with the cosine of the cached dL/dZ_B (sent) and the one its
  current top model gives now; the passive party with the cosine of the cached Z_B (sent) and its current
  bottom model's Z_B. Ablations: `sampling="latest"` (no uniform sampling), `weighting=False`.

Evaluation (the test AUC, at the active party: it holds the labels) runs every `eval_every` rounds, at each
epoch's end and at the end; local updates pause meanwhile and its time is left out of the training clock.
Checkpoints (model, optimizer, workset, clocks) are written every `checkpoint_every` rounds; on `resume` both
parties restart from the newest round both have.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from executor.vfl import checkpoint as ckpt
from executor.vfl.channel import Channel, ChannelError, MsgType, TensorSpec
from executor.vfl.workset import DEFAULT_WEIGHT_THRESHOLD, Workset, instance_weights
from hwmodel.errors import UserError
from workloads import vfl as wl

if TYPE_CHECKING:
    import torch
    from torch import nn

Mode = Literal["vanilla", "fedbcd", "celu"]
# Both parties must agree on these (checked in HELLO) or the run is refused.
AGREED = ("workload", "mode", "workset", "local_updates", "total_rounds", "eval_every", "checkpoint_every")


@dataclass
class PartyConfig:
    """What one party runs. `listen` for the active party (it accepts), `connect` for the passive one."""

    party: Literal["active", "passive"]
    workload: wl.VflWorkloadConfig
    certs: str
    mode: Mode = "celu"
    workset: int = 1
    local_updates: int = 1
    sampling: Literal["uniform", "latest"] = "uniform"
    weighting: bool = True
    threshold: float = DEFAULT_WEIGHT_THRESHOLD
    # Label-leakage defence (active party, off by default): Gaussian noise added to each gradient sent to the
    # passive party, std grad_noise x the batch's RMS gradient element (see README).
    grad_noise: float = 0.0
    epochs: int = 1
    max_rounds: int | None = None  # stop early (tests, smoke runs)
    eval_every: int = 0  # rounds between evaluations; 0: at the end of each epoch
    listen: tuple[str, int] | None = None
    connect: tuple[str, int] | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    resume: bool = False
    timeout: float = 120.0
    connect_timeout: float = 60.0
    reconnect_timeout: float = 15.0
    threads: int = 1
    log: Callable[[str], None] | None = field(default=None, repr=False)
    tap: Callable[[str, bytes], None] | None = field(default=None, repr=False)

    def check(self) -> None:
        if self.mode not in ("vanilla", "fedbcd", "celu"):
            raise UserError(f"mode must be vanilla, fedbcd or celu, got {self.mode!r}")
        if self.mode == "vanilla" and (self.workset, self.local_updates) != (1, 1):
            raise UserError(
                f"vanilla VFL has W=1 and R=1; the plan says W={self.workset}, R={self.local_updates} "
                "(use mode fedbcd or celu for local updates)"
            )
        if self.mode == "fedbcd" and self.workset != 1:
            raise UserError(f"FedBCD reuses only the latest batch (W=1); the plan says W={self.workset}")
        if self.epochs < 1:
            raise UserError(f"--epochs must be at least 1, got {self.epochs}")
        if not 0.0 <= self.threshold <= 1.0:
            raise UserError(f"--threshold must be in [0, 1], got {self.threshold}")
        if self.checkpoint_every and not self.checkpoint_dir:
            raise UserError("--checkpoint-every needs --checkpoint-dir")
        if self.resume and not self.checkpoint_dir:
            raise UserError("--resume needs --checkpoint-dir (the folder holding this party's checkpoints)")

    @property
    def total_rounds(self) -> int:
        rounds = self.epochs * wl.batches_per_epoch(self.workload)
        return min(rounds, self.max_rounds) if self.max_rounds else rounds

    @property
    def eval_interval(self) -> int:
        return self.eval_every or wl.batches_per_epoch(self.workload)

    def agreed(self) -> dict:
        return {
            "workload": self.workload.fingerprint(),
            "mode": self.mode,
            "workset": self.workset,
            "local_updates": self.local_updates,
            "total_rounds": self.total_rounds,
            "eval_every": self.eval_interval,
            "checkpoint_every": self.checkpoint_every,
        }


@dataclass
class PartyResult:
    """What a party measured. AUC figures are the active party's (the passive one has no labels)."""

    party: str
    mode: str
    rounds: int = 0
    start_round: int = 0
    train_time_s: float = 0.0  # wall time of training, evaluation left out
    wall_time_s: float = 0.0
    local_updates_done: int = 0
    evals: list[dict] = field(default_factory=list)  # {"round", "epoch", "train_time_s", "auc"}
    epoch_times_s: list[float] = field(default_factory=list)  # training time of each whole epoch run here
    bytes_sent: int = 0
    bytes_received: int = 0
    reconnects: int = 0
    max_staleness: int = 0

    @property
    def final_auc(self) -> float | None:
        return self.evals[-1]["auc"] if self.evals else None

    def to_dict(self) -> dict:
        return {**asdict(self), "final_auc": self.final_auc}


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties at their average rank)."""
    import pandas as pd

    positives = float(labels.sum())
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = pd.Series(scores).rank(method="average").to_numpy()
    return float((ranks[labels == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))


class _Party:
    """State and steps shared by both parties."""

    # What each party (ActiveParty, PassiveParty) sets up and does its own way.
    models: dict[str, nn.Module]
    optimizer: torch.optim.Optimizer

    def round(self, channel: Channel, r: int) -> None:
        """One round of the protocol: this party's side of the exchange and its update."""
        raise NotImplementedError

    def local_update(self, payload: Any) -> None:
        """One local update from a cached exchange (CELU-VFL)."""
        raise NotImplementedError

    def evaluate(self, channel: Channel, done: int) -> None:
        raise NotImplementedError

    def _finish(self, channel: Channel) -> None:
        raise NotImplementedError

    def __init__(self, cfg: PartyConfig) -> None:
        import torch

        cfg.check()
        torch.set_num_threads(cfg.threads)
        if cfg.mode == "celu":
            # The main loop reads each message in 16 KiB TLS records, each needing the GIL back from the local-update
            # thread; a short switch interval keeps that wait well under a record's time on the wire.
            sys.setswitchinterval(0.0005)
        self.torch = torch
        self.cfg = cfg
        self.wcfg = cfg.workload
        self.log = cfg.log or (lambda message: None)
        self.result = PartyResult(cfg.party, cfg.mode)
        self.model_lock = threading.Lock()  # one update at a time (main loop or background thread)
        self.cond = threading.Condition()  # guards the workset and the pause/stop flags
        self.workset = Workset(cfg.workset, cfg.local_updates, cfg.sampling, seed=self.wcfg.seed)
        self.paused = False
        self.stopping = False
        self.busy = False  # the background thread is inside an update
        self.bg_error: BaseException | None = None
        self.train_clock = 0.0

    # ----------------------------------------------------------- background local updates (CELU-VFL)

    def _local_loop(self) -> None:
        try:
            while True:
                with self.cond:
                    entry = None
                    while not self.stopping and (self.paused or (entry := self.workset.choose()) is None):
                        self.cond.wait(0.05)
                    if self.stopping:
                        return
                    assert entry is not None  # the wait ends on an entry or on stopping
                    staleness = self.workset.use(entry)
                    self.result.max_staleness = max(self.result.max_staleness, staleness)
                    self.busy = True
                try:
                    with self.model_lock:
                        self.local_update(entry.payload)
                    self.result.local_updates_done += 1
                finally:
                    with self.cond:
                        self.busy = False
                        self.cond.notify_all()
        except BaseException as exc:  # surfaced by the main loop
            self.bg_error = exc

    def _cache(self, batch_id: int, payload) -> None:
        """Add a batch after its fresh update; waits for room (a batch leaves only after its R uses)."""
        with self.cond:
            while not self.workset.has_room():
                self._check_bg()
                self.cond.wait(0.05)
            self.workset.add(batch_id, payload)
            self.cond.notify_all()

    def _pause(self, paused: bool) -> None:
        with self.cond:
            self.paused = paused
            while paused and self.busy:
                self.cond.wait(0.05)
            self.cond.notify_all()

    def _check_bg(self) -> None:
        if self.bg_error is not None:
            raise RuntimeError(f"local-update thread failed: {self.bg_error!r}") from self.bg_error

    def _fedbcd_updates(self, payload) -> None:
        for _ in range(self.cfg.local_updates - 1):
            self.local_update(payload)
            self.result.local_updates_done += 1

    # ----------------------------------------------------------- run

    def run(self) -> PartyResult:
        cfg = self.cfg
        start_wall = time.perf_counter()
        channel = Channel(
            cfg.party,
            cfg.certs,
            listen=cfg.listen,
            connect=cfg.connect,
            timeout=cfg.timeout,
            connect_timeout=cfg.connect_timeout,
            reconnect_timeout=cfg.reconnect_timeout,
            tap=cfg.tap,
            log=self.log,
        )
        bg = None
        try:
            channel.open()
            self.channel = channel
            start = self._hello(channel)
            self._agree_shapes(channel)
            if cfg.mode == "celu":
                bg = threading.Thread(target=self._local_loop, name=f"vfl-{cfg.party}-local", daemon=True)
                bg.start()
            self.result.start_round = start
            self._train(channel, start)
            self._pause(True)
            with self.cond:
                self.stopping = True
                self.cond.notify_all()
            self._finish(channel)
        except BaseException as exc:
            # Tell the peer why we stop (best effort: a broken link may be the reason), so it stops at once too.
            if not isinstance(exc, KeyboardInterrupt):
                channel.send_error(str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}")
            raise
        finally:
            with self.cond:
                self.stopping = True
                self.cond.notify_all()
            if bg is not None:
                bg.join(timeout=10)
            self.result.bytes_sent, self.result.bytes_received = channel.bytes_sent, channel.bytes_received
            self.result.reconnects = channel.reconnects
            channel.close()
            self.result.wall_time_s = time.perf_counter() - start_wall
        self._check_bg()
        return self.result

    def _hello(self, channel: Channel) -> int:
        """Exchange what each side runs; refuse a mismatch; agree on the round to start from."""
        mine = {
            **self.cfg.agreed(),
            "party": self.cfg.party,
            "resume": self.cfg.resume,
            "checkpoints": ckpt.available(self.cfg.checkpoint_dir, self.cfg.party) if self.cfg.resume else [],
        }
        if self.cfg.party == "active":
            channel.send_json(MsgType.HELLO, 0, mine)
            theirs = channel.recv(MsgType.HELLO).payload
        else:
            theirs = channel.recv(MsgType.HELLO).payload
            channel.send_json(MsgType.HELLO, 0, mine)
        if not isinstance(theirs, dict) or set(theirs) != set(mine):
            raise ChannelError(f"malformed HELLO from the {channel.peer_party} party")
        if theirs["party"] != channel.peer_party:
            raise ChannelError(
                f"the peer says it is the {theirs['party']} party; expected the {channel.peer_party} party"
            )
        for key in AGREED:
            if theirs[key] != mine[key]:
                raise UserError(
                    f"the parties disagree on {key}: {self.cfg.party} has {mine[key]!r}, "
                    f"{channel.peer_party} has {theirs[key]!r}; start both with the same workload, plan and options"
                )
        if theirs["resume"] != mine["resume"]:
            raise UserError("one party was started with --resume and the other without; resume both or neither")
        if not mine["resume"]:
            return 0
        common = sorted(set(mine["checkpoints"]) & set(theirs["checkpoints"]))
        if not common:
            raise UserError(
                f"--resume: no checkpoint round that both parties have (active: "
                f"{mine['checkpoints'] if self.cfg.party == 'active' else theirs['checkpoints']}, passive: "
                f"{theirs['checkpoints'] if self.cfg.party == 'active' else mine['checkpoints']})"
            )
        start = common[-1]
        assert self.cfg.checkpoint_dir is not None  # PartyConfig.check: --resume needs the folder
        self._load(ckpt.load(self.cfg.checkpoint_dir, self.cfg.party, start))
        self.log(f"resumed from the checkpoint of round {start}")
        return start

    def _agree_shapes(self, channel: Channel) -> None:
        w = self.wcfg
        channel.specs = {
            MsgType.ACTIVATIONS: TensorSpec(cols=w.interface_dim, rows=w.batch_size),
            MsgType.GRADIENTS: TensorSpec(cols=w.interface_dim, rows=w.batch_size),
            MsgType.EVAL_ACTIVATIONS: TensorSpec(cols=w.interface_dim, max_rows=w.batch_size),
        }

    def _train(self, channel: Channel, start: int) -> None:
        per_epoch = wl.batches_per_epoch(self.wcfg)
        epoch_started = self.train_clock if start % per_epoch == 0 else None
        for r in range(start, self.cfg.total_rounds):
            t0 = time.perf_counter()
            self._check_bg()
            self.round(channel, r)
            self.train_clock += time.perf_counter() - t0
            self.result.rounds = r + 1
            done = r + 1
            if done % per_epoch == 0:
                if epoch_started is not None:
                    self.result.epoch_times_s.append(self.train_clock - epoch_started)
                epoch_started = self.train_clock
            if done % self.cfg.eval_interval == 0 or done % per_epoch == 0 or done == self.cfg.total_rounds:
                self._pause(True)
                self.evaluate(channel, done)
                self._pause(False)
            if self.cfg.checkpoint_every and (done % self.cfg.checkpoint_every == 0 or done == self.cfg.total_rounds):
                self._pause(True)
                assert self.cfg.checkpoint_dir is not None  # PartyConfig.check: checkpoints need the folder
                with self.model_lock:
                    ckpt.save(self.cfg.checkpoint_dir, self.cfg.party, done, self._state(done))
                self._pause(False)
        self.result.train_time_s = self.train_clock

    def _state(self, done: int) -> dict:
        return {
            "round": done,
            "models": {k: m.state_dict() for k, m in self.models.items()},
            "optimizer": self.optimizer.state_dict(),
            "workset": self.workset.state(),
            "train_clock": self.train_clock,
            "evals": list(self.result.evals),
            "epoch_times_s": list(self.result.epoch_times_s),
            "local_updates_done": self.result.local_updates_done,
            "torch_rng": self.torch.get_rng_state(),
        }

    def _load(self, state: dict) -> None:
        for key, module in self.models.items():
            module.load_state_dict(state["models"][key])
        self.optimizer.load_state_dict(state["optimizer"])
        self.workset.load_state(state["workset"])
        self.train_clock = state["train_clock"]
        self.result.evals = list(state["evals"])
        self.result.epoch_times_s = list(state["epoch_times_s"])
        self.result.local_updates_done = state["local_updates_done"]
        self.torch.set_rng_state(state["torch_rng"])

    def _batch(self, r: int) -> np.ndarray:
        per_epoch = wl.batches_per_epoch(self.wcfg)
        return wl.batch_indices(self.wcfg, r // per_epoch, r % per_epoch)


class ActiveParty(_Party):
    """Holds the dense fields, the labels, its bottom model and the top model; listens."""

    def __init__(self, cfg: PartyConfig) -> None:
        super().__init__(cfg)
        torch = self.torch
        self.dense, self.labels = (torch.from_numpy(a) for a in wl.active_features_and_labels(self.wcfg, "train"))
        self.test_dense, self.test_labels = wl.active_features_and_labels(self.wcfg, "test")
        self.bottom = wl.active_bottom_model(self.wcfg)
        self.top = wl.top_model(self.wcfg)
        self.models = {"bottom": self.bottom, "top": self.top}
        self.optimizer = torch.optim.Adam(
            [*self.bottom.parameters(), *self.top.parameters()], lr=self.wcfg.learning_rate
        )

    def _defended(self, grad, r: int):
        """The gradient sent to the passive party: with --grad-noise, noised against label leakage."""
        return gradient_noise(grad, self.cfg.grad_noise, self.cfg.workload.seed * 1_000_003 + r)

    def _losses(self, idx, z_passive):
        logits = self.top(z_passive, self.bottom(self.dense[idx]))
        return self.torch.nn.functional.binary_cross_entropy_with_logits(logits, self.labels[idx], reduction="none")

    def round(self, channel: Channel, r: int) -> None:
        msg = channel.recv(MsgType.ACTIVATIONS)
        if msg.tag != r:
            raise ChannelError(f"activations of round {msg.tag} arrived in round {r}")
        idx = self._batch(r)
        z = self.torch.from_numpy(msg.payload.copy())
        with self.model_lock:
            z_in = z.clone().requires_grad_(True)
            loss = self._losses(idx, z_in).mean()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad = z_in.grad.detach().clone()
            self.optimizer.step()
        grad = self._defended(grad, r)
        channel.send_tensor(MsgType.GRADIENTS, r, grad)
        payload = (idx, z, grad)
        if self.cfg.mode == "fedbcd":
            with self.model_lock:
                self._fedbcd_updates(payload)
        elif self.cfg.mode == "celu":
            self._cache(r, payload)

    def local_update(self, payload) -> None:
        """One update on cached Z_B; weights compare the dL/dZ_B sent then with the one the model gives now."""
        idx, z_stale, grad_sent = payload
        torch = self.torch
        z_in = z_stale.clone().requires_grad_(True)
        losses = self._losses(idx, z_in)
        batch = losses.shape[0]
        weighted = self.cfg.mode == "celu" and self.cfg.weighting
        if weighted:
            (grad_now,) = torch.autograd.grad(losses.sum() / batch, z_in, retain_graph=True)
            weights = instance_weights(grad_sent, grad_now, self.cfg.threshold)
        else:
            weights = torch.ones(batch)
        loss = (weights.detach() * losses).sum() / batch
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def evaluate(self, channel: Channel, done: int) -> None:
        torch = self.torch
        scores = []
        with torch.no_grad():
            for i, idx in enumerate(wl.test_batches(self.wcfg)):
                msg = channel.recv(MsgType.EVAL_ACTIVATIONS)
                if msg.tag != i or msg.payload.shape[0] != len(idx):
                    raise ChannelError(
                        f"evaluation batch {msg.tag} of {msg.payload.shape[0]} rows arrived; expected "
                        f"batch {i} of {len(idx)}"
                    )
                z = torch.from_numpy(msg.payload.copy())
                scores.append(self.top(z, self.bottom(torch.from_numpy(self.test_dense[idx]))).numpy())
        value = auc(np.concatenate(scores), self.test_labels)
        per_epoch = wl.batches_per_epoch(self.wcfg)
        self.result.evals.append(
            {"round": done, "epoch": done / per_epoch, "train_time_s": self.train_clock, "auc": value}
        )
        self.log(
            f"round {done} (epoch {done / per_epoch:.2f}): test AUC {value:.4f}, training time {self.train_clock:.1f} s"
        )

    def _finish(self, channel: Channel) -> None:
        channel.send_json(MsgType.CONTROL, self.cfg.total_rounds, {"op": "done"})
        channel.recv(MsgType.CONTROL)


class PassiveParty(_Party):
    """Holds the categorical fields and its bottom model; connects to the active party."""

    def __init__(self, cfg: PartyConfig) -> None:
        super().__init__(cfg)
        torch = self.torch
        self.cats = torch.from_numpy(wl.passive_features(self.wcfg, "train"))
        self.test_cats = torch.from_numpy(wl.passive_features(self.wcfg, "test"))
        self.bottom = wl.passive_bottom_model(self.wcfg)
        self.models = {"bottom": self.bottom}
        self.optimizer = torch.optim.Adam(self.bottom.parameters(), lr=self.wcfg.learning_rate)

    def round(self, channel: Channel, r: int) -> None:
        torch = self.torch
        idx = self._batch(r)
        overlapped = self.cfg.mode == "celu"
        with self.model_lock:
            if overlapped:  # local updates may change the weights before the gradients come back: no graph kept
                with torch.no_grad():
                    z = self.bottom(self.cats[idx])
            else:
                z = self.bottom(self.cats[idx])
        channel.send_tensor(MsgType.ACTIVATIONS, r, z)
        msg = channel.recv(MsgType.GRADIENTS)
        if msg.tag != r:
            raise ChannelError(f"gradients of round {msg.tag} arrived in round {r}")
        grad = torch.from_numpy(msg.payload.copy())
        z_sent = z.detach()
        payload = (idx, z_sent, grad)
        with self.model_lock:
            if overlapped:
                self.local_update(payload)  # the fresh update, on the current weights
            else:
                self.optimizer.zero_grad(set_to_none=True)
                z.backward(grad)
                self.optimizer.step()
                if self.cfg.mode == "fedbcd":
                    self._fedbcd_updates(payload)
        if overlapped:
            self._cache(r, payload)

    def local_update(self, payload) -> None:
        """One update with cached dL/dZ_B; weights compare the Z_B sent then with the one the model gives now."""
        idx, z_sent, grad = payload
        z_now = self.bottom(self.cats[idx])
        if self.cfg.mode == "celu" and self.cfg.weighting:
            weights = instance_weights(z_sent, z_now.detach(), self.cfg.threshold)
            grad = grad * weights.unsqueeze(1)
        self.optimizer.zero_grad(set_to_none=True)
        z_now.backward(grad)
        self.optimizer.step()

    def evaluate(self, channel: Channel, done: int) -> None:
        with self.torch.no_grad():
            for i, idx in enumerate(wl.test_batches(self.wcfg)):
                channel.send_tensor(MsgType.EVAL_ACTIVATIONS, i, self.bottom(self.test_cats[idx]))

    def _finish(self, channel: Channel) -> None:
        msg = channel.recv(MsgType.CONTROL)
        if msg.payload != {"op": "done"}:
            raise ChannelError(f"unexpected control message {msg.payload!r}")
        channel.send_json(MsgType.CONTROL, self.cfg.total_rounds, {"op": "done"})


def gradient_noise(grad, scale: float, seed: int):
    """`grad` plus Gaussian noise of std `scale` x its RMS element (seeded: a resumed run sends the same)."""
    import torch

    if scale <= 0:
        return grad
    generator = torch.Generator().manual_seed(seed)
    rms = grad.pow(2).mean().sqrt()
    return grad + torch.randn(grad.shape, generator=generator, dtype=grad.dtype) * (scale * rms)


def run_party(cfg: PartyConfig) -> PartyResult:
    """Run one party to the end (or raise a ChannelError / UserError saying why it stopped)."""
    party = ActiveParty(cfg) if cfg.party == "active" else PassiveParty(cfg)
    return party.run()
