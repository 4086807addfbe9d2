"""Two VFL parties and the WAN between them as a SimPy timeline: rounds of vanilla VFL, FedBCD and CELU-VFL.

Model. Each party is one process with one compute thread's worth of CPU and a model lock: every forward,
update and local update takes the lock, so the main loop's fresh work and CELU-VFL's background local
updates run one at a time, as the executor runs them (a fresh step waits for a local update in progress).
The WAN has one port per direction, a fluid resource of `simulator.des.fluid` (the training engine's shared
links), and a message takes

    one-way latency + per-message overhead + bytes / achievable bandwidth

through its direction of the link. A round (one fresh mini-batch) runs, on the party's main loops:

    passive: forward  -> send activations ----------------------> wait for gradients -> backward (+ step)
    active:              wait for activations -> forward + backward (+ step) -> send gradients

R counts every use of a batch's statistics, the fresh update included (the executor's convention), so a
batch gets R-1 local updates and W=1, R=1 is vanilla VFL.

- vanilla: nothing else; the round is strictly sequential.
- FedBCD: after its fresh step each party runs R-1 local steps on the same batch's (stale) statistics in
  its main loop; the passive party starts the next round only after them.
- CELU-VFL: each party keeps a workset with the executor's rules (`workset.py` is the
  executor's `Workset` too: at most W batches, each used R times then evicted, a new batch waits for
  room, sampling uniform among the batches not used in the last W-1 updates, late batches first). A
  background worker runs a local update whenever a cached batch is eligible: local updates cost the round
  nothing while the main loop waits on the network, delay it when the lock is busy as it needs it, and stall
  it when the workset is full and the next batch must wait for room.

Each party counts its model updates (fresh and local); the staleness of a local update is how many updates
its party applied since the cached statistics were computed (the workset's own count), and its repeat is how
many of the party's updates just before it used the same batch; the statistical-efficiency model
(`efficiency.py`) turns both into what the update is worth. Deterministic: the workset's sampling is
seeded, so the same inputs give the same times, bit for bit.

Rounds are simulated through the start-up (the worksets filling, about W rounds) and a steady stretch whose
mean round time extrapolates to the rest of the epoch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import simpy

from simulator.des.fluid import FluidNetwork, Port
from simulator.search.vfl.workset import Sampling, Workset

Mode = Literal["vanilla", "fedbcd", "celu"]
MODES: tuple[str, ...] = ("vanilla", "fedbcd", "celu")
# How the model lock is handed over when both loops want it: "fifo", in the order they asked (the main loop
# waits for one local update at most); "worker_first", the worker keeps it while it has eligible batches.
LOCK_POLICIES: tuple[str, ...] = ("fifo", "worker_first")


@dataclass(frozen=True)
class PartyCompute:
    """Seconds of work, at the party's full speed, per mini-batch."""

    forward_s: float  # fresh forward of the party's bottom model (active: bottom + top + loss)
    backward_s: float  # fresh backward and optimizer step
    local_s: float  # one local update on cached statistics (forward, weights, backward and step)


@dataclass(frozen=True)
class Direction:
    """One direction of the WAN as messages see it."""

    bandwidth: float  # achievable bytes/s
    latency: float  # one-way seconds
    overhead_s: float = 0.0  # per message: framing, TLS record and syscall costs

    def message_time(self, nbytes: float) -> float:
        """Seconds from the first byte sent to the last byte received, alone on the link."""
        return self.latency + self.overhead_s + nbytes / self.bandwidth


@dataclass(frozen=True)
class TimingModel:
    """Everything the timeline needs: the parties' compute, the bytes of a round and the link."""

    active: PartyCompute
    passive: PartyCompute
    forward_bytes: float  # activations, passive -> active, per mini-batch
    backward_bytes: float  # gradients, active -> passive, per mini-batch
    to_active: Direction
    to_passive: Direction
    rounds_per_epoch: int


@dataclass
class PartyTimeline:
    """What one party did over the simulated rounds."""

    name: str
    compute: PartyCompute
    model_lock: simpy.Resource
    workset: Workset
    updates: int = 0  # fresh and local model updates applied so far (FedBCD; CELU-VFL counts in its workset)
    local_busy_s: float = 0.0  # local-update work (seconds at full speed)
    local_updates: int = 0
    room_wait_s: float = 0.0  # main loop waiting for room in a full workset
    staleness: list[int] = field(default_factory=list)  # per local update: this party's updates since caching
    repeat: list[int] = field(
        default_factory=list
    )  # per local update: this party's updates just before it on the same batch
    last_batch: int = -1  # the batch of this party's latest update (fresh or local)
    run: int = 0  # how many updates in a row used `last_batch`
    changed: simpy.Event | None = None  # fires when the workset changes (a batch added or evicted)


@dataclass(frozen=True)
class Timeline:
    """The result of simulating a mode: round and epoch times and the local updates' staleness."""

    mode: str
    workset: int
    local_updates: int  # R: uses of each batch, the fresh one included
    rounds_simulated: int
    round_time_s: float  # the mean of the last simulated rounds (steady state)
    ends: tuple[float, ...]  # when each simulated round finished (the passive party's step)
    rounds_per_epoch: int
    local_compute_s: dict[str, float]  # per round (steady mean), per party, at full speed
    local_updates_per_round: dict[str, float]  # local updates begun per simulated round, per party
    room_wait_per_round_s: dict[str, float]  # main loop stalled on a full workset, per round (steady mean)
    staleness: dict[str, tuple[int, ...]]  # per party, per local update begun in the simulated rounds
    repeat: dict[str, tuple[int, ...]]
    local_counts: dict[str, tuple[int, ...]]  # per party: local updates begun by the end of each simulated round
    steady_from: int  # the first round of the steady stretch
    communication_s: float  # both messages of a round alone on the link

    def time_for(self, rounds: float) -> float:
        """Wall time of the first `rounds` rounds (the workset carries over from epoch to epoch)."""
        if rounds <= 0:
            return 0.0
        n = len(self.ends)
        if rounds <= n:
            whole = int(rounds)
            before = self.ends[whole - 1] if whole >= 1 else 0.0
            after = self.ends[whole] if whole < n else before
            return before + (rounds - whole) * (after - before)
        return self.ends[-1] + (rounds - n) * self.round_time_s

    @property
    def epoch_time_s(self) -> float:
        return self.time_for(self.rounds_per_epoch)


class RoundSimulation:
    """`rounds` rounds of one mode; `run()` returns the time each round's main loops finished."""

    def __init__(
        self,
        model: TimingModel,
        mode: str,
        workset: int = 1,
        local_updates: int = 1,
        seed: int = 0,
        cap: int | None = None,
        lock: str = "fifo",
        sampling: Sampling = "uniform",
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if workset < 1 or local_updates < 1:
            raise ValueError(f"workset W >= 1 and uses R >= 1 needed, got W={workset}, R={local_updates}")
        if lock not in LOCK_POLICIES:
            raise ValueError(f"lock must be one of {', '.join(LOCK_POLICIES)}, got {lock!r}")
        self.model = model
        self.mode = mode
        self.lock = lock
        self.cap = cap or model.rounds_per_epoch  # rounds the main loops are started for
        self.w = workset if mode == "celu" else 1
        self.r = local_updates if mode != "vanilla" else 1
        self.env = simpy.Environment()
        self.net = FluidNetwork(self.env)
        self.link = {
            "to_active": Port("wan passive->active", model.to_active.bandwidth),
            "to_passive": Port("wan active->passive", model.to_passive.bandwidth),
        }

        # A party's model lock: one update (or forward) at a time, main loop and background worker alike.
        def party(name: str, compute: PartyCompute, offset: int) -> PartyTimeline:
            return PartyTimeline(
                name,
                compute,
                simpy.Resource(self.env, capacity=1),
                Workset(self.w, self.r, sampling=sampling, seed=seed + offset),
            )

        self.active = party("active", model.active, 0)
        self.passive = party("passive", model.passive, 1)
        self.activations: dict[int, simpy.Event] = {}
        self.gradients: dict[int, simpy.Event] = {}
        self.round_end: list[float] = []
        self.round_done: dict[int, simpy.Event] = {}
        self.started = False
        self.marks: dict[str, list[tuple[int, int, float, float, int]]] = {"active": [], "passive": []}

    # ---- primitives -----------------------------------------------------------------------------------
    def _event(self, table: dict[int, simpy.Event], key: int) -> simpy.Event:
        if key not in table:
            table[key] = self.env.event()
        return table[key]

    def _work(self, party: PartyTimeline, seconds: float):
        """Process: `seconds` of compute under the party's model lock (waiting for an update in progress)."""
        with party.model_lock.request() as turn:
            yield turn
            yield self.env.timeout(seconds)

    def _message(self, direction: str, nbytes: float, arrived: simpy.Event):
        link = self.model.to_active if direction == "to_active" else self.model.to_passive
        yield self.env.timeout(link.latency + link.overhead_s)
        yield self.net.transfer(nbytes, (self.link[direction],))
        arrived.succeed()

    def _changed(self, party: PartyTimeline) -> None:
        if party.changed is not None and not party.changed.triggered:
            party.changed.succeed()

    def _wait_change(self, party: PartyTimeline):
        party.changed = self.env.event()
        yield party.changed

    def _begin_local(self, party: PartyTimeline, batch: int, staleness: int) -> None:
        party.staleness.append(staleness)
        repeat = party.run if party.last_batch == batch else 0
        party.repeat.append(repeat)
        party.last_batch, party.run = batch, repeat + 1

    def _fresh_done(self, party: PartyTimeline, batch: int):
        """The fresh update is applied: FedBCD runs its R-1 local steps now, CELU-VFL caches the batch."""
        party.last_batch, party.run = batch, 1
        if self.mode == "celu":
            start = self.env.now
            while not party.workset.has_room():  # a new batch waits until a cached one has had its R uses
                yield from self._wait_change(party)
            party.room_wait_s += self.env.now - start
            party.workset.add(batch)
            self._changed(party)
            return
        party.updates += 1
        for k in range(1, self.r):  # FedBCD: local steps on the batch just exchanged, in the main loop
            self._begin_local(party, batch, k)
            party.local_busy_s += party.compute.local_s
            yield from self._work(party, party.compute.local_s)
            party.local_updates += 1
            party.updates += 1

    def _worker(self, party: PartyTimeline):
        """CELU-VFL's background local updates on one party, by the executor's workset rules: choose a batch and
        count its use, then wait for the model lock and update. With the "worker_first" lock policy the worker
        keeps the lock while it has eligible batches (an unfair lock that the releasing thread retakes)."""
        workset = party.workset
        while True:
            entry = workset.choose()
            if entry is None:
                yield from self._wait_change(party)
                continue
            with party.model_lock.request() as turn:
                while entry is not None:
                    self._begin_local(party, entry.batch_id, workset.use(entry))  # may evict: room for the next
                    self._changed(party)
                    if not turn.triggered:
                        yield turn
                    party.local_busy_s += party.compute.local_s
                    yield self.env.timeout(party.compute.local_s)
                    party.local_updates += 1
                    entry = workset.choose() if self.lock == "worker_first" else None

    def _mark(self, party: PartyTimeline, t: int) -> None:
        self.marks[party.name].append(
            (t, party.local_updates, party.local_busy_s, party.room_wait_s, len(party.staleness))
        )

    # ---- the parties' main loops ------------------------------------------------------------------------
    def _passive(self, rounds: int, done: simpy.Event):
        party, compute = self.passive, self.passive.compute
        for t in range(rounds):
            yield from self._work(party, compute.forward_s)
            self.env.process(self._message("to_active", self.model.forward_bytes, self._event(self.activations, t)))
            yield self._event(self.gradients, t)
            yield from self._work(party, compute.backward_s)
            yield from self._fresh_done(party, t)
            # Both parties' counters as the round ends (the active party may still be waiting for room).
            self._mark(self.active, t)
            self._mark(party, t)
            self.round_end.append(self.env.now)
            self._event(self.round_done, t).succeed()
        done.succeed()

    def _active(self, rounds: int):
        party, compute = self.active, self.active.compute
        for t in range(rounds):
            yield self._event(self.activations, t)
            yield from self._work(party, compute.forward_s + compute.backward_s)
            self.env.process(self._message("to_passive", self.model.backward_bytes, self._event(self.gradients, t)))
            yield from self._fresh_done(party, t)

    def run(self, rounds: int) -> list[float]:
        """Simulate up to the end of round `rounds - 1` (again: further on); the finish times of all rounds so far."""
        if not self.started:
            self.started = True
            self.env.process(self._passive(self.cap, self.env.event()))
            self.env.process(self._active(self.cap))
            if self.mode == "celu" and self.r > 1:
                self.env.process(self._worker(self.active))
                self.env.process(self._worker(self.passive))
        assert rounds <= self.cap, (rounds, self.cap)
        self.env.run(until=self._event(self.round_done, rounds - 1))
        return self.round_end


def _chunk(workset: int) -> int:
    return max(8, 2 * workset + 4)


def simulate_mode(
    model: TimingModel,
    mode: str,
    workset: int = 1,
    local_updates: int = 1,
    seed: int = 0,
    full: bool = False,
    lock: str = "fifo",
    sampling: Sampling = "uniform",
) -> Timeline:
    """Round and epoch time of `mode`: R uses per batch (FedBCD, CELU-VFL), W cached batches (CELU-VFL).

    With `full`, the whole epoch is simulated. Otherwise rounds are simulated in chunks until they look
    steady, and the rest of the epoch is extrapolated: vanilla VFL and FedBCD repeat from the first round, so
    this is exact for them; CELU-VFL's worksets first bank local updates (a worker that the sampling rule
    keeps idle lets uses pile up until the workset is full) and can take a good part of an epoch to settle,
    so the planner screens with the short form and re-simulates its finalists in full. Steady means the last
    chunk ran R-1 local updates per round on both parties (to within one workset's worth) and its mean round
    time matches the chunk before to 1%.
    """
    total = model.rounds_per_epoch
    chunk = _chunk(workset if mode == "celu" else 1)
    sim = RoundSimulation(model, mode, workset, local_updates, seed, cap=total, lock=lock, sampling=sampling)
    need = sim.r - 1
    rounds = total if full else min(total, 2 * chunk)
    ends = sim.run(rounds)

    def local_count(party: PartyTimeline, t: int) -> int:
        return sim.marks[party.name][t][4] if t >= 0 else 0

    while rounds < total:
        a, b, c = rounds - 2 * chunk - 1, rounds - chunk - 1, rounds - 1
        before = (ends[b] - (ends[a] if a >= 0 else 0.0)) / chunk
        last = (ends[c] - ends[b]) / chunk
        settled = all(
            abs(local_count(p, c) - local_count(p, b) - need * chunk) <= sim.w * max(need, 1) / 2
            for p in (sim.active, sim.passive)
        )
        if settled and abs(last - before) <= 0.01 * last:
            break
        rounds = min(total, rounds + chunk)
        ends = sim.run(rounds)
    # The steady stretch: the last two chunks (at most half of what was simulated).
    half = max(rounds // 2, rounds - 2 * chunk)
    start_time = ends[half - 1] if half >= 1 else 0.0
    steady_rounds = rounds - half
    round_time = (ends[-1] - start_time) / steady_rounds
    parties = (sim.active, sim.passive)

    def mark(party: PartyTimeline, t: int) -> tuple:
        return sim.marks[party.name][t] if t >= 0 else (t, 0, 0.0, 0.0, 0)

    def steady(party: PartyTimeline, index: int) -> float:
        return (mark(party, rounds - 1)[index] - mark(party, half - 1)[index]) / steady_rounds

    # The staleness of every local update simulated (the start-up's too: it is part of the run).
    return Timeline(
        mode=mode,
        workset=sim.w,
        local_updates=sim.r,
        rounds_simulated=rounds,
        round_time_s=round_time,
        ends=tuple(ends),
        rounds_per_epoch=total,
        local_compute_s={p.name: steady(p, 2) for p in parties},
        local_updates_per_round={p.name: local_count(p, rounds - 1) / rounds for p in parties},
        room_wait_per_round_s={p.name: steady(p, 3) for p in parties},
        staleness={p.name: tuple(p.staleness[: local_count(p, rounds - 1)]) for p in parties},
        repeat={p.name: tuple(p.repeat[: local_count(p, rounds - 1)]) for p in parties},
        local_counts={p.name: tuple(local_count(p, t) for t in range(rounds)) for p in parties},
        steady_from=half,
        communication_s=model.to_active.message_time(model.forward_bytes)
        + model.to_passive.message_time(model.backward_bytes),
    )
