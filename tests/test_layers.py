"""The import contracts in pyproject.toml (import-linter) hold, and they catch what they are for: a copy of the
package with a circle, or a method that imports Ray, fails `lint-imports`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


@pytest.fixture
def copy(tmp_path):
    """The package and its contracts, copied: the copy is what `lint-imports` reads (first on PYTHONPATH)."""
    shutil.copytree(ROOT / "kdpipe", tmp_path / "kdpipe", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )


def add_line(path: Path, line: str) -> None:
    path.write_text(path.read_text() + f"\n{line}\n")


def test_the_package_keeps_its_contracts(copy):
    done = lint(copy)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "0 broken" in done.stdout


def test_a_circle_breaks_the_contracts(copy):
    """The search's space is imported by its run; the run imported back from the space makes a circle."""
    add_line(copy / "kdpipe/driver/search/space.py", "from kdpipe.driver.search import run  # noqa: E402, F401")
    done = lint(copy)
    assert done.returncode == 1
    assert "No import circles anywhere in the package BROKEN" in done.stdout
    assert "Layers inside a search BROKEN" in done.stdout


def test_a_method_importing_ray_breaks_the_contracts(copy):
    add_line(copy / "kdpipe/methods/kd.py", "import ray  # noqa: E402, F401")
    done = lint(copy)
    assert done.returncode == 1
    assert "Methods, models and data are plain torch: no Ray, MLflow or DeepSpeed BROKEN" in done.stdout
    assert "kdpipe.methods.kd -> ray" in done.stdout
