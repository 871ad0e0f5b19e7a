"""Nothing from a job file reaches a shell or eval, and weights load without unpickling code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from kdpipe.models import build_model, load_weights, save_weights

SOURCES = sorted((Path(__file__).resolve().parents[1] / "kdpipe").rglob("*.py"))
FORBIDDEN = {
    "eval/exec": re.compile(r"(?<![\w.])(eval|exec)\("),
    "shell": re.compile(r"shell\s*=\s*True|os\.system\(|os\.popen\("),
    "pickle": re.compile(r"pickle\.loads?\("),
    "yaml.load": re.compile(r"yaml\.(unsafe_)?load\("),
}


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_no_shell_eval_or_unpickling(path):
    text = path.read_text()
    for what, pattern in FORBIDDEN.items():
        assert not pattern.search(text), f"{path}: {what}"
    for call in re.findall(r"torch\.load\([^)]*\)", text):
        assert "weights_only=True" in call, f"{path}: {call}"


def test_weights_round_trip_through_safetensors(tmp_path):
    model = build_model("resnet8", 7).eval()
    save_weights(model, "resnet8", 7, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.safetensors"]
    loaded = load_weights(tmp_path).eval()
    images = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(loaded(images), model(images))
