"""Faults in a VFL run: a party killed mid-run makes the other stop within 30 s with a message; both resume
from the last checkpoint and finish with the AUC of an uninterrupted run (within 0.002); a dropped connection
with both parties alive is re-established and the run goes on."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from executor.vfl import checkpoint
from executor.vfl.keys import make_keys
from executor.vfl.party import PartyConfig, run_party
from tests.helpers import REPO_ROOT
from workloads import vfl as wl

sys.path.insert(0, str(REPO_ROOT / "benchmarks" / "wan"))
from delay_relay import DelayRelay, TlsRecords

WORKLOAD = "vfl-wdl-tiny"
EPOCHS = 2
ARGS = [
    "--workload",
    WORKLOAD,
    "--epochs",
    str(EPOCHS),
    "--mode",
    "fedbcd",
    "--local-updates",
    "2",
    "--eval-every",
    "16",
    "--reconnect-timeout",
    "4",
    "--connect-timeout",
    "180",
    "--quiet",
]


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("certs")
    make_keys(folder)
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _party(party: str, certs: Path, address: str, extra: list[str]) -> subprocess.Popen:
    where = ["--listen", address] if party == "active" else ["--peer", address]
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "executor.vfl.cli",
            "run",
            "--party",
            party,
            "--certs",
            str(certs),
            *where,
            *ARGS,
            *extra,
        ],
        cwd=REPO_ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _config(certs: Path, **kw) -> dict:
    return dict(
        workload=wl.load_vfl_workload(WORKLOAD),
        certs=str(certs),
        mode="fedbcd",
        local_updates=2,
        epochs=EPOCHS,
        eval_every=16,
        reconnect_timeout=4.0,
        **kw,
    )


def _run_both_in_threads(certs: Path, **kw) -> dict:
    """Both parties in threads of this process (the run is deterministic: FedBCD has no background thread)."""
    port = _free_port()
    results: dict = {}

    def active() -> None:
        try:
            results["active"] = run_party(
                PartyConfig(party="active", listen=("127.0.0.1", port), **_config(certs, **kw))
            )
        except Exception as exc:
            results["active_error"] = exc

    thread = threading.Thread(target=active)
    thread.start()
    results["passive"] = run_party(PartyConfig(party="passive", connect=("127.0.0.1", port), **_config(certs, **kw)))
    thread.join(60)
    assert "active_error" not in results, results["active_error"]
    return results


def test_killed_party_stops_the_other_and_both_resume_to_the_same_auc(certs, tmp_path):
    ckpt = tmp_path / "ckpt"
    port = _free_port()
    total = EPOCHS * wl.batches_per_epoch(wl.load_vfl_workload(WORKLOAD))
    # The passive party is its own process (to be killed); the active party runs here. A 25 ms each-way relay
    # slows the rounds so that the kill lands mid-run.
    relay = DelayRelay(("127.0.0.1", 0), ("127.0.0.1", port), delay=0.025).start()
    passive = _party(
        "passive", certs, f"127.0.0.1:{relay.address[1]}", ["--checkpoint-dir", str(ckpt), "--checkpoint-every", "8"]
    )
    outcome: dict = {}

    def active() -> None:
        try:
            run_party(
                PartyConfig(
                    party="active",
                    listen=("127.0.0.1", port),
                    checkpoint_dir=str(ckpt),
                    checkpoint_every=8,
                    connect_timeout=180.0,
                    **_config(certs),
                )
            )
        except Exception as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=active)
    thread.start()
    deadline = time.monotonic() + 240
    while not [r for r in checkpoint.available(ckpt, "passive") if r >= 16] and time.monotonic() < deadline:
        if passive.poll() is not None:
            pytest.fail(f"the passive party stopped early: {passive.communicate()}")
        time.sleep(0.02)
    assert checkpoint.available(ckpt, "passive"), "no checkpoint within 240 s"
    os.kill(passive.pid, signal.SIGKILL)
    passive.wait()
    thread.join(60)  # a hang guard, far below the active party's 180 s connect timeout
    relay.stop()
    assert checkpoint.available(ckpt, "passive")[-1] < total, "the run finished before the kill"
    assert not thread.is_alive(), "the active party was still running 60 s after the kill"
    assert "error" in outcome, "the active party did not notice"
    message = str(outcome["error"])
    assert "passive party" in message and "is gone" in message and "--resume" in message, message

    # Resume both from the newest checkpoint they share; finish as if nothing had happened.
    resumed = _run_both_in_threads(certs, checkpoint_dir=str(ckpt), checkpoint_every=8, resume=True)["active"]
    assert 16 <= resumed.start_round < total and resumed.rounds == total
    uninterrupted = _run_both_in_threads(certs)["active"]
    assert abs(resumed.final_auc - uninterrupted.final_auc) <= 0.002


def test_resume_without_checkpoints_is_refused(certs, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "executor.vfl.cli",
            "run",
            "--party",
            "active",
            "--certs",
            str(certs),
            "--listen",
            "127.0.0.1:0",
            *ARGS,
            "--checkpoint-dir",
            str(tmp_path / "none"),
            "--resume",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "holds no checkpoint of the active party" in " ".join(proc.stderr.split())


def test_a_dropped_connection_is_re_established(certs):
    """Both parties alive, the link drops between two messages (as after a NAT timeout): they reconnect, resend
    what was lost and finish normally."""
    port = _free_port()
    records = TlsRecords()
    cut = {"done": False}

    def drop_after_tenth_message(direction, offset, data):
        if direction != "forward" or cut["done"]:
            return data, False
        messages = [(start, length) for start, length in records.feed(data) if length > 1000]
        if len(messages) < 10:
            return data, False
        start, length = messages[9]
        cut["done"] = True
        return data[: start + 5 + length - offset], True  # the 10th activations pass whole, then the link drops

    relay = DelayRelay(("127.0.0.1", 0), ("127.0.0.1", port), delay=0.0, mangle=drop_after_tenth_message).start()
    cfg = dict(
        workload=wl.load_vfl_workload(WORKLOAD), certs=str(certs), mode="vanilla", epochs=1, reconnect_timeout=10.0
    )
    results, errors = {}, {}

    def go(party, **kw):
        try:
            results[party] = run_party(PartyConfig(party=party, **cfg, **kw))
        except Exception as exc:
            errors[party] = exc

    threads = [
        threading.Thread(target=go, args=("active",), kwargs={"listen": ("127.0.0.1", port)}),
        threading.Thread(target=go, args=("passive",), kwargs={"connect": tuple(relay.address)}),
    ]
    threads[0].start()
    time.sleep(0.2)
    threads[1].start()
    for t in threads:
        t.join(60)
    relay.stop()
    assert cut["done"]
    assert not errors, errors
    assert results["active"].rounds == wl.batches_per_epoch(cfg["workload"])
    assert results["passive"].reconnects >= 1 and results["active"].reconnects >= 1
    assert relay.connections == 2
