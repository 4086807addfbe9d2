"""The VFL listener (issue 20): idle TCP clients cannot hold up the real peer, a port in use is a clear
error, and key files are private from their creation.

On main the listener handshook one connection at a time with a 10 s timeout each, so 20 idle connections
held the real peer back for 200 s, past its connect timeout. Here the handshake timeout is set far beyond
the client's connect timeout: the peer connecting at all proves it was not queued behind the idle ones
(an ordering check, no wall-clock threshold)."""

from __future__ import annotations

import socket
import stat
import threading

import pytest

from executor.vfl.channel import Channel
from executor.vfl.keys import make_keys
from hwmodel.errors import UserError


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("certs")
    make_keys(folder)
    return folder


def test_twenty_idle_connections_do_not_delay_the_real_peer(certs):
    server = Channel("active", certs, listen=("127.0.0.1", 0), handshake_timeout=600.0, connect_timeout=60.0)
    box: dict = {}
    idle: list[socket.socket] = []

    def serve() -> None:
        try:
            server.open()
            box["ok"] = True
        except Exception as exc:
            box["error"] = exc

    # open() binds first; wait for the port, then park 20 silent clients on it before the peer dials.
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    while server.listen_addr[1] == 0 and thread.is_alive():  # bound: open() sets the real port
        threading.Event().wait(0.01)
    address = tuple(server.listen_addr)
    idle = [socket.create_connection(address) for _ in range(20)]
    try:
        client = Channel("passive", certs, connect=address, connect_timeout=20.0, handshake_timeout=20.0).open()
        thread.join(timeout=30)
        assert box.get("ok"), box
        client.close()
    finally:
        for s in idle:
            s.close()
        server.close()


def test_a_port_in_use_is_a_user_error_naming_it(certs):
    taken = socket.create_server(("127.0.0.1", 0))
    try:
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=f"127.0.0.1:{port}.*in use"):
            Channel("active", certs, listen=("127.0.0.1", port), connect_timeout=1.0).open()
    finally:
        taken.close()


def test_each_party_gets_its_own_folder_and_private_keys_are_mode_0600(certs):
    keys = sorted(certs.rglob("*.key"))
    assert [k.relative_to(certs).as_posix() for k in keys] == ["active/active.key", "ca/ca.key", "passive/passive.key"]
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    # A party's folder holds the CA certificate and its own pair, never the CA key or the other party's key.
    for party, other in (("active", "passive"), ("passive", "active")):
        assert sorted(p.name for p in (certs / party).iterdir()) == sorted(["ca.crt", f"{party}.crt", f"{party}.key"])
        assert other not in " ".join(p.name for p in (certs / party).iterdir())


def test_gradient_noise_is_off_by_default_and_scaled_to_the_gradient():
    import torch

    from executor.vfl.party import PartyConfig, gradient_noise

    assert PartyConfig.__dataclass_fields__["grad_noise"].default == 0.0
    grad = torch.arange(1.0, 4097.0).reshape(64, 64) / 4096
    assert gradient_noise(grad, 0.0, 1) is grad
    noised = gradient_noise(grad, 2.0, 1)
    assert torch.equal(noised, gradient_noise(grad, 2.0, 1))  # seeded: a resumed run sends the same
    # The noise's RMS is the scale times the gradient's RMS (4096 draws: within 10%).
    ratio = float((noised - grad).pow(2).mean().sqrt() / grad.pow(2).mean().sqrt())
    assert 1.8 < ratio < 2.2
