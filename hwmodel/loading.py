"""Reading YAML/JSON files into Pydantic models, with errors a person can act on.

Every failure names the file, the field path and what is accepted, and is raised as `SpecError`, which
the CLIs turn into a message and exit status 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from hwmodel.errors import SpecError

M = TypeVar("M", bound=BaseModel)


def read_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON file that must hold a mapping at the top."""
    path = Path(path)
    if not path.exists():
        raise SpecError(f"{path}: no such file")
    if path.is_dir():
        raise SpecError(f"{path}: is a directory, expected a YAML or JSON file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: cannot read: {exc}") from None
    return parse_mapping(text, str(path), json_only=path.suffix.lower() == ".json")


def parse_mapping(text: str, source: str, json_only: bool = False) -> dict[str, Any]:
    """Parse YAML (a superset of JSON) text that must hold a mapping."""
    try:
        data = json.loads(text) if json_only else yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError(f"{source}: malformed YAML{where}: {exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{source}: malformed YAML: {exc}") from None
    except json.JSONDecodeError as exc:
        raise SpecError(f"{source}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
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
