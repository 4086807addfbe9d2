"""Field types for spec, workload and plan files that refuse what pydantic's lax mode would coerce.

Lax pydantic reads the string "8" as the integer 8, the string "false" as False, `true` as the integer 1 and
"0.5" as a float. In a file a person wrote, each of those is a typo or a misunderstanding (a quoted value, a
flag where a count belongs), so these types refuse them and say what to write instead. What YAML and JSON give
natively still works: `8`, `0.5`, `true`. Python callers keep lax numbers (numpy integers, 2.0 for 2).

Names and other identifiers must be printable text of bounded length: a NUL byte or an escape sequence in a
name ends up in file names, tables and terminal output.
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from pydantic import AfterValidator, BeforeValidator

MAX_NAME_CHARS = 256
MAX_TEXT_CHARS = 10_000


def _text_hint(value: str) -> str:
    return f"got the text {value[:40]!r}; write the value without quotes"


def _integer_only(value: Any) -> Any:
    if value is None:
        return value  # an optional field left empty; a required one refuses None itself
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"expected an integer, got {value!r} (true/false is a flag, not a count)")
    if isinstance(value, (str, bytes)):
        raise ValueError(f"expected an integer, {_text_hint(str(value))}")
    return value


def _number_only(value: Any) -> Any:
    if value is None:
        return value
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"expected a number, got {value!r} (true/false is a flag, not a number)")
    if isinstance(value, (str, bytes)):
        raise ValueError(f"expected a number, {_text_hint(str(value))}")
    return value


def _flag_only(value: Any) -> Any:
    if value is None:
        return value
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str):
        raise ValueError(f"expected true or false, {_text_hint(value)}")
    raise ValueError(f"expected true or false, got {value!r}")


def check_printable(value: str) -> str:
    """`value` if it is printable text of at most MAX_NAME_CHARS characters; else a ValueError saying why."""
    if len(value) > MAX_NAME_CHARS:
        raise ValueError(f"a name is at most {MAX_NAME_CHARS} characters, got {len(value)}")
    if not value.isprintable():
        bad = next(c for c in value if not c.isprintable())
        raise ValueError(f"a name must be printable text; got {value[:40]!r} with the control character {bad!r}")
    return value


def check_text(value: str) -> str:
    """`value` if it is printable text (line breaks and tabs allowed) of at most MAX_TEXT_CHARS characters."""
    if len(value) > MAX_TEXT_CHARS:
        raise ValueError(f"a description is at most {MAX_TEXT_CHARS} characters, got {len(value)}")
    bad = next((c for c in value if not c.isprintable() and c not in "\n\t"), None)
    if bad is not None:
        raise ValueError(f"a description must be printable text; got {value[:40]!r} with the control character {bad!r}")
    return value


# An integer field: a quoted number or a true/false is refused. The Optional* forms check before the union, so
# a wrong value gets one message instead of one per union member.
Int = Annotated[int, BeforeValidator(_integer_only)]
OptionalInt = Annotated[int | None, BeforeValidator(_integer_only)]
# A number field: a quoted number or a true/false is refused.
Float = Annotated[float, BeforeValidator(_number_only)]
OptionalFloat = Annotated[float | None, BeforeValidator(_number_only)]
# A flag: only true or false (not "false", not 0 or 1).
Bool = Annotated[bool, BeforeValidator(_flag_only)]
OptionalBool = Annotated[bool | None, BeforeValidator(_flag_only)]
# A name or identifier: printable, at most MAX_NAME_CHARS characters.
Name = Annotated[str, AfterValidator(check_printable)]
# A description or a source note: printable text, line breaks allowed.
Text = Annotated[str, AfterValidator(check_text)]
