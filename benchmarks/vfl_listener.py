"""How long the real VFL peer waits to connect while idle TCP clients hold connections open to the active
party's listener (issue 20: on main each idle client cost the peer one 10 s handshake timeout).

    PYTHONPATH=. python benchmarks/vfl_listener.py --idle 0 20 50
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import threading
import time

from executor.vfl.channel import Channel
from executor.vfl.keys import make_keys


def connect_time(certs: str, idle: int) -> float:
    """Seconds from the peer's first connection attempt until its channel is open."""
    server = Channel("active", certs, listen=("127.0.0.1", 0), connect_timeout=120.0)
    thread = threading.Thread(target=server.open, daemon=True)
    thread.start()
    while server.listen_addr[1] == 0:
        time.sleep(0.01)
    address = tuple(server.listen_addr)
    parked = [socket.create_connection(address) for _ in range(idle)]
    started = time.perf_counter()
    client = Channel("passive", certs, connect=address, connect_timeout=120.0).open()
    elapsed = time.perf_counter() - started
    thread.join()
    client.close()
    server.close()
    for s in parked:
        s.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle", type=int, nargs="+", default=[0, 20, 50])
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vfl-bench-") as certs:
        make_keys(certs)
        print("| idle TCP connections | peer connected after (s) |\n|---|---|")
        for idle in opts.idle:
            print(f"| {idle} | {connect_time(certs, idle):.3f} |")


if __name__ == "__main__":
    main()
