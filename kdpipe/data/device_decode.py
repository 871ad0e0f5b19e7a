"""Images decoded and augmented where the model runs (`data.decode: gpu`): the loader workers read each sample's
bytes and header and draw its view's random choices; the training process decodes a whole batch at once (nvJPEG
through torchvision's `decode_jpeg` on CUDA) and applies the choices there.

The choices are drawn by the same torchvision transforms, in the same order and from the same random stream, as the
CPU path's workers draw them when they run the transforms: on shapes alone (meta tensors), so no pixel is touched
in a worker. A view is then the CPU path's view, and like it a function of (seed, epoch, rank, step), so resuming
replays it; on the CPU the two paths give equal pixels (tested), on a GPU its own resizing kernels'.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms import v2
from torchvision.transforms.v2._transform import _RandomApplyTransform

from kdpipe.data.shards import BadImage, image_size

Choices = tuple[dict | None, ...]  # per transform: its parameters, or None where a random one did not apply
JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass(frozen=True)
class Encoded:
    data: torch.Tensor  # the file's bytes, uint8
    jpeg: bool
    choices: Choices


@dataclass(frozen=True)
class EncodedBatch:
    """A batch of `Encoded` samples as the loader hands it over, for the training (`train`) or held-out views."""

    samples: list[Encoded]
    train: bool
    keys: list[str]

    def __len__(self) -> int:
        return len(self.samples)


def draw_choices(transforms: v2.Compose, height: int, width: int) -> Choices:
    """The random choices `transforms` make for an image of this size, drawn as running them would draw them
    (`Transform.forward`, `_RandomApplyTransform.forward`), with the shapes carried along on the meta device."""
    shape = torch.empty(3, height, width, dtype=torch.uint8, device="meta")
    choices: list[dict | None] = []
    for transform in transforms.transforms:
        if isinstance(transform, _RandomApplyTransform) and torch.rand(1) >= transform.p:
            choices.append(None)
            continue
        params = transform.make_params([shape])
        shape = transform.transform(shape, params)
        choices.append(params)
    return tuple(choices)


def encode(transforms: v2.Compose, data: bytes) -> Encoded:
    """In a loader worker: the sample's bytes (its header checked, `BadImage` otherwise) and its view's choices."""
    width, height = image_size(data)
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return Encoded(raw, data[:3] == JPEG_MAGIC, draw_choices(transforms, height, width))


def apply_choices(transforms: v2.Compose, image: torch.Tensor, choices: Choices) -> torch.Tensor:
    for transform, params in zip(transforms.transforms, choices, strict=True):
        if params is not None:
            image = transform.transform(image, params)
    return image


def decode_batch(batch: EncodedBatch, transforms: v2.Compose, device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """uint8 N x 3 x H x W on `device`, and the positions of images whose bytes did not decode (their views are
    stand-ins: the batch's first good one). The batch's JPEGs decode together there, other formats on the CPU,
    each image's view is applied on `device`."""
    samples = batch.samples
    images: list[torch.Tensor | None] = [None] * len(samples)
    jpegs = [i for i, sample in enumerate(samples) if sample.jpeg]
    others = [i for i, sample in enumerate(samples) if not sample.jpeg]
    try:
        decoded = decode_jpeg([samples[i].data for i in jpegs], mode=ImageReadMode.RGB, device=device) if jpegs else []
    except RuntimeError:  # one bad image fails the batch's call: find it one by one
        decoded = [decode_one(samples[i], device) for i in jpegs]
    for i, image in zip(jpegs, decoded, strict=True):
        images[i] = image
    for i in others:
        images[i] = decode_one(samples[i], device)
    bad = [i for i, image in enumerate(images) if image is None]
    views = [
        apply_choices(transforms, image, s.choices)
        for image, s in zip(images, samples, strict=True)
        if image is not None
    ]
    if not views:
        raise BadImage("no image of the batch decodes")
    for i in bad:
        views.insert(i, views[0])
    return torch.stack(views), bad


def decode_one(sample: Encoded, device: torch.device) -> torch.Tensor | None:
    try:
        if sample.jpeg:
            return decode_jpeg(sample.data, mode=ImageReadMode.RGB, device=device)
        return decode_image(sample.data, mode=ImageReadMode.RGB).to(device)
    except RuntimeError:
        return None
