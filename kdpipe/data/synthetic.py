"""Synthetic images whose classes are learnable, written as an ImageFolder of JPEGs.

Each class is a sinusoidal grating with its own tilt and spatial frequency; every image draws a random phase, a
small jitter of both, a random mirror image, a random colour and Gaussian noise. Classes are told apart by the
tilt's angle from the vertical, which a horizontal flip keeps, so the standard flip augmentation never turns one
class into another. Colour, phase and mirroring carry no class information, so a model must learn oriented
filters: chance is 1/classes, and a small CNN climbs far above it within a few epochs, which lets tests tell
learning from noise.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from kdpipe.terminal import tracked

CHUNK_PIXELS = 1 << 20  # pixels generated at once: about 100 MB of float64 working arrays


def grating_images(label: int, count: int, classes: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """`count` uint8 H x W x 3 images of class `label`."""
    # Class = (tilt, frequency): ceil(classes / 2) tilts spread over a quarter turn, two frequencies an octave apart.
    tilts = max((classes + 1) // 2 - 1, 1)
    theta = math.pi / 2 * (label // 2) / tilts + rng.normal(0, 0.03, count)
    theta = np.where(rng.random(count) < 0.5, theta, math.pi - theta)  # mirror image: same class
    cycles = (2.0 if label % 2 else 4.0) * rng.uniform(0.92, 1.08, count)
    phase = rng.uniform(0, 2 * math.pi, count)
    yy, xx = np.mgrid[0:size, 0:size] / size
    wave = np.sin(
        2 * math.pi * cycles[:, None, None] * (np.cos(theta)[:, None, None] * xx + np.sin(theta)[:, None, None] * yy)
        + phase[:, None, None]
    )
    colour = rng.uniform(0.5, 1.0, (count, 1, 1, 3))
    image = 0.5 + 0.4 * wave[..., None] * colour + rng.normal(0, 0.1, (count, size, size, 3))
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def write_image_folder(root: Path, classes: int, size: int, train_size: int, val_size: int, seed: int) -> None:
    """`root/{train,val}/class_XX/NNNNNN.jpg`, balanced over classes (torchvision ImageFolder layout)."""
    rng = np.random.default_rng(seed)
    for split, total in (("train", train_size), ("val", val_size)):
        per_class = [total // classes + (1 if c < total % classes else 0) for c in range(classes)]
        for label in tracked(range(classes), f"synthetic {split} images"):
            folder = root / split / f"class_{label:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            chunk = max(1, CHUNK_PIXELS // (size * size))  # a bounded number of float images in memory at once
            for first in range(0, per_class[label], chunk):
                count = min(chunk, per_class[label] - first)
                for i, pixels in enumerate(grating_images(label, count, classes, size, rng), first):
                    Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=90)
