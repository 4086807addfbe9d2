"""The parties' channel: TCP + TLS 1.3 with mutual authentication, framed, typed and checked messages.

Trust: each side loads the job CA (ca.crt) and its own certificate; both require the other's certificate,
signed by that CA and naming the other party (CN=vfl-active / vfl-passive). A connection that fails this is
refused during the TLS handshake, before either side sends a message. Whoever listens (the active party)
sends the first message, so a client the server refused learns of it before it sends anything.

Frames (inside TLS, big-endian):

    magic "HVFL" | version u8 | type u8 | dtype u8 | ndim u8 | seq u64 | tag u64 | payload_len u64 |
    dims u32 x ndim | payload

`type` is one of `MsgType`; `dtype` 0 is UTF-8 JSON (control messages, at most 64 KiB, keys checked by the
party), 1 is float32 little-endian; `seq` numbers the sequenced frames of each direction from 1; `tag` is the
training round (or evaluation batch) the message belongs to. A receiver accepts only the types it is waiting
for, in sequence, and only tensors of the agreed dtype and shape (`TensorSpec`), with finite values;
anything else stops the run with a `ChannelError` saying what arrived and what was expected.

Failures and what they do:

- a TLS record that fails its integrity check (tampered or corrupted in transit): `TamperedMessage`, stop;
- the connection ending in the middle of a frame: `TruncatedMessage`, stop;
- the connection ending between frames: reconnect (the client redials, the server accepts again, both prove
  they are the same session) and resend what the other side has not received; if that fails for
  `reconnect_timeout` seconds: `PeerGone`, stop;
- no frame for `timeout` seconds while waiting: `PeerGone`, stop;
- the peer reporting an error (an `ERROR` frame): `PeerFailed`, stop, with the peer's message.
"""

from __future__ import annotations

import contextlib
import json
import math
import queue
import secrets
import socket
import ssl
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np

from executor.vfl.keys import common_name, party_files
from hwmodel.errors import UserError

MAGIC = b"HVFL"
VERSION = 1
HEADER = struct.Struct("!4sBBBBQQQ")
MAX_JSON_BYTES = 64 * 1024
MAX_NDIM = 4
RESEND_BUFFER = 32  # sequenced frames kept for resending after a reconnect (the protocol is lock-step)


class MsgType(IntEnum):
    RESUME = 1  # JSON {"session", "received"}: opens every connection; not sequenced
    HELLO = 2  # JSON: what the party runs, to be checked against the peer's
    ACTIVATIONS = 3  # float32 [batch, interface_dim], passive -> active
    GRADIENTS = 4  # float32 [batch, interface_dim], active -> passive
    EVAL_ACTIVATIONS = 5  # float32 [<= batch, interface_dim], passive -> active, for the test AUC
    CONTROL = 6  # JSON {"op": ...}: end of training, checkpoint agreement
    ERROR = 7  # JSON {"message"}: the sender stops; so does the receiver


class DType(IntEnum):
    JSON = 0
    FLOAT32 = 1


class ChannelError(UserError):
    """The channel stopped the run; the message says why."""


class PeerGone(ChannelError):
    pass


class PeerFailed(ChannelError):
    pass


class TamperedMessage(ChannelError):
    pass


class TruncatedMessage(ChannelError):
    pass


class ProtocolViolation(ChannelError):
    pass


class Refused(ChannelError):
    pass


class _ConnectionLost(Exception):
    """The connection ended between frames (a reconnect may recover)."""


@dataclass(frozen=True)
class TensorSpec:
    """The agreed shape of a tensor message: `rows` exactly, or 1..`max_rows` when `rows` is None."""

    cols: int
    rows: int | None = None
    max_rows: int | None = None

    def check(self, kind: MsgType, dims: tuple[int, ...]) -> None:
        ok = (
            len(dims) == 2
            and dims[1] == self.cols
            and (dims[0] == self.rows if self.rows is not None else 1 <= dims[0] <= (self.max_rows or 0))
        )
        if not ok:
            want = f"[{self.rows if self.rows is not None else f'1..{self.max_rows}'}, {self.cols}]"
            raise ProtocolViolation(f"{kind.name} message of shape {list(dims)}; the agreed shape is {want} float32")


@dataclass
class Message:
    kind: MsgType
    tag: int
    payload: Any  # dict for JSON, np.ndarray (float32) for tensors


def tls_context(certs: str | Path, party: str, server: bool) -> ssl.SSLContext:
    """TLS 1.3 only, the job CA as the only trust anchor, our certificate presented, the peer's required."""
    ca, cert, key = party_files(certs, party)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    try:
        ctx.load_cert_chain(cert, key)
        ctx.load_verify_locations(cafile=str(ca))
    except (ssl.SSLError, OSError) as exc:
        raise UserError(f"--certs {certs}: cannot load the {party} party's certificate, key or CA: {exc}") from exc
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = False  # peers are named by the certificate's CN (checked after the handshake), not by host
    return ctx


def _subject_cn(cert: dict) -> str | None:
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


POLL_S = 0.05  # how often the listener looks for a finished handshake


def _close_late_winners(done: queue.Queue) -> None:
    """Close connections whose handshake finished after the one taken (a second client with valid keys)."""
    while True:
        try:
            sock, _ = done.get_nowait()
        except queue.Empty:
            return
        if sock is not None:
            sock.close()


def _frame(kind: MsgType, seq: int, tag: int, dtype: DType, dims: tuple[int, ...], payload: bytes) -> bytes:
    return (
        HEADER.pack(MAGIC, VERSION, kind, dtype, len(dims), seq, tag, len(payload))
        + struct.pack(f"!{len(dims)}I", *dims)
        + payload
    )


Frame = tuple[MsgType, int, int, DType, tuple[int, ...], bytes]


def check_header(magic: bytes, version: int, kind: int, dtype: int, ndim: int, source: str) -> tuple[MsgType, DType]:
    """The frame header checks both decoders make (the receiver and `parse_frames`): this protocol and version,
    a known kind and dtype, at most MAX_NDIM dims. `source` starts each message ("frame at byte 40", "active")."""
    if magic != MAGIC or version != VERSION:
        raise ProtocolViolation(f"{source}: not a hetplan VFL v{VERSION} frame")
    try:
        kind_, dtype_ = MsgType(kind), DType(dtype)
    except ValueError as exc:
        raise ProtocolViolation(f"{source}: unknown message type {kind} / dtype {dtype}") from exc
    if ndim > MAX_NDIM:
        raise ProtocolViolation(f"{source}: {kind_.name} message with {ndim} dims; at most {MAX_NDIM}")
    return kind_, dtype_


def parse_frames(data: bytes, columns: int | None = None, first_seq: int = 1) -> list[Frame]:
    """Split a plaintext byte stream into frames (kind, seq, tag, dtype, dims, payload); for tests and tools.

    It checks what the channel's receiver checks, so a tool never shows a malformed stream as if it were
    well formed: a complete header of this protocol, a known kind and dtype, at most MAX_NDIM dims, sequence
    numbers that count up from `first_seq` (a session's first message is 1; RESUME is not sequenced), a
    payload inside the stream, JSON that parses and stays under MAX_JSON_BYTES, tensors of 4 bytes per
    element with finite values and, when `columns` is given, 2-D with that many columns. A violation raises
    ProtocolViolation (TruncatedMessage for a
    stream cut short) naming the frame's byte offset."""
    out: list[Frame] = []
    pos, last_seq = 0, first_seq - 1
    while pos < len(data):
        frame, pos, last_seq = _parse_one_frame(data, pos, last_seq, columns)
        out.append(frame)
    return out


def _parse_one_frame(data: bytes, start: int, last_seq: int, columns: int | None) -> tuple[Frame, int, int]:
    where = f"frame at byte {start}"
    if len(data) - start < HEADER.size:
        raise TruncatedMessage(f"{where}: {len(data) - start} bytes left, a header takes {HEADER.size}")
    magic, version, kind_code, dtype_code, ndim, seq, tag, length = HEADER.unpack_from(data, start)
    kind, dtype = check_header(magic, version, kind_code, dtype_code, ndim, where)
    if kind != MsgType.RESUME:
        if seq != last_seq + 1:
            raise ProtocolViolation(f"{where}: message {seq} follows message {last_seq}")
        last_seq = seq
    pos = start + HEADER.size
    if len(data) - pos < 4 * ndim + length:
        raise TruncatedMessage(f"{where}: its dims and {length}-byte payload run past the stream's end")
    dims = struct.unpack_from(f"!{ndim}I", data, pos)
    pos += 4 * ndim
    payload = data[pos : pos + length]
    _check_frame_payload(where, kind, dtype, dims, payload, columns)
    return (kind, seq, tag, dtype, dims, payload), pos + length, last_seq


def _check_frame_payload(
    where: str, kind: MsgType, dtype: DType, dims: tuple[int, ...], payload: bytes, columns: int | None
) -> None:
    if dtype == DType.JSON:
        if dims or len(payload) > MAX_JSON_BYTES:
            raise ProtocolViolation(f"{where}: {kind.name} control message with dims or over {MAX_JSON_BYTES} bytes")
        try:
            json.loads(payload or b"{}")
        except ValueError as exc:
            raise ProtocolViolation(f"{where}: {kind.name} message is not valid JSON") from exc
        return
    if len(payload) != 4 * math.prod(dims):
        raise ProtocolViolation(f"{where}: shape {list(dims)} needs {4 * math.prod(dims)} bytes, got {len(payload)}")
    if columns is not None and (len(dims) != 2 or dims[0] < 1 or dims[1] != columns):
        raise ProtocolViolation(f"{where}: {kind.name} of shape {list(dims)}; the agreed shape is [rows, {columns}]")
    if not np.isfinite(np.frombuffer(payload, dtype="<f4")).all():
        raise ProtocolViolation(f"{where}: {kind.name} holds non-finite values")


class Channel:
    """One party's end of the link. Used from one thread (the party's main loop)."""

    def __init__(
        self,
        party: str,
        certs: str | Path,
        *,
        listen: tuple[str, int] | None = None,
        connect: tuple[str, int] | None = None,
        timeout: float = 120.0,
        connect_timeout: float = 60.0,
        reconnect_timeout: float = 15.0,
        handshake_timeout: float = 10.0,
        tap: Callable[[str, bytes], None] | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        assert (listen is None) != (connect is None), "a channel either listens or connects"
        self.party = party
        self.peer_party = "passive" if party == "active" else "active"
        self.server = listen is not None
        self.ctx = tls_context(certs, party, server=self.server)
        self.listen_addr, self.connect_addr = listen, connect
        self.timeout, self.connect_timeout = timeout, connect_timeout
        self.reconnect_timeout, self.handshake_timeout = reconnect_timeout, handshake_timeout
        self.tap = tap  # sees every plaintext frame sent: ("send", bytes)
        self.log = log or (lambda message: None)
        self.specs: dict[MsgType, TensorSpec] = {}
        self.session = secrets.token_hex(8) if self.server else None
        self.sent_seq = 0
        self.received = 0
        self._sent: deque[tuple[int, bytes]] = deque(maxlen=RESEND_BUFFER)
        self._listener: socket.socket | None = None
        self._sock: ssl.SSLSocket | None = None
        self.refused: list[str] = []  # connections refused at the handshake (server side)
        self.reconnects = 0
        self.bytes_sent = 0
        self.bytes_received = 0

    @property
    def _address(self) -> tuple[str, int]:
        """The address this channel listens on (server) or dials (client)."""
        addr = self.connect_addr or self.listen_addr
        assert addr is not None, "a channel either listens or connects"
        return addr

    @property
    def peer_name(self) -> str:
        addr = self._address
        return f"the {self.peer_party} party ({'at' if self.connect_addr else 'via'} {addr[0]}:{addr[1]})"

    # ---------------------------------------------------------------- connection

    def open(self) -> Channel:
        """Make the first connection (listen and accept, or dial with retries) within connect_timeout."""
        if self.server:
            try:
                self._listener = socket.create_server(self._address, reuse_port=False)
            except OSError as exc:
                host, port = self._address
                raise UserError(
                    f"--listen {host}:{port}: cannot listen there ({exc.strerror or exc}); the port may be in use by "
                    "another program: choose another port or stop that program"
                ) from None
            self.listen_addr = self._listener.getsockname()[:2]
            self.log(f"listening on {self.listen_addr[0]}:{self.listen_addr[1]} for the {self.peer_party} party")
        self._connect(time.monotonic() + self.connect_timeout, first=True)
        return self

    @property
    def port(self) -> int:
        return self._address[1]

    def close(self) -> None:
        for s in (self._sock, self._listener):
            if s is not None:
                with contextlib.suppress(OSError):
                    s.close()
        self._sock = self._listener = None

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _connect(self, deadline: float, first: bool) -> None:
        last = "no connection attempt finished"
        while time.monotonic() < deadline:
            try:
                sock = self._accept(deadline) if self.server else self._dial(deadline)
            except _Retry as exc:
                last = str(exc)
                if not self.server:
                    time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
                continue
            self._sock = sock
            self._exchange_resume(first)
            return
        what = "connect to" if first else "reconnect to"
        wait = self.connect_timeout if first else self.reconnect_timeout
        if self.refused:
            last += (
                f"; refused {len(self.refused)} connection(s) without valid credentials, the last {self.refused[-1]}"
            )
        raise PeerGone(f"could not {what} {self.peer_name} within {wait:g} s ({last})")

    def _accept(self, deadline: float) -> ssl.SSLSocket:
        """Accept connections until one completes the handshake as the peer. Each handshake runs in its own
        thread with its own timeout, so idle or slow clients (a port scanner, an intruder who never speaks)
        never delay the real peer: on main they were handled one at a time, 10 s each."""
        listener = self._listener
        assert listener is not None, "open() creates the listener before accepting"
        done: queue.Queue[tuple[ssl.SSLSocket | None, str]] = queue.Queue()
        last = "nobody connected"
        while time.monotonic() < deadline:
            try:
                sock, why = done.get_nowait()
            except queue.Empty:
                pass
            else:
                if sock is not None:
                    _close_late_winners(done)
                    return sock
                last = why
                continue
            # Short accept timeouts: a finished handshake is noticed within POLL_S.
            listener.settimeout(max(0.01, min(POLL_S, deadline - time.monotonic())))
            try:
                raw, addr = listener.accept()
            except TimeoutError:
                continue
            where = f"{addr[0]}:{addr[1]}"
            threading.Thread(target=self._handshake_into, args=(raw, where, done), daemon=True).start()
        raise _Retry(last)

    def _handshake_into(self, raw: socket.socket, where: str, done: queue.Queue) -> None:
        try:
            done.put((self._handshake(raw, where), ""))
        except _Retry as exc:
            done.put((None, str(exc)))
        except Exception as exc:  # a thread must not die silently: its failure is one more refused connection
            raw.close()
            done.put((None, f"handshake with {where}: {type(exc).__name__}: {exc}"))

    def _dial(self, deadline: float) -> ssl.SSLSocket:
        try:
            raw = socket.create_connection(
                self._address, timeout=max(0.01, min(self.handshake_timeout, deadline - time.monotonic()))
            )
        except OSError as exc:
            raise _Retry(f"{exc.strerror or exc}") from exc
        return self._handshake(raw, f"{self._address[0]}:{self._address[1]}")

    def _handshake(self, raw: socket.socket, where: str) -> ssl.SSLSocket:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw.settimeout(self.handshake_timeout)
        try:
            sock = self.ctx.wrap_socket(
                raw, server_side=self.server, do_handshake_on_connect=False, suppress_ragged_eofs=False
            )
            sock.do_handshake()
        except ssl.SSLError as exc:
            raw.close()
            reason = exc.reason or str(exc)
            if self.server:
                # Someone without valid credentials: refuse them and keep waiting for the real peer.
                self.refused.append(f"{where}: {reason}")
                self.log(f"refused a connection from {where}: TLS handshake failed ({reason})")
                raise _Retry(f"refused {where}: {reason}") from exc
            if isinstance(exc, ssl.SSLCertVerificationError) or "ALERT" in reason or "CERTIFICATE" in reason:
                raise Refused(
                    f"TLS handshake with {where} failed: {reason}; the {self.peer_party} party's certificate "
                    "is not from this job's CA, or ours is not accepted"
                ) from exc
            raise _Retry(f"TLS handshake with {where} broke off ({reason})") from exc
        except (TimeoutError, OSError) as exc:
            raw.close()
            raise _Retry(f"handshake with {where}: {exc}") from exc
        cn = _subject_cn(sock.getpeercert() or {})
        if cn != common_name(self.peer_party):
            sock.close()
            message = f"{where} presented a certificate for {cn!r}, expected {common_name(self.peer_party)!r}"
            if self.server:
                self.refused.append(message)
                self.log(f"refused a connection: {message}")
                raise _Retry(message)
            raise Refused(message)
        sock.settimeout(self.timeout)
        return sock

    def _exchange_resume(self, first: bool) -> None:
        """Open a connection: prove the session, then resend what the peer has not received."""
        try:
            if self.server:
                self._write(_frame(MsgType.RESUME, 0, 0, DType.JSON, (), self._resume_payload()))
                peer = self._read_frame({MsgType.RESUME}, sequenced=False)
            else:
                peer = self._read_frame({MsgType.RESUME}, sequenced=False)
                if self.session is None:
                    self.session = peer.payload.get("session")
                self._write(_frame(MsgType.RESUME, 0, 0, DType.JSON, (), self._resume_payload()))
        except _ConnectionLost as exc:
            raise PeerGone(f"{self.peer_name} closed the connection while opening it") from exc
        info = peer.payload
        if not isinstance(info, dict) or set(info) != {"session", "received"} or not isinstance(info["received"], int):
            raise ProtocolViolation(f"malformed RESUME from {self.peer_name}: {info!r}")
        if info["session"] != self.session:
            raise ProtocolViolation(
                f"{self.peer_name} belongs to another session ({info['session']!r}, ours {self.session!r}); "
                "restart both parties"
            )
        unsent = [frame for seq, frame in self._sent if seq > info["received"]]
        if self.sent_seq - info["received"] > len(unsent):
            raise ProtocolViolation(
                f"{self.peer_name} lost {self.sent_seq - info['received']} messages, more than can be resent"
            )
        for frame in unsent:
            self._write(frame)
        if not first:
            self.reconnects += 1
            self.log(f"reconnected to {self.peer_name}; resent {len(unsent)} message(s)")

    def _resume_payload(self) -> bytes:
        return json.dumps({"session": self.session, "received": self.received}).encode()

    def _reconnect(self, reason: str) -> None:
        self.log(f"connection to {self.peer_name} lost ({reason}); reconnecting for up to {self.reconnect_timeout:g} s")
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
        try:
            self._connect(time.monotonic() + self.reconnect_timeout, first=False)
        except PeerGone as exc:
            raise PeerGone(
                f"{self.peer_name} is gone: connection lost ({reason}) and not re-established within "
                f"{self.reconnect_timeout:g} s. Resume both parties from the last checkpoint "
                "(--checkpoint-dir ... --resume)."
            ) from exc

    # ---------------------------------------------------------------- sending

    def send_tensor(self, kind: MsgType, tag: int, tensor) -> None:
        array = np.ascontiguousarray(
            tensor.detach().cpu().numpy() if hasattr(tensor, "detach") else tensor, dtype="<f4"
        )
        spec = self.specs.get(kind)
        assert spec is not None, f"no agreed shape for {kind.name}"
        spec.check(kind, tuple(array.shape))
        self._send(kind, tag, DType.FLOAT32, tuple(array.shape), array.tobytes())

    def send_json(self, kind: MsgType, tag: int, obj: dict) -> None:
        payload = json.dumps(obj, sort_keys=True).encode()
        assert len(payload) <= MAX_JSON_BYTES
        self._send(kind, tag, DType.JSON, (), payload)

    def send_error(self, message: str) -> None:
        """Tell the peer we stop (best effort: the link may be what failed)."""
        self.sent_seq += 1
        payload = json.dumps({"message": message[:2000]}).encode()
        with contextlib.suppress(_ConnectionLost, ChannelError, OSError):
            self._write(_frame(MsgType.ERROR, self.sent_seq, 0, DType.JSON, (), payload))

    def _send(self, kind: MsgType, tag: int, dtype: DType, dims: tuple[int, ...], payload: bytes) -> None:
        self.sent_seq += 1
        frame = _frame(kind, self.sent_seq, tag, dtype, dims, payload)
        self._sent.append((self.sent_seq, frame))
        if self.tap is not None:
            self.tap("send", frame)
        try:
            self._write(frame)
        except _ConnectionLost as exc:
            self._reconnect(str(exc))  # resends the frame

    def _write(self, frame: bytes) -> None:
        if self._sock is None:
            raise _ConnectionLost("not connected")
        try:
            self._sock.sendall(frame)
            self.bytes_sent += len(frame)
        except ssl.SSLError as exc:
            raise _ConnectionLost(f"TLS error while sending: {exc.reason or exc}") from exc
        except TimeoutError as exc:
            raise PeerGone(f"{self.peer_name} took no data for {self.timeout:g} s") from exc
        except OSError as exc:
            raise _ConnectionLost(exc.strerror or str(exc)) from exc

    # ---------------------------------------------------------------- receiving

    def recv(self, expected: set[MsgType] | MsgType) -> Message:
        """The next message; it must be one of `expected` (an ERROR from the peer raises PeerFailed)."""
        expected = {expected} if isinstance(expected, MsgType) else set(expected)
        while True:
            try:
                return self._read_frame(expected, sequenced=True)
            except _ConnectionLost as exc:
                self._reconnect(str(exc))

    def _read_exact(self, count: int, started: bool, what: str) -> bytes:
        sock = self._sock
        assert sock is not None, "reading before the channel is open"
        buf = bytearray(count)
        view = memoryview(buf)
        got = 0
        while got < count:
            try:
                n = sock.recv_into(view[got:], count - got)
            except TimeoutError as exc:
                raise PeerGone(f"no message from {self.peer_name} for {self.timeout:g} s (is it alive?)") from exc
            except ssl.SSLEOFError:
                n = 0
            except ssl.SSLError as exc:
                raise TamperedMessage(
                    f"a TLS record from {self.peer_name} failed its integrity check ({exc.reason or exc}): "
                    "the data was tampered with or corrupted in transit; stopping"
                ) from exc
            except OSError as exc:
                if started or got:
                    raise TruncatedMessage(
                        f"the connection to {self.peer_name} broke in the middle of the {what} "
                        f"({exc.strerror or exc}); stopping"
                    ) from exc
                raise _ConnectionLost(exc.strerror or str(exc)) from exc
            if n == 0:
                if started or got:
                    raise TruncatedMessage(
                        f"truncated message from {self.peer_name}: the connection ended after {got} of {count} bytes "
                        f"of the {what}; stopping"
                    )
                raise _ConnectionLost("the peer closed the connection")
            got += n
        self.bytes_received += count
        return bytes(buf)

    def _read_frame(self, expected: set[MsgType], sequenced: bool) -> Message:
        if self._sock is None:
            raise _ConnectionLost("not connected")
        head = self._read_exact(HEADER.size, False, "message header")
        magic, version, kind_code, dtype_code, ndim, seq, tag, length = HEADER.unpack(head)
        kind, dtype = check_header(magic, version, kind_code, dtype_code, ndim, f"message from {self.peer_name}")
        dims = struct.unpack(f"!{ndim}I", self._read_exact(4 * ndim, True, f"{kind.name} header")) if ndim else ()
        if kind == MsgType.ERROR and sequenced:
            body = self._read_exact(min(length, MAX_JSON_BYTES), True, "ERROR message") if length else b"{}"
            try:
                message = json.loads(body).get("message", "")
            except (ValueError, AttributeError):
                message = body[:200].decode(errors="replace")
            raise PeerFailed(f"{self.peer_name} stopped: {message}")
        if kind not in expected:
            names = " or ".join(sorted(k.name for k in expected))
            raise ProtocolViolation(f"{self.peer_name} sent a {kind.name} message while {names} was expected")
        if sequenced and seq != self.received + 1:
            if seq <= self.received:  # a resend we already have (after a reconnect): skip it
                self._read_exact(length, True, f"{kind.name} payload")
                return self._read_frame(expected, sequenced)
            raise ProtocolViolation(
                f"{self.peer_name} sent message {seq}, expected {self.received + 1} (messages lost)"
            )
        if dtype == DType.JSON:
            if ndim or length > MAX_JSON_BYTES:
                raise ProtocolViolation(
                    f"{kind.name} control message of {length} bytes / {ndim} dims; at most {MAX_JSON_BYTES} bytes, "
                    "no dims"
                )
            try:
                payload = json.loads(self._read_exact(length, True, f"{kind.name} payload"))
            except ValueError as exc:
                raise ProtocolViolation(f"{kind.name} message from {self.peer_name} is not valid JSON") from exc
        else:
            spec = self.specs.get(kind)
            if spec is None:
                raise ProtocolViolation(f"{kind.name} message carries a tensor; none is agreed for it")
            spec.check(kind, tuple(dims))
            if length != math.prod(dims) * 4:
                raise ProtocolViolation(
                    f"{kind.name} message of shape {list(dims)} carries {length} bytes, not {math.prod(dims) * 4}"
                )
            payload = np.frombuffer(self._read_exact(length, True, f"{kind.name} payload"), dtype="<f4").reshape(dims)
            if not np.isfinite(payload).all():
                raise ProtocolViolation(f"{kind.name} message from {self.peer_name} holds non-finite values")
        if sequenced:
            self.received = seq
        return Message(kind, tag, payload)


class _Retry(Exception):
    """One connection attempt failed in a way worth retrying until the deadline."""
