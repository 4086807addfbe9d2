"""Security of the VFL channel: mutual TLS refuses outsiders before any data moves; tampered, truncated or
off-protocol messages stop the run with a clear error; what crosses the wire is only the agreed activation and
gradient tensors (and small control messages), never raw features or labels."""

from __future__ import annotations

import json
import socket
import ssl
import sys
import threading
import time

import numpy as np
import pytest

from executor.vfl.channel import (
    Channel,
    ChannelError,
    MsgType,
    PeerFailed,
    PeerGone,
    ProtocolViolation,
    Refused,
    TamperedMessage,
    TensorSpec,
    TruncatedMessage,
    parse_frames,
)
from executor.vfl.keys import make_keys
from executor.vfl.party import PartyConfig, run_party
from tests.helpers import REPO_ROOT
from workloads import vfl as wl

sys.path.insert(0, str(REPO_ROOT / "benchmarks" / "wan"))
from delay_relay import DelayRelay, TlsRecords

# Frames of 64 x 128 float32 = 32 KiB span several TLS records, so a cut inside one leaves part of a frame read.
WORKLOAD = wl.load_vfl_workload(
    "vfl-wdl-tiny", interface_dim=128, batch_size=64, num_samples=1024, num_test_samples=256
)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("certs")
    make_keys(folder)
    return folder


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("other-ca")
    make_keys(folder)
    return folder


def _server(certs, **kw) -> Channel:
    return Channel("active", certs, listen=("127.0.0.1", 0), **kw)


def _open_server_in_thread(server: Channel):
    """Bind the server now (so its port is known) and accept in a thread; returns (thread, outcome)."""
    box: dict = {}
    server._listener = socket.create_server(("127.0.0.1", 0))
    server.listen_addr = server._listener.getsockname()[:2]

    def accept() -> None:
        try:
            server._connect(time.monotonic() + server.connect_timeout, first=True)
            box["ok"] = True
        except Exception as exc:
            box["error"] = exc

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    return thread, box


# ------------------------------------------------------------------------- authentication


def test_client_with_a_certificate_from_another_ca_is_refused_before_any_data(certs, other_certs):
    server = _server(certs, connect_timeout=2.0)
    thread, box = _open_server_in_thread(server)
    intruder = Channel("passive", other_certs, connect=tuple(server.listen_addr), connect_timeout=2.0)
    with pytest.raises(Refused, match="certificate"):
        intruder.open()
    thread.join(10)
    assert isinstance(box.get("error"), PeerGone) and "refused" in str(box["error"])
    assert server.refused, "the server should log the refused connection"
    # nothing moved in either direction: no message sent or received by anyone
    assert server.sent_seq == server.received == intruder.sent_seq == intruder.received == 0
    server.close()


def test_client_without_any_certificate_is_refused(certs):
    server = _server(certs, connect_timeout=2.0)
    thread, box = _open_server_in_thread(server)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection(tuple(server.listen_addr))
    with pytest.raises((ssl.SSLError, OSError)), ctx.wrap_socket(raw) as sock:
        sock.settimeout(5)
        if not sock.recv(100):  # the server's first message would arrive here; an alert does instead
            raise ConnectionError("closed without data")
    thread.join(10)
    assert isinstance(box.get("error"), PeerGone)
    assert any("certificate" in reason.lower() or "peer did not return" in reason.lower() for reason in server.refused)
    server.close()


def test_server_with_a_foreign_certificate_is_refused_by_the_client(certs, other_certs):
    server = _server(other_certs, connect_timeout=2.0)
    thread, _ = _open_server_in_thread(server)
    honest = Channel("passive", certs, connect=tuple(server.listen_addr), connect_timeout=2.0)
    with pytest.raises(Refused, match="TLS handshake"):
        honest.open()
    assert honest.received == 0
    thread.join(10)
    server.close()


def test_a_party_certificate_for_the_wrong_role_is_refused(certs, tmp_path):
    # The active party's own (valid, CA-signed) certificate presented as if it were the passive party's.
    for name in ("ca.crt",):
        (tmp_path / name).write_bytes((certs / "active" / name).read_bytes())
    (tmp_path / "passive.crt").write_bytes((certs / "active" / "active.crt").read_bytes())
    (tmp_path / "passive.key").write_bytes((certs / "active" / "active.key").read_bytes())
    server = _server(certs, connect_timeout=2.0)
    thread, _box = _open_server_in_thread(server)
    impostor = Channel("passive", tmp_path, connect=tuple(server.listen_addr), connect_timeout=2.0)
    with pytest.raises(ChannelError):
        impostor.open()
    thread.join(10)
    assert any("expected 'vfl-passive'" in reason for reason in server.refused)
    server.close()


# ------------------------------------------------------------------------- message checks


@pytest.fixture()
def pair(certs):
    server = _server(certs, connect_timeout=5.0, timeout=5.0)
    thread, box = _open_server_in_thread(server)
    client = Channel("passive", certs, connect=tuple(server.listen_addr), connect_timeout=5.0, timeout=5.0).open()
    thread.join(10)
    assert box.get("ok")
    specs = {MsgType.ACTIVATIONS: TensorSpec(cols=8, rows=4), MsgType.GRADIENTS: TensorSpec(cols=8, rows=4)}
    server.specs = client.specs = specs
    yield server, client
    server.close()
    client.close()


def test_agreed_tensor_passes(pair):
    server, client = pair
    data = np.arange(32, dtype=np.float32).reshape(4, 8)
    client.send_tensor(MsgType.ACTIVATIONS, 7, data)
    msg = server.recv(MsgType.ACTIVATIONS)
    assert msg.tag == 7 and np.array_equal(msg.payload, data)


def test_wrong_shape_is_refused(pair):
    server, client = pair
    client._send(MsgType.ACTIVATIONS, 0, 1, (4, 9), np.zeros((4, 9), np.float32).tobytes())
    with pytest.raises(ProtocolViolation, match=r"shape \[4, 9\].*agreed shape is \[4, 8\]"):
        server.recv(MsgType.ACTIVATIONS)


def test_sender_refuses_to_send_a_wrong_shape(pair):
    _, client = pair
    with pytest.raises(ProtocolViolation):
        client.send_tensor(MsgType.ACTIVATIONS, 0, np.zeros((5, 8), np.float32))


def test_unexpected_message_type_is_refused(pair):
    server, client = pair
    client.send_tensor(MsgType.GRADIENTS, 0, np.zeros((4, 8), np.float32))
    with pytest.raises(ProtocolViolation, match="GRADIENTS message while ACTIVATIONS was expected"):
        server.recv(MsgType.ACTIVATIONS)


def test_payload_length_must_match_shape(pair):
    server, client = pair
    client._send(MsgType.ACTIVATIONS, 0, 1, (4, 8), b"\0" * 100)
    with pytest.raises(ProtocolViolation, match="carries 100 bytes"):
        server.recv(MsgType.ACTIVATIONS)


def test_non_finite_values_are_refused(pair):
    server, client = pair
    bad = np.zeros((4, 8), np.float32)
    bad[1, 2] = np.nan
    client._send(MsgType.ACTIVATIONS, 0, 1, (4, 8), bad.tobytes())
    with pytest.raises(ProtocolViolation, match="non-finite"):
        server.recv(MsgType.ACTIVATIONS)


def test_garbage_inside_tls_is_refused(pair):
    server, client = pair
    client._write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\0" * 40)
    with pytest.raises(ProtocolViolation, match="not a hetplan VFL"):
        server.recv(MsgType.ACTIVATIONS)


def test_peer_error_stops_the_receiver_with_its_message(pair):
    server, client = pair
    client.send_error("disk full")
    with pytest.raises(PeerFailed, match="disk full"):
        server.recv(MsgType.ACTIVATIONS)


# ------------------------------------------------------------------------- whole runs through a relay


def _attack_after_a_full_record(kind: str):
    """A relay mangler acting on the passive -> active stream, inside the record after the first full-size record
    of application data (so the frame it hits has already been partly read)."""
    records = TlsRecords()
    done = {"hit": False}

    def mangle(direction: str, offset: int, data: bytes):
        if direction != "forward" or done["hit"]:
            return data, False
        fulls = [(start, length) for start, length in records.feed(data) if length > 16000]
        if not fulls:
            return data, False
        start, length = fulls[0]
        target = start + 5 + length + 5 + 50  # 50 bytes into the next record's body
        if not offset <= target < offset + len(data):
            if target < offset:  # already passed (one big read): hit the next chunk's first bytes
                target = offset
            else:
                return data, False
        done["hit"] = True
        cut = target - offset
        if kind == "truncate":
            return data[:cut], True
        flipped = bytearray(data)
        flipped[cut] ^= 0x40
        return bytes(flipped), False

    return mangle


def _run_pair(certs, workload, relay_kwargs=None, active_kw=None, passive_kw=None, tap=None, **common):
    """Run both parties in threads of this process, the passive one through a DelayRelay; returns (results, errors)."""
    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    relay = DelayRelay(("127.0.0.1", 0), ("127.0.0.1", port), **(relay_kwargs or {"delay": 0.0})).start()
    results, errors = {}, {}

    def go(party, **kw):
        try:
            results[party] = run_party(PartyConfig(party=party, workload=workload, certs=str(certs), **common, **kw))
        except Exception as exc:
            errors[party] = exc

    active = threading.Thread(target=go, args=("active",), kwargs={"listen": ("127.0.0.1", port), **(active_kw or {})})
    active.start()
    time.sleep(0.2)
    passive = threading.Thread(
        target=go, args=("passive",), kwargs={"connect": tuple(relay.address), **(passive_kw or {})}
    )
    passive.start()
    active.join(60)
    passive.join(60)
    relay.stop()
    assert not active.is_alive() and not passive.is_alive(), "a party did not stop"
    return results, errors


@pytest.mark.parametrize("attack,error", [("tamper", TamperedMessage), ("truncate", TruncatedMessage)])
def test_tampered_or_truncated_message_stops_the_run(certs, attack, error):
    # _run_pair fails the test if a party is still running after its join timeout; the errors below say both
    # stopped because of the attack (not by a timeout of their own).
    _results, errors = _run_pair(
        certs,
        WORKLOAD,
        relay_kwargs={"delay": 0.0, "mangle": _attack_after_a_full_record(attack)},
        epochs=1,
        reconnect_timeout=3.0,
        connect_timeout=10.0,
        timeout=20.0,
    )
    assert isinstance(errors.get("active"), error), errors
    message = str(errors["active"])
    assert ("integrity check" in message) if attack == "tamper" else ("truncated message" in message)
    assert isinstance(errors.get("passive"), ChannelError), errors  # the other side stops too


def test_only_agreed_tensors_cross_the_wire(certs, tmp_path):
    frames = {"active": [], "passive": []}
    record = tmp_path / "wire"
    record.mkdir()

    def tap_for(party):
        return lambda direction, frame: frames[party].append(frame)

    _results, errors = _run_pair(
        certs,
        WORKLOAD,
        relay_kwargs={"delay": 0.0, "record": record},
        epochs=1,
        eval_every=8,
        active_kw={"tap": tap_for("active")},
        passive_kw={"tap": tap_for("passive")},
        mode="celu",
        workset=2,
        local_updates=2,
    )
    assert not errors, errors
    batch, width = WORKLOAD.batch_size, WORKLOAD.interface_dim
    allowed = {
        "passive": {MsgType.HELLO, MsgType.ACTIVATIONS, MsgType.EVAL_ACTIVATIONS, MsgType.CONTROL},
        "active": {MsgType.HELLO, MsgType.GRADIENTS, MsgType.CONTROL},
    }
    json_keys = {
        MsgType.HELLO: {
            "workload",
            "mode",
            "workset",
            "local_updates",
            "total_rounds",
            "eval_every",
            "checkpoint_every",
            "party",
            "resume",
            "checkpoints",
        },
        MsgType.CONTROL: {"op"},
    }
    plaintext = {}
    for party, sent in frames.items():
        stream = b"".join(sent)
        plaintext[party] = stream
        parsed = parse_frames(stream)
        kinds = {f[0] for f in parsed}
        assert kinds <= allowed[party], (party, kinds)
        for kind, _, _, _dtype, dims, payload in parsed:
            if kind in json_keys:
                assert set(json.loads(payload)) <= json_keys[kind]
            elif kind == MsgType.EVAL_ACTIVATIONS:
                assert dims[1] == width and 1 <= dims[0] <= batch and len(payload) == 4 * dims[0] * dims[1]
            else:
                assert dims == (batch, width) and len(payload) == 4 * batch * width
        tensors = [f for f in parsed if f[0] in (MsgType.ACTIVATIONS, MsgType.GRADIENTS)]
        assert len(tensors) == wl.batches_per_epoch(WORKLOAD)
    # Raw data never appears: not the passive party's bucket ids, not the dense fields, not the labels.
    cats = wl.passive_features(WORKLOAD, "train")
    dense, labels = wl.active_features_and_labels(WORKLOAD, "train")
    everything = plaintext["active"] + plaintext["passive"]
    for step in range(4):
        idx = wl.batch_indices(WORKLOAD, 0, step)
        for raw in (
            cats[idx].tobytes(),
            cats[idx].astype(np.int32).tobytes(),
            dense[idx].tobytes(),
            labels[idx].tobytes(),
            labels[idx].astype(np.uint8).tobytes(),
            dense[idx][:, 0].tobytes(),
        ):
            assert raw not in everything
    # And on the wire itself there is only TLS: no frame header in the clear.
    wire = b"".join(p.read_bytes() for p in record.iterdir())
    assert len(wire) > sum(len(s) for s in plaintext.values())
    assert b"HVFL" not in wire
    assert all(p.read_bytes()[:1] == b"\x16" for p in record.iterdir() if p.stat().st_size)  # TLS handshake first
