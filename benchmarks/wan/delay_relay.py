"""A TCP relay that adds a fixed one-way propagation delay in each direction (test tooling, not product code).

Where the kernel has no `sch_netem`, the shaped WAN is: rate limited by `tc tbf` on a veth pair, plus this
relay on the path, which holds every chunk it reads for `delay` seconds before writing it on. Bytes pass
through unchanged (TLS stays end to end between the parties). With `--record DIR` it also writes each
connection's two byte streams to files, so a test can inspect what crossed the wire.

    python benchmarks/wan/delay_relay.py --listen 10.77.0.1:47001 --target 127.0.0.1:47000 --delay 0.02
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import itertools
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

CHUNK = 256 * 1024


class DelayRelay:
    """Accepts connections on `listen` and relays each to `target`, delaying both directions by `delay` s."""

    def __init__(
        self, listen: tuple[str, int], target: tuple[str, int], delay: float, record: Path | None = None, mangle=None
    ) -> None:
        self.target, self.delay, self.record = target, delay, record
        self.mangle = (
            mangle  # optional callable(direction, offset, bytes) -> (bytes to pass on, cut the link after them)
        )
        self.server = socket.create_server(listen)
        self.address = self.server.getsockname()[:2]
        self._stop = threading.Event()
        self._counter = itertools.count()
        self.connections = 0

    def serve_forever(self) -> None:
        self.server.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            n = next(self._counter)
            self.connections += 1
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for src, dst, name in ((client, upstream, "forward"), (upstream, client, "backward")):
                # The pipe thread writes and closes it when its connection ends: no `with` block can span that.
                sink = open(self.record / f"conn{n}-{name}.bin", "wb") if self.record else None  # noqa: SIM115
                threading.Thread(target=self._pipe, args=(src, dst, name, sink), daemon=True).start()

    def start(self) -> DelayRelay:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.server.close()

    def _pipe(self, src: socket.socket, dst: socket.socket, direction: str, sink) -> None:
        """Read from src as fast as it comes; write each chunk to dst once it is `delay` old."""
        queue: list = []
        cond = threading.Condition()
        done = [False]

        def writer() -> None:
            while True:
                with cond:
                    while not queue and not done[0]:
                        cond.wait()
                    if not queue:
                        break
                    due, _, data = queue[0]
                    wait = due - time.monotonic()
                    if wait > 0:
                        cond.wait(wait)
                        continue
                    heapq.heappop(queue)
                if data is None:
                    break
                try:
                    dst.sendall(data)
                except OSError:
                    break
            _shut(dst)

        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        order, offset = itertools.count(), 0
        try:
            while True:
                data = src.recv(CHUNK)
                if not data:
                    break
                if sink:
                    sink.write(data)
                cut = False
                if self.mangle is not None:
                    data, cut = self.mangle(direction, offset, data)
                offset += len(data)
                if data:
                    with cond:
                        heapq.heappush(queue, (time.monotonic() + self.delay, next(order), data))
                        cond.notify()
                if cut:  # the mangler cut the link here
                    break
        except OSError:
            pass
        with cond:
            heapq.heappush(queue, (time.monotonic() + self.delay, next(order), None))
            cond.notify()
        thread.join()
        if sink:
            sink.close()
        _shut(src)


class TlsRecords:
    """Follows the TLS record framing of one direction of a relayed stream (for manglers in tests).

    `feed(data)` returns the records completed so far as (start offset in the stream, body length)."""

    def __init__(self) -> None:
        self._buf = b""
        self._base = 0
        self.records: list[tuple[int, int]] = []

    def feed(self, data: bytes) -> list[tuple[int, int]]:
        self._buf += data
        pos = 0
        while len(self._buf) - pos >= 5:
            length = int.from_bytes(self._buf[pos + 3 : pos + 5], "big")
            if len(self._buf) - pos < 5 + length:
                break
            self.records.append((self._base + pos, length))
            pos += 5 + length
        self._base += pos
        self._buf = self._buf[pos:]
        return self.records


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", required=True, help="HOST:PORT to accept on")
    parser.add_argument("--target", required=True, help="HOST:PORT to relay to")
    parser.add_argument("--delay", type=float, required=True, help="one-way delay in seconds, each direction")
    parser.add_argument("--record", type=Path, help="folder to write each connection's byte streams to")
    args = parser.parse_args()
    relay = DelayRelay(_address(args.listen), _address(args.target), args.delay, args.record)
    signal.signal(signal.SIGTERM, lambda *_: (relay.stop(), os._exit(0)))
    print(f"relaying {args.listen} -> {args.target} with {args.delay * 1e3:g} ms each way", flush=True)
    try:
        relay.serve_forever()
    except KeyboardInterrupt:
        relay.stop()
    sys.exit(0)


if __name__ == "__main__":
    main()
