"""A pydantic validation error as one line: `field.path: what was expected (got ...)`."""

from __future__ import annotations

import sys
import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationError


def describe_error(err: ValidationError, model: type[BaseModel]) -> str:
    """The first pydantic error as `field.path: what was expected (got ...)`; `model` is what was validated, for
    the fields an unknown one could have been."""
    first = err.errors()[0]
    loc = first["loc"]
    where = field_path(loc)
    if first["type"] == "extra_forbidden":
        allowed = ", ".join(sorted(allowed_fields(loc[:-1], model)))
        return f"{where}: unknown field; expected one of: {allowed}"
    if first["type"] == "missing":
        return f"{where}: required field is missing"
    message = first["msg"].removeprefix("Value error, ")
    if not loc:
        return message
    return f"{where}: {message} (got {short_repr(first['input'])})"


def short_repr(value: Any, limit: int = 80) -> str:
    """A value as the error line shows it: never longer than `limit` characters, whatever the file held."""
    try:
        text = repr(value)
    except ValueError:  # an int of more digits than Python prints
        text = f"an integer of over {sys.get_int_max_str_digits()} digits"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def field_path(loc: tuple) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "job"


def allowed_fields(loc: tuple, model: Any) -> list[str]:
    """The field names a model accepts at `loc`, walking the schema from `model`."""
    for part in loc:
        if isinstance(part, int):
            continue
        model = _model_in(model.model_fields[part].annotation)
    return list(model.model_fields)


def _model_in(annotation: Any) -> Any:
    """The BaseModel inside `list[X]`, `X | None` or `X`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is not None:
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None
