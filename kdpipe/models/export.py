"""A trained network written in the formats services load: ONNX (checked against onnxruntime), TorchScript, or
safetensors; each beside `preprocessing.json` (class names, resize, crop, mean, std), since all three take the
normalized N x 3 x crop x crop batch, not images."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from kdpipe.errors import UserError

FORMATS = ("onnx", "torchscript", "safetensors")
ONNX_TOLERANCE = 1e-4  # the largest fp32 logit difference allowed between torch and onnxruntime
PREPROCESSING = "preprocessing.json"


def export(network: nn.Module, config: dict, fmt: str, out: Path) -> tuple[Path, float | None]:
    """Write `network` (eval mode) as `fmt` (one of `FORMATS`, which the caller checked) into folder `out`; returns
    the file, and for ONNX the largest logit difference from torch on a batch of 3 (a batch size other than the
    export's: the batch axis is dynamic)."""
    out.mkdir(parents=True, exist_ok=True)
    network = network.eval()
    keys = ("classes", "resize", "crop", "mean", "std")
    (out / PREPROCESSING).write_text(json.dumps({key: config[key] for key in keys}, indent=1))
    example = torch.randn(2, 3, config["crop"], config["crop"], generator=torch.Generator().manual_seed(0))
    if fmt == "safetensors":
        path = out / "model.safetensors"
        save_file({k: v.detach().contiguous() for k, v in network.state_dict().items()}, str(path))
        (out / "constructor.json").write_text(json.dumps(config["constructor"], indent=1))
        return path, None
    if fmt == "torchscript":
        path = out / "model.pt"
        with torch.no_grad():
            torch.jit.save(torch.jit.trace(network, example), str(path))
        return path, None
    return export_onnx(network, example, out / "model.onnx")


def export_onnx(network: nn.Module, example: torch.Tensor, path: Path) -> tuple[Path, float]:
    try:
        import onnxruntime
    except ImportError:
        raise UserError("--format onnx: needs the onnx extra (pip install 'kdpipe[onnx]')") from None
    batch = torch.export.Dim("batch")
    program = torch.onnx.export(
        network, (example,), dynamo=True, input_names=["images"], output_names=["logits"], dynamic_shapes=({0: batch},)
    )
    program.save(str(path))
    check = torch.randn(3, *example.shape[1:], generator=torch.Generator().manual_seed(1))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": check.numpy()})
    with torch.no_grad():
        difference = float((torch.from_numpy(logits) - network(check)).abs().max())
    if difference > ONNX_TOLERANCE:
        raise UserError(
            f"--format onnx: onnxruntime's logits differ from torch's by {difference:.2e} (allowed: "
            f"{ONNX_TOLERANCE:.0e}); {path} is kept for inspection"
        )
    return path, difference
