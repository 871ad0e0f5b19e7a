"""Method registry: every module in this package that defines a `Method` subclass registers it by its `name`.

Adding a method is adding one file here (plus its test).
"""

from __future__ import annotations

import importlib
import pkgutil

from pydantic import BaseModel, ValidationError

from kdpipe.errors import UserError
from kdpipe.methods.base import Method

METHODS: dict[str, type[Method]] = {}


def _discover() -> None:
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, Method) and value is not Method and hasattr(value, "name"):
                METHODS[value.name] = value


_discover()


def get_method(name: str, where: str) -> type[Method]:
    if name not in METHODS:
        raise UserError(f"{where}: unknown method '{name}'; expected one of: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def parse_params(method: type[Method], params: dict, where: str) -> BaseModel:
    """The method's typed params; an unknown or ill-typed one is a one-line error naming the stage field."""
    try:
        return method.Params.model_validate(params)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            known = ", ".join(method.Params.model_fields) or "none"
            raise UserError(
                f"{where}.{key}: unknown parameter of method '{method.name}'; expected one of: {known}"
            ) from None
        raise UserError(f"{where}.{key}: {first['msg']} (got {first.get('input')!r})") from None
