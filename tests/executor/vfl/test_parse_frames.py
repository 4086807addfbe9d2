"""parse_frames, the decoder tests and tools read the channel's plaintext with, refuses what the receiver
refuses (issue 20's fuzz found it raising AssertionError and struct.error, and passing NaN tensors)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from executor.vfl.channel import (
    HEADER,
    MAGIC,
    VERSION,
    DType,
    MsgType,
    ProtocolViolation,
    TruncatedMessage,
    parse_frames,
)


def frame(kind, seq, dtype, dims, payload, magic=MAGIC):
    return (
        HEADER.pack(magic, VERSION, kind, dtype, len(dims), seq, 0, len(payload))
        + struct.pack(f"!{len(dims)}I", *dims)
        + payload
    )


def tensor(seq, rows, cols, value=1.0):
    return frame(MsgType.ACTIVATIONS, seq, DType.FLOAT32, (rows, cols), np.full(rows * cols, value, "<f4").tobytes())


def control(seq, body=b'{"op": "step"}'):
    return frame(MsgType.CONTROL, seq, DType.JSON, (), body)


def test_a_well_formed_stream_parses_whole():
    stream = control(1) + tensor(2, 3, 4) + control(3)
    parsed = parse_frames(stream, columns=4)
    assert [f[1] for f in parsed] == [1, 2, 3]
    assert parsed[1][4] == (3, 4) and len(parsed[1][5]) == 48
    assert json.loads(parsed[0][5]) == {"op": "step"}


@pytest.mark.parametrize(
    "stream, words",
    [
        (control(1)[:10], "bytes left"),
        (control(1) + tensor(2, 3, 4)[:-1], "past the stream's end"),
        (frame(MsgType.CONTROL, 1, DType.JSON, (), b"{}", magic=b"XXXX"), "not a hetplan VFL"),
        (frame(99, 1, DType.JSON, (), b"{}"), "unknown message type"),
        (control(1) + control(5), "follows message 1"),
        (control(7), "follows message 0"),
        (control(1, b"{not json"), "not valid JSON"),
        (tensor(1, 2, 4, value=float("nan")), "non-finite"),
        (tensor(1, 3, 5), "agreed shape"),
        (frame(MsgType.ACTIVATIONS, 1, DType.FLOAT32, (3, 4), b"\0" * 8), "needs 48 bytes"),
    ],
)
def test_a_malformed_stream_is_refused_by_name(stream, words):
    # Cut-short streams are TruncatedMessage, the rest ProtocolViolation: both a clean UserError.
    expected = TruncatedMessage if "left" in words or "past" in words else ProtocolViolation
    with pytest.raises(expected, match=words) as caught:
        parse_frames(stream, columns=4)
    assert "frame at byte" in str(caught.value)
