"""Values at dotted paths in a job's plain data (`stages.student.optimizer.lr`, `params.temperature`): the one way
`--set`, a search's sampled values and its checks reach into a config."""

from __future__ import annotations

from typing import Any


class PathError(ValueError):
    """A dotted path that leads nowhere; the message says where it stopped and what was there."""


def set_at(tree: dict, path: str, value: Any) -> None:
    """Set `value` at `path`, creating mappings on the way; a list is entered by its items' `name`
    (`stages.student` is the stage named student)."""
    parts = path.split(".")
    node: Any = tree
    for i, part in enumerate(parts):
        where = ".".join(parts[:i]) or "job"
        if isinstance(node, list):
            named = {str(item.get("name")): item for item in node if isinstance(item, dict)}
            if part not in named:
                raise PathError(f"no '{part}' in {where}; expected one of: {', '.join(named)}")
            if i == len(parts) - 1:
                raise PathError(f"expected a field of {where}.{part}, e.g. {path}.epochs")
            node = named[part]
        elif not isinstance(node, dict):
            raise PathError(f"{where} holds a single value, not fields")
        elif i == len(parts) - 1:
            node[part] = value
        else:
            node = node.setdefault(part, {})


def get_at(tree: Any, path: str) -> Any:
    """The value at `path`, or None where the path leads nowhere."""
    for part in path.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree
