"""Every package kdpipe imports is declared in pyproject.toml, and every declared one is used (deptry)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dependencies_are_declared_and_used():
    deptry = Path(sys.executable).parent / "deptry"
    done = subprocess.run([str(deptry), "."], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
