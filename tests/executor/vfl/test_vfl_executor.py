"""The VFL workload (sizes, data, modules) and the executor's modes, agreement checks and CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np
import pytest
from rich.console import Console

from executor import cli as execute_cli
from executor.vfl import cli as vfl_cli
from executor.vfl.keys import make_keys
from executor.vfl.party import PartyConfig, auc, run_party
from hwmodel.errors import SpecError, UnknownNameError, UserError
from tests.helpers import REPO_ROOT
from workloads import vfl as wl

TINY = wl.load_vfl_workload("vfl-wdl-tiny")


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("certs")
    make_keys(folder)
    return folder


@pytest.fixture
def execute(monkeypatch, capsys):
    """`execute ARGS...` through the console entry point; returns (exit code, stdout, stderr)."""
    wide = Console(stderr=True, width=400)
    monkeypatch.setattr(execute_cli, "err", wide)
    monkeypatch.setattr(vfl_cli, "err", wide)
    monkeypatch.setattr(vfl_cli, "out", Console(width=400))

    def invoke(*args):
        monkeypatch.setattr(sys, "argv", ["execute", *map(str, args)])
        try:
            execute_cli.main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 0
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return invoke


# ----------------------------------------------------------------------------- workload


def test_sizes_match_the_modules():
    cfg = wl.load_vfl_workload("vfl-wdl")
    assert wl.activation_bytes(cfg) == wl.gradient_bytes(cfg) == cfg.batch_size * 256 * 4
    passive = sum(p.numel() for p in wl.passive_bottom_model(cfg).parameters())
    active = sum(p.numel() for m in (wl.active_bottom_model(cfg), wl.top_model(cfg)) for p in m.parameters())
    assert passive == wl.passive_parameter_count(cfg)
    assert active == wl.active_parameter_count(cfg)
    # forward FLOPs: 2 per multiply-add of every linear layer
    b = cfg.batch_size
    emb = cfg.passive_num_fields * cfg.passive_embedding_dim
    assert wl.passive_forward_flops(cfg) == 2 * b * (emb * 256 + 256 * 256)
    assert wl.active_forward_flops(cfg) == 2 * b * (13 * 64 + 64 * 64 + (256 + 64) * 128 + 128 * 1)
    assert wl.active_backward_flops(cfg) > wl.active_forward_flops(cfg)
    assert wl.batches_per_epoch(cfg) == cfg.num_samples // cfg.batch_size
    assert wl.local_update_flops(cfg, "active") > wl.local_update_flops(cfg, "active", weighting=False)


def test_each_party_gets_only_its_own_data_deterministically():
    cats = wl.passive_features(TINY)
    dense, labels = wl.active_features_and_labels(TINY)
    assert cats.shape == (TINY.num_samples, TINY.passive_num_fields) and cats.dtype == np.int64
    assert cats.min() >= 0 and cats.max() < TINY.passive_hash_buckets
    assert dense.shape == (TINY.num_samples, TINY.active_num_dense) and set(np.unique(labels)) == {0.0, 1.0}
    wl._generate.cache_clear()
    assert np.array_equal(wl.passive_features(TINY), cats)  # same seed, same data
    other = wl.load_vfl_workload("vfl-wdl-tiny", seed=1)
    assert not np.array_equal(wl.passive_features(other), cats)
    # both parties compute the same batch order
    assert np.array_equal(wl.batch_indices(TINY, 3, 2), wl.batch_indices(TINY, 3, 2))
    assert not np.array_equal(wl.batch_indices(TINY, 0, 0), wl.batch_indices(TINY, 1, 0))


def test_signal_is_split_across_both_parties():
    # The label depends on both parties' features: each side's features alone predict it, but only partly.
    cats = wl.passive_features(TINY)
    dense, labels = wl.active_features_and_labels(TINY)
    active_only = auc(dense @ np.linalg.lstsq(dense, labels - labels.mean(), rcond=None)[0], labels)
    bucket_rate = np.zeros((TINY.passive_num_fields, TINY.passive_hash_buckets))
    for f in range(TINY.passive_num_fields):
        sums = np.bincount(cats[:, f], labels, TINY.passive_hash_buckets)
        counts = np.maximum(np.bincount(cats[:, f], None, TINY.passive_hash_buckets), 1)
        bucket_rate[f] = sums / counts - labels.mean()
    passive_only = auc(bucket_rate[np.arange(TINY.passive_num_fields), cats].sum(1), labels)
    assert 0.58 < active_only < 0.9 and 0.58 < passive_only < 0.95


def test_workload_names_and_files(tmp_path):
    with pytest.raises(UnknownNameError, match="vfl-wdl"):
        wl.load_vfl_workload("vfl-wd")
    path = tmp_path / "mine.yaml"
    path.write_text("family: vfl-wdl\nnum_samples: 5000\nbatch_size: 100\n")
    assert wl.is_vfl_workload(str(path)) and wl.load_vfl_workload(str(path)).num_samples == 5000
    path.write_text("family: vfl-wdl\nbatch_size: -1\n")
    with pytest.raises(SpecError, match="batch_size"):
        wl.load_vfl_workload(str(path))
    with pytest.raises(SpecError):
        wl.load_vfl_workload("vfl-wdl", batch_size=10**7)


# ----------------------------------------------------------------------------- modes, in process


def _pair(certs, active_kw=None, passive_kw=None, **common):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results, errors = {}, {}

    def go(party, **kw):
        try:
            results[party] = run_party(PartyConfig(party=party, workload=TINY, certs=str(certs), **common, **kw))
        except Exception as exc:
            errors[party] = exc

    active = threading.Thread(target=go, args=("active",), kwargs={"listen": ("127.0.0.1", port), **(active_kw or {})})
    active.start()
    go("passive", connect=("127.0.0.1", port), **(passive_kw or {}))
    active.join(60)
    return results, errors


@pytest.mark.parametrize("mode,w,r", [("vanilla", 1, 1), ("fedbcd", 1, 3), ("celu", 3, 3)])
def test_modes_train_and_count_their_updates(certs, mode, w, r):
    results, errors = _pair(certs, mode=mode, workset=w, local_updates=r, epochs=2, eval_every=32)
    assert not errors, errors
    active, passive = results["active"], results["passive"]
    rounds = 2 * wl.batches_per_epoch(TINY)
    assert active.rounds == passive.rounds == rounds
    assert active.final_auc > 0.62  # it learns (0.5 is chance)
    assert [e["round"] for e in active.evals] == [32, 64]
    if mode == "fedbcd":
        assert active.local_updates_done == passive.local_updates_done == rounds * (r - 1)
    elif mode == "celu":
        # each batch feeds at most R-1 cached updates, never later than W*R updates after it arrived
        assert 0 < active.local_updates_done <= rounds * (r - 1)
        assert active.max_staleness <= w * r and passive.max_staleness <= w * r
    else:
        assert active.local_updates_done == 0


def test_parties_that_disagree_are_refused(certs):
    _results, errors = _pair(
        certs, active_kw={"local_updates": 2}, passive_kw={"local_updates": 3}, mode="fedbcd", epochs=1
    )
    assert isinstance(errors.get("active"), UserError) and isinstance(errors.get("passive"), UserError)
    assert "disagree on local_updates" in str(errors["active"])


def test_config_checks():
    with pytest.raises(UserError, match="vanilla VFL has W=1 and R=1"):
        PartyConfig(party="active", workload=TINY, certs=".", mode="vanilla", workset=2).check()
    with pytest.raises(UserError, match="FedBCD reuses only the latest batch"):
        PartyConfig(party="active", workload=TINY, certs=".", mode="fedbcd", workset=3).check()
    with pytest.raises(UserError, match="--resume needs --checkpoint-dir"):
        PartyConfig(party="active", workload=TINY, certs=".", resume=True).check()


# ----------------------------------------------------------------------------- CLI


def test_keys_command_refuses_to_overwrite(execute, tmp_path):
    code, out, _ = execute("vfl", "keys", "--out", tmp_path / "k")
    assert code == 0 and "wrote" in out and (tmp_path / "k" / "passive" / "passive.key").stat().st_mode & 0o077 == 0
    code, _, err = execute("vfl", "keys", "--out", tmp_path / "k")
    assert code == 2 and "--force" in err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--party", "middle"], "--party must be active or passive"),
        (["--party", "passive"], "needs --peer HOST:PORT"),
        (["--party", "active", "--peer", "h:1"], "the active party listens"),
        (["--party", "passive", "--peer", "nohost"], "--peer must be HOST:PORT"),
        (["--party", "active", "--mode", "vanilla", "-W", "3"], "vanilla VFL has W=1 and R=1"),
        (["--party", "active", "--mode", "warp"], "--mode must be vanilla, fedbcd or celu"),
        (["--party", "active", "--sampling", "random"], "--sampling must be uniform or latest"),
        (["--party", "active", "--workload", "vfl-wdll"], "unknown VFL workload 'vfl-wdll'"),
        (["--party", "active", "--set", "batch_size"], "--set takes KEY=VALUE"),
        (["--party", "active", "--cluster", "cpu-local"], "needs two sites"),
    ],
)
def test_run_bad_input(execute, certs, args, message):
    code, _, err = execute("vfl", "run", "--certs", certs, *args)
    assert code == 2, err
    assert message in err


def test_run_bad_plan_and_certs(execute, certs, tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text("tp: 1\n")
    code, _, err = execute("vfl", "run", "--party", "active", "--certs", certs, "--plan", plan)
    assert code == 2 and "has no federated section" in err
    plan.write_text("federated: {parties: [dc-a, dc-x], mode: celu, workset: 2, local_updates: 2}\n")
    code, _, err = execute(
        "vfl", "run", "--party", "active", "--certs", certs, "--plan", plan, "--cluster", "two-sites-wan"
    )
    assert code == 2 and "names site 'dc-x'" in err
    plan.write_text("federated: {parties: [dc-a, dc-b], mode: turbo}\n")
    code, _, err = execute("vfl", "run", "--party", "active", "--certs", certs, "--plan", plan)
    assert code == 2 and "mode" in err
    code, _, err = execute("vfl", "run", "--party", "active", "--certs", tmp_path)
    assert code == 2 and "execute vfl keys" in err
    existing = tmp_path / "result.json"
    existing.write_text("{}")
    code, _, err = execute("vfl", "run", "--party", "active", "--certs", certs, "--out", existing)
    assert code == 2 and "already exists" in err


def test_execute_with_a_vfl_workload_routes_or_explains(execute, tmp_path):
    code, _, err = execute("--workload", "vfl-wdl", "--cluster", "two-sites-wan", "--plan", "tp=1")
    assert code == 2 and "--party active" in err


def test_local_runs_both_parties_as_processes(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text("federated: {parties: [dc-a, dc-b], mode: celu, workset: 2, local_updates: 3}\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "executor.vfl.cli",
            "local",
            "--json",
            "--plan",
            str(plan),
            "--cluster",
            "two-sites-wan",
            "--workload",
            "vfl-wdl-tiny",
            "--max-rounds",
            "24",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["mode"] == "celu" and data["workset"] == 2 and data["local_updates_per_batch"] == 3
    assert data["rounds"] == 24 and data["final_auc"] > 0.5 and data["sites"] == ["dc-a", "dc-b"]


# ----------------------------------------------------------------------------- the shaped WAN (test tooling)

_ECHO_SERVER = r"""
import socket, sys
host, port = sys.argv[1].rsplit(":", 1)
s = socket.create_server((host, int(port)))
print("listening", flush=True)  # the relay resets a client that arrives before this (it cannot reach us yet)
c, _ = s.accept()
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while True:
    h = c.recv(8, socket.MSG_WAITALL)
    if len(h) < 8: break
    n = int.from_bytes(h, "big"); got = 0
    while got < n: got += len(c.recv(min(1 << 20, n - got)))
    c.sendall(h + b"x" * n)
"""
_PING_CLIENT = r"""
import socket, sys, time
host, port = sys.argv[1].rsplit(":", 1)
for attempt in range(50):
    try:
        c = socket.create_connection((host, int(port))); break
    except OSError: time.sleep(0.1)
for n in (1, 1 << 20):
    c.sendall(n.to_bytes(8, "big") + b"y" * n)
    h = c.recv(8, socket.MSG_WAITALL); body = b""
    while len(body) < n: body += c.recv(min(1 << 20, n - len(body)))
    print(n, int.from_bytes(h, "big"), body == b"x" * n)
"""


def _qdisc(ns: str, dev: str) -> dict:
    out = subprocess.run(["tc", "-j", "-n", ns, "qdisc", "show", "dev", dev], capture_output=True, text=True).stdout
    (root,) = [q for q in json.loads(out) if q.get("root")]
    return root


def test_shaped_link_is_set_to_the_rate_and_the_delay_and_carries_the_bytes():
    # What the link is set to, not how long a transfer took on this machine (a loaded machine only adds to
    # that): benchmarks/vfl_wan.py measures the link it runs on and records it beside its results.
    sys.path.insert(0, str(REPO_ROOT / "benchmarks" / "wan"))
    from netns import ShapedLink, namespaces_available

    ok, why = namespaces_available()
    if not ok:
        pytest.skip(f"network namespaces unavailable here: {why}")
    rate, delay = 50e6, 0.015
    with ShapedLink(rate, delay) as link:
        namespaces = set(link.ns.values())
        # Both ends shape their egress to the rate (tc reports it in bytes/s) ...
        qdiscs = {party: _qdisc(link.ns[party], link.veth[party]) for party in ("active", "passive")}
        for qdisc in qdiscs.values():
            assert qdisc["kind"] == ("netem" if link.use_netem else "tbf"), qdisc
            if not link.use_netem:
                assert qdisc["options"]["rate"] == rate / 8, qdisc
        # ... and the delay is netem's, or the relay's the passive party dials through.
        if link.use_netem:
            text = subprocess.run(
                ["tc", "-n", link.ns["active"], "qdisc", "show", "dev", link.veth["active"]],
                capture_output=True,
                text=True,
            ).stdout
            assert "delay 15ms" in text and "rate 50Mbit" in text, text
        else:
            args = link._relay.args
            assert float(args[args.index("--delay") + 1]) == delay
            assert link.active_address.endswith(f":{link.relay_port}")  # the passive party goes through it
        server = link.run_in(
            "active", [sys.executable, "-c", _ECHO_SERVER, link.active_listen], stdout=subprocess.PIPE, text=True
        )
        assert server.stdout.readline().strip() == "listening"
        client = link.run_in(
            "passive", [sys.executable, "-c", _PING_CLIENT, link.active_address], stdout=subprocess.PIPE, text=True
        )
        out, _ = client.communicate(timeout=60)
        server.wait(timeout=10)
    # One byte and one MiB went across and came back whole.
    assert out.split() == ["1", "1", "True", str(1 << 20), str(1 << 20), "True"]
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(ns in left for ns in namespaces)  # removed afterwards
