"""Every file under cluster/ that starts Ray turns Ray token auth on, and every MLflow server it starts has its
own authentication on. The checks read the files as shipped; each check is also shown to catch a bad file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
STARTS_RAY = re.compile(r"\bray start\b|start-(head|worker)\.sh")


def shell_problems(text: str) -> list[str]:
    """A script that runs `ray start` must export RAY_AUTH_MODE=token before it and never turn auth off."""
    problems = []
    if "RAY_AUTH_MODE=disabled" in text:
        problems.append("turns token auth off")
    start = re.search(r"^\s*(exec\s+)?ray start\b", text, re.MULTILINE)
    if start:
        export = re.search(r"^\s*export RAY_AUTH_MODE=token\s*$", text, re.MULTILINE)
        if export is None or export.start() > start.start():
            problems.append("runs `ray start` without exporting RAY_AUTH_MODE=token first")
    if re.search(r"\bmlflow server\b", text) and "--app-name basic-auth" not in text:
        problems.append("starts `mlflow server` without --app-name basic-auth")
    return problems


def yaml_problems(documents: list[dict]) -> list[str]:
    """A launcher config's start commands and a KubeRay RayCluster must each turn token auth on."""
    problems = []
    for document in documents:
        if document.get("kind") == "RayCluster":
            if (document["spec"].get("authOptions") or {}).get("mode") != "token":
                problems.append(f"RayCluster {document['metadata']['name']}: spec.authOptions.mode is not token")
        for key in ("head_start_ray_commands", "worker_start_ray_commands"):
            for command in document.get(key, []):
                if STARTS_RAY.search(command) and "RAY_AUTH_MODE=token" not in command:
                    problems.append(f"{key}: starts Ray without RAY_AUTH_MODE=token: {command}")
        for command in yaml_commands(document):
            if "mlflow-server.sh" not in command and "mlflow server" in command and "basic-auth" not in command:
                problems.append(f"starts `mlflow server` without basic auth: {command}")
    return problems


def yaml_commands(node) -> list[str]:
    """Every string in a YAML tree: commands hide in lists, container specs and env values."""
    if isinstance(node, dict):
        return [s for value in node.values() for s in yaml_commands(value)]
    if isinstance(node, list):
        return [s for value in node for s in yaml_commands(value)]
    return [node] if isinstance(node, str) else []


def problems_of(path: Path) -> list[str]:
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        return yaml_problems([d for d in yaml.safe_load_all(text) if d])
    return shell_problems(text)


def starts_ray(path: Path) -> bool:
    text = path.read_text()
    return bool(STARTS_RAY.search(text)) or "kind: RayCluster" in text


SHIPPED = sorted(path for path in CLUSTER.iterdir() if path.is_file())


def test_the_cluster_folder_ships_scripts_a_launcher_config_and_a_kuberay_manifest():
    names = {path.name for path in SHIPPED}
    assert {"start-head.sh", "start-worker.sh", "mlflow-server.sh", "aws.yaml", "kuberay.yaml"} <= names
    assert sum(starts_ray(path) for path in SHIPPED) >= 4


@pytest.mark.parametrize("path", SHIPPED, ids=lambda path: path.name)
def test_every_cluster_file_that_starts_ray_turns_token_auth_on(path):
    assert problems_of(path) == []


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("plain.sh", "#!/bin/sh\nray start --head --port 6379\n"),
        ("late.sh", "#!/bin/sh\nray start --head\nexport RAY_AUTH_MODE=token\n"),
        ("off.sh", "#!/bin/sh\nexport RAY_AUTH_MODE=token\nRAY_AUTH_MODE=disabled ray start --head\n"),
        ("open-mlflow.sh", "#!/bin/sh\nmlflow server --host 0.0.0.0\n"),
        ("launcher.yaml", "head_start_ray_commands: [ray stop, ray start --head --port=6379]\n"),
        ("kuberay.yaml", "kind: RayCluster\nmetadata: {name: x}\nspec: {headGroupSpec: {}}\n"),
    ],
)
def test_the_checks_catch_a_config_without_auth(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    assert problems_of(path) != []
