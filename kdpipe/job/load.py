"""Job files in: YAML read with limits on what it may hold, `--set PATH=VALUE` applied, then validated as a
`JobSpec`. Every problem is a `UserError` of one line naming the file (or the setting), the field and what was
expected."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kdpipe.errors import UserError
from kdpipe.job.describe import describe_error
from kdpipe.job.dotted import PathError, set_at
from kdpipe.job.spec import DataSpec, JobSpec, is_url

# What a job file may hold at most, so that no file makes kdpipe hang or exhaust memory: its size, its nesting
# and the number of values once YAML aliases are expanded (a few kilobytes of anchors can expand to billions).
MAX_JOB_BYTES, MAX_NESTING, MAX_VALUES = 1 << 20, 64, 100_000


def load_job(path: str | Path, check_paths: bool = True, settings: Sequence[str] = ()) -> JobSpec:
    """Read and validate a job file, with `--set PATH=VALUE` settings applied; any problem is a one-line
    `UserError` naming the file, or the setting that caused it. `check_paths=False` leaves data paths to the
    machine that reads them (`kdpipe submit`: the cluster's shared storage, not the laptop's disk)."""
    path = Path(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of job fields at the top level, got {type(raw).__name__}")
    try:
        spec = JobSpec.model_validate(apply_settings(raw, settings))
    except ValidationError as err:
        raise UserError(f"{blame(raw, settings, path)}: {describe_error(err, JobSpec)}") from None
    if check_paths:
        check_data_path(spec.data, path)
    return spec


def apply_settings(raw: dict, settings: Sequence[str]) -> dict:
    """A copy of the job file's data with each `PATH=VALUE` set: VALUE read as YAML (0.05, true, [0, 1], a word),
    PATH dotted, a stage named by its name (`stages.student.optimizer.lr`). A path that leads nowhere is a
    `UserError` naming the setting; a field the schema lacks is left for validation to name."""
    raw = copy.deepcopy(raw)
    for setting in settings:
        dotted, equals, text = setting.partition("=")
        dotted = dotted.strip()
        if not equals or not all(dotted.split(".")):
            raise UserError(f"--set {setting}: expected PATH=VALUE, e.g. stages.student.optimizer.lr=0.05")
        try:
            set_at(raw, dotted, parse_yaml(text, f"--set {dotted}"))
        except PathError as err:
            raise UserError(f"--set {dotted}: {err}") from None
    return raw


def blame(raw: dict, settings: Sequence[str], path: Path) -> str:
    """Whose mistake a validation error is: the file's, if it fails alone; else the first setting that breaks it."""
    try:
        JobSpec.model_validate(raw)
    except ValidationError:
        return str(path)
    for n in range(1, len(settings) + 1):
        try:
            JobSpec.model_validate(apply_settings(raw, settings[:n]))
        except ValidationError:
            return f"--set {settings[n - 1]}"
    return str(path)


def read_yaml(path: Path) -> Any:
    """A job file's YAML as plain data, refusing what could hang or exhaust memory: more than MAX_JOB_BYTES, text
    that is not UTF-8, and what `parse_yaml` refuses."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_JOB_BYTES + 1)
    except OSError as err:
        raise UserError(f"{path}: cannot read job file ({err.strerror})") from None
    if len(data) > MAX_JOB_BYTES:
        raise UserError(f"{path}: over {MAX_JOB_BYTES} bytes; expected a YAML job file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: byte {err.start} is not UTF-8; expected a YAML job file in UTF-8") from None
    return parse_yaml(text, str(path))


def parse_yaml(text: str, source: str) -> Any:
    """YAML text as plain data, refusing nesting deeper than MAX_NESTING and more than MAX_VALUES values once
    aliases are expanded; `source` (a file, a `--set`) starts each error line."""
    loader = None
    try:
        loader = yaml.SafeLoader(text)
        node = loader.get_single_node()
        if node is None:
            return None
        check_size(node)
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"{source}{where}: YAML syntax error: {problem}") from None
    except TooLarge as err:
        raise UserError(f"{source}: {err}; expected a job file") from None
    except RecursionError:
        raise UserError(f"{source}: YAML nested deeper than {MAX_NESTING} levels") from None
    except (ValueError, OverflowError) as err:  # e.g. an integer of more digits than Python converts
        raise UserError(f"{source}: a value YAML cannot hold as a number ({str(err)[:120]})") from None
    finally:
        if loader is not None:
            loader.dispose()


class TooLarge(Exception):
    """YAML whose structure would take unbounded time or memory to build."""


def check_size(root: yaml.Node) -> None:
    """Refuse a YAML node graph nested deeper than MAX_NESTING, holding more than MAX_VALUES values with its
    aliases expanded, or containing itself through an alias: counted once per node, without recursion."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 1, False)]
    open_nodes: set[int] = set()
    while stack:
        node, depth, children_done = stack.pop()
        if depth > MAX_NESTING:
            raise RecursionError
        children = node.value if isinstance(node, yaml.SequenceNode) else []
        if isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        if children_done:
            open_nodes.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(child)] for child in children)
            if sizes[id(node)] > MAX_VALUES:
                raise TooLarge(f"more than {MAX_VALUES} values once its aliases are expanded")
            continue
        if id(node) in sizes:
            continue
        if id(node) in open_nodes:
            raise TooLarge("a YAML alias refers to a node that contains it")
        open_nodes.add(id(node))
        stack.append((node, depth, True))
        stack.extend((child, depth + 1, False) for child in children if id(child) not in sizes)


def check_data_path(data: DataSpec, job_path: Path) -> None:
    if data.source != "synthetic" and not is_url(data.path) and not Path(data.path).exists():
        raise UserError(f"{job_path}: data.path: no such file or folder '{data.path}' (source '{data.source}')")
