"""Fuzz every parser with generated inputs and count how each one ends: clean refusal, accepted, traceback, hang.

Parsers: device, node and cluster spec files, workload files, Hugging Face config.json, plan YAML and JSON files,
the plan shorthand (`tp=2,pp=2,...`), and VFL frames (the channel's receiver, through a stand-in socket, and the
`parse_frames` tool decoder). Each input is a valid base (a catalog file, a hand-written config or plan, a
well-formed frame stream) with zero or more mutations whose effect is known: one that keeps it valid (JSON
instead of YAML, reordered keys, a comment), one that makes it invalid (a quoted number, a flag for a count, a
NUL byte, a negative or absurd figure, an unknown key, nesting 1,000 deep, billion laughs, a file over the size
bound, garbage bytes), or one whose effect depends on where it lands (truncation, a flipped byte, null, a
duplicate key). An accepted input counts as valid when its generator says so; where the effect is not known,
an independent check decides (the parsed object round-trips, every text is printable, every number finite,
reserved memory below capacity, every tensor finite and of the agreed shape).

Each input runs in a worker process with a time limit (10 s): one that runs over is a hang, and the worker is
replaced. Run from the repository root:

    PYTHONPATH=. python benchmarks/fuzz_parsers.py --inputs 2000 --seed 0

`tests/test_fuzz_parsers.py` draws from the same generators with hypothesis, in-process, with a small budget.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import multiprocessing as mp
import random
import resource
import struct
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

import specs
from hwmodel.catalog import clear_caches, load_cluster, load_device
from hwmodel.errors import UserError
from hwmodel.loading import read_mapping

REPO = Path(__file__).resolve().parents[1]
SPECS = Path(specs.__file__).parent
KINDS = (
    "device",
    "node",
    "cluster",
    "workload",
    "hf_config",
    "plan_yaml",
    "plan_json",
    "plan_shorthand",
    "vfl_channel",
    "vfl_parse_frames",
)
TIME_LIMIT_S = 10.0
MEMORY_LIMIT_BYTES = 4 * 2**30

VALID, INVALID, EITHER = "valid", "invalid", "either"


@dataclass(frozen=True)
class Case:
    """One generated input: what parses it, its bytes or text, and what its generator knows of its validity."""

    kind: str
    payload: bytes
    suffix: str  # file suffix (".yaml", ".json", "config.json") or "" for shorthand and frames
    expect: str  # VALID, INVALID or EITHER
    mutation: str


@dataclass(frozen=True)
class Outcome:
    status: str  # refused, accepted, traceback, hang
    detail: str = ""
    nonsense: bool = False  # accepted though the generator or the independent check says invalid
    unnamed: bool = False  # refused with a message that does not start with the file (or --plan)


# ---- valid bases --------------------------------------------------------------------------------
def _catalog_dicts(folder: str) -> list[dict[str, Any]]:
    return [read_mapping(p) for p in sorted((SPECS / folder).glob("*.yaml"))]


def _workload_bases() -> list[dict[str, Any]]:
    out = []
    for path in sorted((REPO / "workloads" / "catalog").glob("*.yaml")):
        data = read_mapping(path)
        out += [{**data.get("defaults", {}), **entry} for entry in data["workloads"]]
    return out


HF_BASES: list[dict[str, Any]] = [
    {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "rms_norm_eps": 1e-05,
    },
    {
        "model_type": "mixtral",
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 1000,
        "max_position_embeddings": 4096,
        "sliding_window": None,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
    },
    {
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "sliding_window": 32768,
        "use_sliding_window": False,
        "tie_word_embeddings": True,
    },
    {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257, "n_positions": 1024},
    {
        "model_type": "gpt_neox",
        "hidden_size": 512,
        "intermediate_size": 2048,
        "num_hidden_layers": 6,
        "num_attention_heads": 8,
        "vocab_size": 50304,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
    },
]
# The keys hetplan reads from a config.json; the others (rope_theta, torch_dtype...) are ignored, so changing
# them changes nothing and tells nothing.
HF_READ_KEYS = {
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "max_position_embeddings",
    "tie_word_embeddings",
    "attention_bias",
    "num_local_experts",
    "num_experts_per_tok",
    "sliding_window",
    "use_sliding_window",
    "n_embd",
    "n_layer",
    "n_head",
    "n_inner",
    "n_positions",
    "resid_pdrop",
    "attn_pdrop",
    "embd_pdrop",
}

PLAN_BASES: list[dict[str, Any]] = [
    {
        "tp": 2,
        "pp": 2,
        "dp": 2,
        "micro_batch": 2,
        "global_batch": 64,
        "schedule": "interleaved",
        "virtual_stages": 2,
        "recompute": "selective",
        "dp_type": "zero1",
        "sequence_parallel": True,
    },
    {
        "dp": 2,
        "micro_batch": 2,
        "batch_split": [3, 1],
        "offload": 0.25,
        "dtype": "fp16",
        "grad_reduce_dtype": "fp32",
        "attention": "naive",
        "optimizer": "sgd",
    },
    {
        "pp": 2,
        "stages": [{"num_layers": 10, "devices": "0-3", "tp": 2}, {"num_layers": 14, "devices": [4, 5, 6, 7]}],
        "layers": [
            {"layers": [0, 3], "tp": 1, "dp_type": "zero2", "recompute": "full", "offload": 0.5},
            {"layers": [4, 9], "sequence_parallel": False},
        ],
        "model_states": {"page_size": "64 MiB", "gpu": 0.5, "cpu": 0.25, "ssd": 0.25},
    },
    {
        "tasks": [{"name": "caption", "modules": ["vision", "text"], "batch": 8}],
        "federated": {"parties": ["active", "passive"], "workset": 4, "local_updates": 2, "mode": "celu"},
        "memory_plan": {"peak_bytes": 1024, "greedy_peak_bytes": 2048},
    },
]

_BASES: dict[str, list[dict[str, Any]]] = {}


def bases(kind: str) -> list[dict[str, Any]]:
    """The valid inputs mutations start from (loaded once per process)."""
    if kind not in _BASES:
        if kind == "device":
            _BASES[kind] = _catalog_dicts("devices")
        elif kind == "cluster":
            _BASES[kind] = _catalog_dicts("clusters")
        elif kind == "node":
            # Node specs fuzzed with their device written inline, so the node and device fields are both reached.
            devices = {d["name"]: d for d in bases("device")}
            clusters = copy.deepcopy(bases("cluster"))
            for cluster in clusters:
                for group in cluster["node_groups"]:
                    node = group["node"]
                    if isinstance(node.get("device"), str) and node["device"] in devices:
                        node["device"] = copy.deepcopy(devices[node["device"]])
            _BASES[kind] = clusters
        elif kind == "workload":
            _BASES[kind] = _workload_bases()
        elif kind == "hf_config":
            _BASES[kind] = HF_BASES
        else:
            _BASES[kind] = PLAN_BASES
    return _BASES[kind]


# ---- mutations of a parsed mapping ----------------------------------------------------------------
def _paths(data: Any, prefix: tuple[Any, ...] = ()) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """(leaf paths, mapping paths) of a nested structure."""
    leaves: list[tuple[Any, ...]] = []
    maps: list[tuple[Any, ...]] = []
    if isinstance(data, dict):
        maps.append(prefix)
        items: Any = data.items()
    elif isinstance(data, list):
        items = enumerate(data)
    else:
        return [prefix], []
    for key, value in items:
        sub_leaves, sub_maps = _paths(value, (*prefix, key))
        leaves += sub_leaves
        maps += sub_maps
    return leaves, maps


def _get(data: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        data = data[part]
    return data


def _set(data: Any, path: tuple[Any, ...], value: Any) -> None:
    _get(data, path[:-1])[path[-1]] = value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# A value nested 1,000 deep is written into the text after rendering (the dumpers themselves recurse).
DEEP_TOKEN = "DEEP_VALUE_TOKEN"
DEEP_TEXT = "[" * 1000 + "1" + "]" * 1000


def _breaking(value: Any, path: tuple[Any, ...], rng: random.Random) -> list[tuple[str, Any]]:
    """(name, new value) mutations of one leaf that no parser may accept."""
    out: list[tuple[str, Any]] = [("to a dict", {"bogus": 1}), ("nested 1000 deep", DEEP_TOKEN)]
    # The size of an efficiency curve point ([size, efficiency]) is a quantity, which may be written as text.
    curve_size = len(path) >= 2 and path[-1] == 0 and isinstance(path[-2], int)
    if (_is_number(value) or isinstance(value, bool)) and not curve_size:
        out.append(("quoted", str(value).lower() if isinstance(value, bool) else str(value)))
    if _is_number(value):
        out += [
            ("flag for a number", rng.choice([True, False])),
            ("negative", -abs(value) - 1),
            ("absurdly large", 10**30 if isinstance(value, int) else 1e300),
            ("NaN", math.nan),
        ]
    if isinstance(value, bool):
        out.append(("number for a flag", int(value)))
    if isinstance(value, str):
        cut = rng.randrange(len(value) + 1)
        out.append(("NUL byte", value[:cut] + "\0" + value[cut:]))
        out.append(("escape sequence", value[:cut] + "\x1b[2J" + value[cut:]))
    return out


def _mutable_leaves(kind: str, data: dict[str, Any]) -> list[tuple[Any, ...]]:
    leaves, _ = _paths(data)
    if kind == "hf_config":
        leaves = [p for p in leaves if p[0] in HF_READ_KEYS]
    if kind == "node":
        leaves = [p for p in leaves if len(p) > 2 and p[0] == "node_groups" and p[2] == "node"]
    # A stage's `devices` takes a rank list or a range string, so a list there is no type error.
    return [p for p in leaves if "devices" not in p] or leaves


def mutate_mapping(kind: str, data: dict[str, Any], rng: random.Random) -> tuple[dict[str, Any], str, str]:
    """(mutated copy, what was done, expectation) of a valid mapping."""
    data = copy.deepcopy(data)
    roll = rng.random()
    if roll < 0.15:
        return data, "unchanged", VALID
    if roll < 0.25:
        keys = list(data)
        rng.shuffle(keys)
        return {k: data[k] for k in keys}, "keys reordered", VALID
    leaves = _mutable_leaves(kind, data)
    if roll < 0.33 and kind != "hf_config":  # a config.json ignores keys it does not know
        _, maps = _paths(data)
        maps = [m for m in maps if "sources" not in m] or [()]
        if kind == "node":
            maps = [m for m in maps if len(m) > 2 and m[2] == "node"] or maps
        target = rng.choice(maps)
        _get(data, target)["bogus_field"] = 1
        return data, "unknown key", INVALID
    if roll < 0.40:
        path = rng.choice(leaves)
        _set(data, path, None)
        return data, "null", EITHER
    path = rng.choice(leaves)
    name, value = rng.choice(_breaking(_get(data, path), path, rng))
    _set(data, path, value)
    return data, f"{name} at {'.'.join(map(str, path))}", INVALID


def _laughs() -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    return "\n".join(lines) + "\n"


def _text_mutation(text: str, rng: random.Random, yaml_file: bool) -> tuple[bytes, str, str]:
    """A mutation of the whole file text."""
    choices = ["truncated", "byte flipped", "garbage", "empty", "top-level list", "deep", "laughs", "big", "twice"]
    choice = rng.choice(choices)
    raw = text.encode()
    if choice == "twice":  # the first key given again, at the end (YAML) or at the start (JSON)
        key = text.lstrip("#fuzed \n{").split(":", 1)[0].strip().strip('"')
        doubled = text + f"\n{key}: 1\n" if yaml_file else text.replace("{", f'{{"{key}": 1, ', 1)
        return doubled.encode(), "a key given twice", INVALID
    if choice == "truncated":
        return raw[: rng.randrange(len(raw))], choice, EITHER
    if choice == "byte flipped":
        i = rng.randrange(len(raw))
        return raw[:i] + bytes([raw[i] ^ (1 << rng.randrange(8))]) + raw[i + 1 :], choice, EITHER
    if choice == "garbage":
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))), choice, INVALID
    if choice == "empty":
        return b"", choice, INVALID
    if choice == "top-level list":
        return b"[1, 2, 3]\n", choice, INVALID
    if choice == "deep":
        depth = rng.choice([100, 1000, 100_000])
        return ('{"a": ' + "[" * depth + "]" * depth + "}\n").encode(), f"nested {depth} deep", INVALID
    if choice == "laughs" and yaml_file:
        return _laughs().encode(), "billion laughs", INVALID
    # Over the YAML size bound (2 MiB) with comment lines; JSON's bound (64 MiB) is too large to write each time.
    if yaml_file:
        return (text + ("#" + "x" * 1023 + "\n") * 2100).encode(), "over the size bound", INVALID
    return b"", "empty", INVALID


def _render(data: dict[str, Any], as_json: bool, rng: random.Random) -> str:
    if as_json:
        return json.dumps(data, indent=rng.choice([None, 2])).replace(f'"{DEEP_TOKEN}"', DEEP_TEXT)
    text = yaml.safe_dump(data, sort_keys=False, default_flow_style=rng.choice([False, None]), allow_unicode=True)
    text = text.replace(DEEP_TOKEN, DEEP_TEXT)
    return "# fuzzed\n" + text if rng.random() < 0.2 else text


def generate_file_case(kind: str, rng: random.Random) -> Case:
    base = rng.choice(bases(kind))
    as_json = kind in ("plan_json", "hf_config") or (kind not in ("plan_yaml",) and rng.random() < 0.2)
    suffix = "config.json" if kind == "hf_config" else (".json" if as_json else ".yaml")
    if rng.random() < 0.15:
        payload, what, expect = _text_mutation(_render(base, as_json, rng), rng, not as_json)
        return Case(kind, payload, suffix, expect, what)
    data, what, expect = mutate_mapping(kind, base, rng)
    if rng.random() < 0.3 and expect != INVALID:
        data2, what2, expect2 = mutate_mapping(kind, data, rng)
        data, what = data2, f"{what}; {what2}"
        expect = INVALID if expect2 == INVALID else (EITHER if EITHER in (expect, expect2) else VALID)
    try:
        text = _render(data, as_json, rng)
    except ValueError:  # NaN in strict JSON: write it as JSON's NaN extension, which json.loads reads
        text = json.dumps(data, allow_nan=True)
    return Case(kind, text.encode(), suffix, expect, what)


# ---- plan shorthand ------------------------------------------------------------------------------
def _valid_shorthand(rng: random.Random) -> dict[str, str]:
    fields: dict[str, str] = {}
    for key, values in (
        ("tp", ["1", "2", "4", "8"]),
        ("pp", ["1", "2", "4"]),
        ("cp", ["1", "2"]),
        ("ep", ["1", "2"]),
        ("dp_type", ["ddp", "zero1", "zero2", "zero3"]),
        ("sequence_parallel", ["true", "false", "yes", "no", "on", "off"]),
        ("recompute", ["none", "selective", "full", "tokenwise"]),
        ("dtype", ["fp32", "fp16", "bf16"]),
        ("grad_reduce_dtype", ["fp32", "bf16"]),
        ("attention", ["flash", "naive", "flash_triton"]),
        ("optimizer", ["adam", "sgd"]),
        ("offload", ["0", "0.5", "1", "0.125"]),
        ("global_batch", ["64", "512", "1024"]),
    ):
        if rng.random() < 0.4:
            fields[key] = rng.choice(values)
    micro = rng.choice([1, 2, 4])
    fields["micro_batch"] = str(micro)
    if rng.random() < 0.5:
        dp = rng.choice([1, 2, 4])
        fields["dp"] = str(dp)
        if rng.random() < 0.3:
            split = [1] * dp
            for _ in range(micro * dp - dp):
                split[rng.randrange(dp)] += 1
            fields["batch_split"] = "+".join(map(str, split))
    if rng.random() < 0.2:
        fields["schedule"], fields["virtual_stages"] = "interleaved", str(rng.choice([2, 3]))
    elif rng.random() < 0.3:
        fields["schedule"] = rng.choice(["gpipe", "1f1b"])
    return fields


ALIASES = {"sequence_parallel": "sp", "micro_batch": "mb", "global_batch": "gb", "virtual_stages": "vpp"}


def generate_shorthand_case(rng: random.Random) -> Case:
    fields = _valid_shorthand(rng)
    what, expect = "valid", VALID
    roll = rng.random()
    ints = [k for k in fields if k in ("tp", "pp", "cp", "ep", "micro_batch", "global_batch", "dp")]
    if roll < 0.40:
        key = rng.choice(ints)
        name, value = rng.choice(
            [
                ("flag for a count", "true"),
                ("zero", "0"),
                ("negative", "-2"),
                ("fraction", "2.5"),
                ("absurdly large", "1e15"),
                ("NaN", "nan"),
                ("quoted", "'2'"),
                ("text", "two"),
                ("NUL byte", "2\0"),
            ]
        )
        fields[key], what, expect = value, f"{name} for {key}", INVALID
    elif roll < 0.47:
        fields["tpp"], what, expect = "2", "unknown key", INVALID
    elif roll < 0.52:
        fields[rng.choice(["dp_type", "recompute", "dtype"])], what, expect = "zero9", "unknown choice", INVALID
    elif roll < 0.57:
        fields["offload"], what, expect = rng.choice(["1.5", "-0.1", "true", "inf"]), "offload out of range", INVALID
    elif roll < 0.62:
        fields["batch_split"], what, expect = rng.choice(["3+x", "+", "0+4", "-1+5"]), "bad batch_split", INVALID
    items = [(ALIASES.get(k, k) if rng.random() < 0.3 else k, v) for k, v in fields.items()]
    rng.shuffle(items)
    text = rng.choice([",", ", ", " "]).join(f"{k}={v}" for k, v in items)
    if roll > 0.95:
        text, what, expect = text + ",tp", "a part without '='", INVALID
    elif roll > 0.9:
        text, what, expect = text + f",{items[0][0]}=1", "a key given twice", INVALID
    elif roll > 0.86:
        text = "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randrange(1, 60)))
        what, expect = "random text", EITHER
    return Case("plan_shorthand", text.encode(), "", expect, what)


# ---- VFL frames ----------------------------------------------------------------------------------
VFL_COLS, VFL_ROWS = 4, 8


def _vfl_frame(kind: int, seq: int, dtype: int, dims: tuple[int, ...], payload: bytes) -> bytes:
    from executor.vfl.channel import HEADER, MAGIC, VERSION

    return (
        HEADER.pack(MAGIC, VERSION, kind, dtype, len(dims), seq, 0, len(payload))
        + struct.pack(f"!{len(dims)}I", *dims)
        + payload
    )


def generate_vfl_case(kind: str, rng: random.Random) -> Case:
    from executor.vfl.channel import DType, MsgType

    frames = [_vfl_frame(MsgType.RESUME, 0, DType.JSON, (), json.dumps({"session": "s", "received": 0}).encode())]
    for seq in range(1, rng.randrange(2, 6)):
        if rng.random() < 0.5:
            rows = rng.randrange(1, VFL_ROWS + 1)
            values = [rng.uniform(-10, 10) for _ in range(rows * VFL_COLS)]
            body = struct.pack(f"<{len(values)}f", *values)
            frames.append(_vfl_frame(MsgType.ACTIVATIONS, seq, DType.FLOAT32, (rows, VFL_COLS), body))
        else:
            frames.append(_vfl_frame(MsgType.CONTROL, seq, DType.JSON, (), json.dumps({"op": "step"}).encode()))
    what, expect = "valid", VALID
    roll = rng.random()
    if roll < 0.2:
        i = rng.randrange(1, len(frames))
        head = bytearray(frames[i])
        field = rng.choice(["magic", "kind", "dtype", "ndim", "length", "seq"])
        offsets = {"magic": 0, "kind": 5, "dtype": 6, "ndim": 7, "seq": 8, "length": 24}
        if field == "length":
            head[24:32] = struct.pack("!Q", rng.choice([2**63, 2**40, 0, 3]))
        elif field == "seq":
            head[8:16] = struct.pack("!Q", rng.choice([10**9, 2**64 - 1]))
        else:
            byte = offsets[field]
            head[byte] = rng.choice([v for v in (0, 99, 255) if v != head[byte]]) if field != "magic" else ord("X")
        frames[i] = bytes(head)
        what, expect = f"bad {field}", INVALID
    elif roll < 0.3:
        nan = struct.pack("<f", math.nan) * VFL_COLS
        frames.append(_vfl_frame(MsgType.ACTIVATIONS, len(frames), DType.FLOAT32, (1, VFL_COLS), nan))
        what, expect = "NaN tensor", INVALID
    elif roll < 0.4:
        body = b"\0" * (4 * 3 * (VFL_COLS + 1))
        frames.append(_vfl_frame(MsgType.ACTIVATIONS, len(frames), DType.FLOAT32, (3, VFL_COLS + 1), body))
        what, expect = "wrong shape", INVALID
    elif roll < 0.45:
        frames.append(_vfl_frame(MsgType.CONTROL, len(frames), DType.JSON, (), b"{not json"))
        what, expect = "bad JSON", INVALID
    stream = b"".join(frames)
    if 0.45 <= roll < 0.6:
        stream, what, expect = stream[: rng.randrange(len(frames[0]) + 1, len(stream))], "truncated", EITHER
    elif 0.6 <= roll < 0.7:
        i = rng.randrange(len(frames[0]), len(stream))
        stream = stream[:i] + bytes([stream[i] ^ (1 << rng.randrange(8))]) + stream[i + 1 :]
        what, expect = "byte flipped", EITHER
    elif 0.7 <= roll < 0.75:
        stream = frames[0] + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
        what, expect = "garbage after RESUME", EITHER
    if kind == "vfl_parse_frames":
        stream = stream[len(frames[0]) :]
    return Case(kind, stream, "", expect, what)


def generate(kind: str, rng: random.Random) -> Case:
    """One input for the parser `kind`."""
    if kind == "plan_shorthand":
        return generate_shorthand_case(rng)
    if kind.startswith("vfl"):
        return generate_vfl_case(kind, rng)
    return generate_file_case(kind, rng)


# ---- running one input ---------------------------------------------------------------------------
class _FakeTLS:
    """Stands in for the TLS socket under executor.vfl.channel.Channel: serves a byte stream, swallows sends."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def recv_into(self, view: memoryview, count: int) -> int:
        n = min(count, len(self.data) - self.pos)
        view[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n

    def sendall(self, data: bytes) -> None:
        pass

    def settimeout(self, timeout: float | None) -> None:
        pass

    def setsockopt(self, *args: Any) -> None:
        pass

    def do_handshake(self) -> None:
        pass

    def getpeercert(self) -> dict[str, Any]:
        return {"subject": ((("commonName", "vfl-passive"),),)}

    def close(self) -> None:
        pass


def _run_vfl_channel(payload: bytes) -> list[Any]:
    """Decode `payload` with the channel's own receiver; the stream ends as a lost peer (PeerGone)."""
    import socket

    from executor.vfl import channel as vfl

    streams = [payload]

    class Context:
        def wrap_socket(self, raw: Any, **kwargs: Any) -> _FakeTLS:
            return raw

    def connect(address: Any, timeout: float | None = None) -> _FakeTLS:
        if not streams:
            raise ConnectionRefusedError(111, "Connection refused")
        return _FakeTLS(streams.pop())

    saved = vfl.tls_context, socket.create_connection
    # Stand-ins for the certificates and the network, restored afterwards (the hypothesis test runs in-process).
    vfl.tls_context = lambda *args, **kwargs: Context()  # type: ignore[assignment]
    socket.create_connection = connect  # type: ignore[assignment]
    try:
        channel = vfl.Channel("active", "unused", connect=("fuzz", 1), connect_timeout=1.0, reconnect_timeout=0.02)
        channel.specs = {
            vfl.MsgType.ACTIVATIONS: vfl.TensorSpec(cols=VFL_COLS, max_rows=VFL_ROWS),
            vfl.MsgType.EVAL_ACTIVATIONS: vfl.TensorSpec(cols=VFL_COLS, max_rows=VFL_ROWS),
        }
        channel.open()
        messages = []
        expected = set(vfl.MsgType) - {vfl.MsgType.RESUME}
        try:
            while True:
                messages.append(channel.recv(expected))
        except vfl.PeerGone:
            return messages  # the whole stream was read: every frame in it was accepted
    finally:
        vfl.tls_context, socket.create_connection = saved


def parse(case: Case, workdir: Path) -> Any:
    """Run the parser of `case`; returns what it accepted, raises what it raised."""
    if case.kind == "plan_shorthand":
        from simulator.plan import load_plan

        return load_plan(case.payload.decode())
    if case.kind == "vfl_channel":
        return _run_vfl_channel(case.payload)
    if case.kind == "vfl_parse_frames":
        from executor.vfl.channel import parse_frames

        return parse_frames(case.payload, columns=VFL_COLS)
    folder = Path(tempfile.mkdtemp(dir=workdir))
    path = folder / ("config.json" if case.suffix == "config.json" else f"input{case.suffix}")
    path.write_bytes(case.payload)
    clear_caches()
    if case.kind == "device":
        return load_device(str(path))
    if case.kind in ("node", "cluster"):
        return load_cluster(str(path))
    if case.kind in ("workload", "hf_config"):
        from workloads.catalog import load_workload

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return load_workload(str(path))
    from simulator.plan import load_plan

    return load_plan(str(path))


def _texts_and_numbers(data: Any) -> tuple[list[str], list[float]]:
    texts: list[str] = []
    numbers: list[float] = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            texts += [k for k in item if isinstance(k, str)]
            stack += list(item.values())
        elif isinstance(item, (list, tuple)):
            stack += list(item)
        elif isinstance(item, str):
            texts.append(item)
        elif _is_number(item):
            numbers.append(float(item))
    return texts, numbers


def independent_check(case: Case, obj: Any) -> str | None:
    """Why an accepted object is not valid, or None: checked apart from the parsers' own validators."""
    import numpy as np

    if case.kind.startswith("vfl"):
        for message in obj:
            payload = message.payload if case.kind == "vfl_channel" else message[5]
            tensor = isinstance(payload, np.ndarray)
            if tensor and (not np.isfinite(payload).all() or payload.shape[-1] != VFL_COLS):
                return "a tensor that is not finite or not of the agreed shape"
        return None
    dumped = obj.model_dump()
    again = type(obj).model_validate(dumped)
    if again != obj:
        return "does not round-trip"
    texts, numbers = _texts_and_numbers(dumped)
    if any(not all(c.isprintable() or c in "\n\t" for c in t) for t in texts):
        return "holds a non-printable text"
    if any(not math.isfinite(n) or abs(n) > 2.0**64 for n in numbers):
        return "holds a non-finite or absurd number"
    devices = [obj] if case.kind == "device" else []
    if case.kind in ("node", "cluster"):
        devices = [g.node.device for g in obj.node_groups]
    if any(d.memory.reserved >= d.memory.capacity for d in devices):
        return "reserved memory not below capacity"
    return None


def _source_of(case: Case, workdir: Path) -> str:
    return "--plan" if case.kind == "plan_shorthand" else str(workdir)


def run_case(case: Case, workdir: Path) -> Outcome:
    """Parse one input in this process and classify how it ended (no time limit: see `Runner`)."""
    try:
        obj = parse(case, workdir)
    except UserError as exc:
        message = str(exc)
        if case.kind.startswith("vfl"):
            return Outcome("refused", message[:200])
        source = _source_of(case, workdir)
        named = bool(message) and all(line.startswith(source) for line in message.splitlines())
        return Outcome("refused", message[:200], unnamed=not named)
    except (Exception, RecursionError, MemoryError):
        lines = traceback.format_exc().strip().splitlines()
        return Outcome("traceback", " | ".join(lines[-3:])[:300])
    if case.expect == INVALID:
        return Outcome("accepted", f"accepted {case.mutation}", nonsense=True)
    problem = independent_check(case, obj)
    return Outcome("accepted", problem or "", nonsense=problem is not None)


# ---- the worker pool with a time limit -----------------------------------------------------------
def _worker(conn: Any, workdir: str) -> None:
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    sys.setrecursionlimit(10_000)
    while True:
        case = conn.recv()
        if case is None:
            return
        conn.send(run_case(case, Path(workdir)))


class Runner:
    """One worker process at a time; an input that runs past the limit is a hang and the worker is replaced."""

    def __init__(self, workdir: Path, limit: float = TIME_LIMIT_S) -> None:
        self.workdir, self.limit = workdir, limit
        self.ctx = mp.get_context("fork")
        self._start()

    def _start(self) -> None:
        self.conn, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_worker, args=(child, str(self.workdir)), daemon=True)
        self.proc.start()

    def run(self, case: Case) -> Outcome:
        self.conn.send(case)
        if self.conn.poll(self.limit):
            try:
                result: Outcome = self.conn.recv()
                return result
            except EOFError:
                self.proc.join()
                self._start()
                return Outcome("traceback", f"worker died (exit {self.proc.exitcode})")
        self.proc.kill()
        self.proc.join()
        self._start()
        return Outcome("hang", f"no answer within {self.limit:g} s: {case.mutation}")

    def close(self) -> None:
        with contextlib.suppress(OSError, BrokenPipeError):
            self.conn.send(None)
        self.proc.join(timeout=5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=2000, help="inputs in all, spread evenly over the parsers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=float, default=TIME_LIMIT_S, help="seconds per input before it is a hang")
    parser.add_argument("--show", type=int, default=5, help="examples of each kind of failure to print")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    counts: dict[str, Counter[str]] = {kind: Counter() for kind in KINDS}
    slowest: Counter[str] = Counter()
    slowest_input: dict[str, str] = {}
    failures: list[tuple[str, str, Outcome]] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        runner = Runner(Path(tmp), args.limit)
        for i in range(args.inputs):
            kind = KINDS[i % len(KINDS)]
            case = generate(kind, rng)
            began = time.perf_counter()
            outcome = runner.run(case)
            took = time.perf_counter() - began
            if took > slowest[kind]:
                slowest[kind], slowest_input[kind] = took, f"{case.mutation} (input {i})"
            row = counts[kind]
            row["inputs"] += 1
            row[outcome.status] += 1
            row["nonsense"] += outcome.nonsense
            row["unnamed"] += outcome.unnamed
            row["refused valid"] += outcome.status == "refused" and case.expect == VALID
            if outcome.status in ("traceback", "hang") or outcome.nonsense or outcome.unnamed:
                failures.append((kind, case.mutation, outcome))
        runner.close()
    _print(counts, slowest, failures, args, time.perf_counter() - started)
    for kind, what in slowest_input.items():
        print(f"  slowest {kind}: {slowest[kind]:.2f} s, {what}")


def _print(
    counts: dict[str, Counter[str]],
    slowest: Counter[str],
    failures: list[tuple[str, str, Outcome]],
    args: Any,
    wall: float,
) -> None:
    console = Console(width=160)
    table = Table(title=f"fuzz_parsers: {args.inputs} inputs, seed {args.seed}, {args.limit:g} s limit per input")
    columns = ["inputs", "refused", "accepted", "nonsense", "refused valid", "unnamed", "traceback", "hang"]
    table.add_column("parser")
    for column in [*columns, "slowest s"]:
        table.add_column(column, justify="right")
    total: Counter[str] = Counter()
    for kind, row in counts.items():
        table.add_row(kind, *(str(row[c]) for c in columns), f"{slowest[kind]:.2f}")
        total.update(row)
    table.add_row("all", *(str(total[c]) for c in columns), f"{max(slowest.values(), default=0):.2f}", style="bold")
    console.print(table)
    console.print(
        "refused: a clean UserError (exit 2 at the CLI); accepted: parsed, and valid by its generator or the "
        "independent check; nonsense: accepted though invalid; refused valid: a valid input refused; unnamed: a "
        "refusal whose message does not start with the file (or --plan); traceback: any other exception; "
        f"hang: no answer within the limit; slowest s: the longest one input took, worker round trip included."
        f" Wall time {wall:.0f} s."
    )
    shown: Counter[str] = Counter()
    for kind, mutation, outcome in failures:
        key = f"{kind}/{outcome.status}/{outcome.nonsense}/{outcome.unnamed}"
        shown[key] += 1
        if shown[key] <= args.show:
            console.print(f"  {kind} [{mutation}] {outcome.status}: {outcome.detail}", markup=False)


if __name__ == "__main__":
    main()
