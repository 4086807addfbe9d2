"""Reading YAML/JSON files into Pydantic models, with errors a person can act on.

Every failure names the file, the field path and what is accepted, and is raised as `SpecError`, which
the CLIs turn into a message and exit status 2.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from hwmodel.errors import SpecError

M = TypeVar("M", bound=BaseModel)


# Bounds checked before any parsing work: spec, workload and plan files are a few kB, a Report holding a plan a
# few MB. YAML is parsed in Python (about 1 MB/s), JSON in C.
MAX_YAML_BYTES = 2 * 2**20
MAX_JSON_BYTES = 64 * 2**20
# Real files nest about 10 levels deep; 1,000 levels is a RecursionError inside the YAML and JSON parsers.
MAX_DEPTH = 64
# Values after YAML aliases are expanded: a few anchors referring to each other ("billion laughs") expand
# exponentially in whatever walks the data next.
MAX_NODES = 1_000_000


def read_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON file that must hold a mapping at the top."""
    if "\0" in str(path):
        raise SpecError(f"{str(path)!r}: a file name cannot hold a NUL byte")
    path = Path(path)
    try:
        if not path.exists():
            raise SpecError(f"{path}: no such file")
        if path.is_dir():
            raise SpecError(f"{path}: is a directory, expected a YAML or JSON file")
        if not path.is_file():
            raise SpecError(f"{path}: is not a regular file (a device or a pipe), expected a YAML or JSON file")
        json_only = path.suffix.lower() == ".json"
        limit = MAX_JSON_BYTES if json_only else MAX_YAML_BYTES
        size = path.stat().st_size
        if size > limit:
            raise SpecError(f"{path}: {size} bytes; a {'JSON' if json_only else 'YAML'} file is accepted up to {limit}")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: cannot read: {exc}") from None
    return parse_mapping(text, str(path), json_only=json_only)


def _yaml_shape(text: str, source: str) -> None:
    """Refuse YAML nested deeper than MAX_DEPTH or expanding to more than MAX_NODES values, from its event stream
    (C-speed where libyaml is present, no recursion, aliases not expanded); malformed YAML is left to the loader,
    whose messages say where."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    depth, nodes = 0, 0
    anchors: dict[str, int] = {}
    opened: list[tuple[str | None, int]] = []  # (anchor, nodes before it) of each open collection
    mappings: list[tuple[bool, list[bool], set[str]]] = []  # (is a mapping, [next is a key], keys seen)
    try:
        for event in yaml.parse(text, Loader=loader):
            if isinstance(event, yaml.NodeEvent) and mappings and mappings[-1][0]:
                _, next_is_key, keys = mappings[-1]
                if next_is_key[0] and isinstance(event, yaml.ScalarEvent):
                    line = event.start_mark.line + 1 if event.start_mark else None
                    _check_new_key(event.value, keys, source, line)
                next_is_key[0] = not next_is_key[0]
            if isinstance(event, yaml.CollectionStartEvent):
                mappings.append((isinstance(event, yaml.MappingStartEvent), [True], set()))
            elif isinstance(event, yaml.CollectionEndEvent):
                mappings.pop()
            if isinstance(event, yaml.AliasEvent):
                nodes += anchors.get(event.anchor or "", 1)
            elif isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_DEPTH:
                    raise SpecError(f"{source}: nested more than {MAX_DEPTH} levels deep; accepted: {MAX_DEPTH}")
                opened.append((event.anchor, nodes))
                nodes += 1
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
                anchor, before = opened.pop()
                if anchor:
                    anchors[anchor] = nodes - before
            elif isinstance(event, yaml.ScalarEvent):
                nodes += 1
                if event.anchor:
                    anchors[event.anchor] = 1
            if nodes > MAX_NODES:
                raise SpecError(
                    f"{source}: holds more than {MAX_NODES} values once its aliases are expanded; "
                    f"accepted: at most {MAX_NODES}"
                )
    except yaml.YAMLError as exc:
        # libyaml stops at its own nesting limit (1,000 levels) while scanning ahead, before any event says so.
        if "nesting depth" in str(exc):
            raise SpecError(f"{source}: nested more than {MAX_DEPTH} levels deep; accepted: {MAX_DEPTH}") from None
        return


def _check_new_key(key: str, keys: set[str], source: str, line: int | None = None) -> None:
    """A key given twice in one mapping is refused: the parsers would keep the last one without a word."""
    if key in keys:
        where = f" (line {line})" if line else ""
        raise SpecError(f"{source}: {str(key)[:80]}: given twice in one mapping{where}; give each field once")
    keys.add(key)


def _json_object(source: str) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    def build(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys: set[str] = set()
        for key, _ in pairs:
            _check_new_key(key, keys, source)
        return dict(pairs)

    return build


def _json_depth_ok(data: Any) -> bool:
    """True when `data` nests at most MAX_DEPTH collections deep (an explicit stack: no recursion)."""
    stack = [(data, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > MAX_DEPTH:
                return False
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return True


def _one_line(error: object) -> str:
    """The parser's explanation on one line (PyYAML's messages span several)."""
    return " ".join(str(error).split())[:300]


def parse_mapping(text: str, source: str, json_only: bool = False) -> dict[str, Any]:
    """Parse YAML (a superset of JSON) text that must hold a mapping."""
    limit = MAX_JSON_BYTES if json_only else MAX_YAML_BYTES
    if len(text) > limit:
        raise SpecError(f"{source}: {len(text)} characters; accepted up to {limit}")
    if not json_only:
        _yaml_shape(text, source)
    try:
        data = json.loads(text, object_pairs_hook=_json_object(source)) if json_only else yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError(f"{source}: malformed YAML{where}: {_one_line(exc.problem or exc)}") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{source}: malformed YAML: {_one_line(exc)}") from None
    except json.JSONDecodeError as exc:
        raise SpecError(f"{source}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise SpecError(f"{source}: nested more than {MAX_DEPTH} levels deep; accepted: {MAX_DEPTH}") from None
    if json_only and not _json_depth_ok(data):
        raise SpecError(f"{source}: nested more than {MAX_DEPTH} levels deep; accepted: {MAX_DEPTH}")
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise SpecError(f"{source}: expected a mapping of field: value at the top, but the file is {kind}")
    return data


def _fields_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str] | None:
    """Field names accepted by the model that `loc` points into (best effort, for 'unknown field' errors)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int) or current is None:
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(part)
        if field is None:
            return None
        current = _model_in(field.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return sorted(current.model_fields)
    return None


def _model_in(annotation: Any) -> Any:
    """The first BaseModel class found inside an annotation (Optional, tuple, list, Annotated...)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    origin = getattr(annotation, "__origin__", None)
    if origin is not None and origin is not annotation:
        return _model_in(origin)
    return None


def format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def describe_validation_error(exc: ValidationError, model: type[BaseModel], source: str) -> str:
    """One line per problem: 'source: field.path: what is wrong (got X)'."""
    lines = []
    for err in exc.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or "function-" in p)))
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if msg.startswith("Assertion failed, "):
            msg = msg[len("Assertion failed, ") :]
        if err["type"] == "extra_forbidden":
            accepted = _fields_at(model, loc[:-1])
            msg = f"unknown field {loc[-1]!r}" + (f"; accepted fields: {', '.join(accepted)}" if accepted else "")
        elif err["type"] == "missing":
            msg = "required field is missing"
        elif "input" in err and err["type"] not in ("value_error", "assertion_error"):
            shown = repr(err["input"])
            if len(shown) <= 80:
                msg = f"{msg} (got {shown})"
        lines.append(f"{source}: {format_loc(loc)}: {msg}")
    return "\n".join(dict.fromkeys(lines))


def validate(model: type[M], data: Any, source: str, context: dict[str, Any] | None = None) -> M:
    """Validate `data` into `model`, turning a ValidationError into a SpecError that names `source`."""
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        raise SpecError(describe_validation_error(exc, model, source)) from None


def load_model(model: type[M], path: str | Path, context: dict[str, Any] | None = None) -> M:
    """Read a YAML/JSON file into `model`; human units are required in files (strict units)."""
    ctx = {"strict_units": True, **(context or {})}
    return validate(model, read_mapping(path), str(path), ctx)
