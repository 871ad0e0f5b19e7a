"""A teacher trained the way a team trains its own models, outside kdpipe: a plain PyTorch loop over Fashion-MNIST
that saves the state dict as its checkpoint. `job.yaml` beside it imports the file and distils a small student.

    .venv/bin/python examples/fashion-mnist-import/train_teacher.py       # writes teacher.pt beside this file
    .venv/bin/kdpipe run examples/fashion-mnist-import/job.yaml

Nothing here imports kdpipe: only torch, torchvision and the IDX files.
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np
import torch
import torchvision

HERE = Path(__file__).resolve().parent
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST's pixel mean and std


def read_idx(path: Path) -> np.ndarray:
    data = gzip.decompress(path.read_bytes())
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def images(path: Path) -> torch.Tensor:
    grey = (torch.from_numpy(read_idx(path).copy()).float() / 255 - MEAN) / STD
    return grey[:, None].expand(-1, 3, -1, -1)  # three channels, as kdpipe feeds every model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=HERE.parents[2] / "shared" / "data" / "fashion-mnist")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE / "teacher.pt")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    train_x, train_y = (
        images(args.data / "train-images-idx3-ubyte.gz"),
        read_idx(args.data / "train-labels-idx1-ubyte.gz"),
    )
    val_x, val_y = images(args.data / "t10k-images-idx3-ubyte.gz"), read_idx(args.data / "t10k-labels-idx1-ubyte.gz")
    train_y, val_y = torch.from_numpy(train_y.astype(np.int64)), torch.from_numpy(val_y.astype(np.int64))
    model = torchvision.models.resnet18(num_classes=10).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for epoch in range(args.epochs):
        model.train()
        for step, index in enumerate(torch.randperm(len(train_y)).split(128)):
            loss = torch.nn.functional.cross_entropy(model(train_x[index].to(device)), train_y[index].to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % 100 == 0:
                print(f"epoch {epoch} step {step}: loss {loss.item():.3f}", flush=True)
    model.eval()
    with torch.no_grad():
        predicted = torch.cat([model(chunk.to(device)).argmax(1).cpu() for chunk in val_x.split(500)])
    print(f"top-1 on the 10,000 test images: {(predicted == val_y).float().mean().item():.4f}")
    torch.save({"epoch": args.epochs, "state_dict": model.state_dict()}, args.out)  # a training script's checkpoint
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
