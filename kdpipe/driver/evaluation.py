"""`kdpipe eval`: a stage's MLflow Model (the one a service loads, preprocessing included) on a split of any data
set whose classes are the model's, matched by name; accuracy per class, calibration, and the pictures."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from kdpipe.data.evaluation import EvalSplit
from kdpipe.errors import UserError

BATCH = 64
BINS = 15  # equal-width confidence bins of the expected calibration error (Guo et al., ICML 2017)


@dataclass(frozen=True)
class Evaluation:
    classes: list[str]  # the model's, in its order
    labels: np.ndarray  # each image's true class, as the model's index
    probabilities: np.ndarray  # N x classes

    @property
    def predicted(self) -> np.ndarray:
        return self.probabilities.argmax(1)

    def top_k(self, k: int) -> float:
        best = np.argsort(-self.probabilities, axis=1, kind="stable")[:, :k]
        return float((best == self.labels[:, None]).any(1).mean())

    def per_class(self) -> dict[str, float]:
        """Each class's accuracy over its own images (classes the split lacks are left out)."""
        hits = self.predicted == self.labels
        present = [(c, name) for c, name in enumerate(self.classes) if (self.labels == c).any()]
        return {name: float(hits[self.labels == c].mean()) for c, name in present}

    def confusion(self) -> np.ndarray:
        """counts[true, predicted]."""
        counts = np.zeros((len(self.classes),) * 2, np.int64)
        np.add.at(counts, (self.labels, self.predicted), 1)
        return counts

    def reliability(self, bins: int = BINS) -> list[tuple[float, float, int]]:
        """Per confidence bin (lower edges exclusive, as Guo et al.'s code): mean confidence, accuracy, count."""
        confidence = self.probabilities.max(1)
        hits = self.predicted == self.labels
        edges = np.linspace(0, 1, bins + 1)
        rows = []
        for low, high in zip(edges[:-1], edges[1:], strict=True):
            inside = (confidence > low) & (confidence <= high)
            count = int(inside.sum())
            if count:
                rows.append((float(confidence[inside].mean()), float(hits[inside].mean()), count))
            else:
                rows.append((0.0, 0.0, 0))
        return rows

    def calibration_error(self) -> float:
        """Expected calibration error: the count-weighted gap between confidence and accuracy over the bins."""
        n = len(self.labels)
        return sum(count / n * abs(confidence - accuracy) for confidence, accuracy, count in self.reliability())

    def metrics(self) -> dict[str, float]:
        k = min(5, len(self.classes))
        values = {"eval/top1": self.top_k(1), f"eval/top{k}": self.top_k(k), "eval/ece": self.calibration_error()}
        values |= {f"eval/class/{metric_name(name)}": acc for name, acc in self.per_class().items()}
        return values


def metric_name(name: str) -> str:
    """MLflow's metric names allow letters, digits and `_-. /`: others become `_`."""
    return re.sub(r"[^\w\-. /]", "_", name)


def class_mapping(model: list[str], data: list[str], where: str) -> list[int]:
    """For each of the data's labels, the model's index of the class of the same name."""
    if set(model) != set(data):
        only_data, only_model = sorted(set(data) - set(model)), sorted(set(model) - set(data))
        raise UserError(
            f"--data: {where}'s classes differ from the model's: only in the data {few(only_data)}; only in the "
            f"model {few(only_model)}"
        )
    index = {name: i for i, name in enumerate(model)}
    return [index[name] for name in data]


def few(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "") if names else "none"


def evaluate(
    probabilities: Callable[[np.ndarray], np.ndarray],
    classes: list[str],
    split: EvalSplit,
    progress: Callable[..., None] | None = None,
) -> Evaluation:
    """Every image of `split` through `probabilities` (uint8 N x H x W x 3 -> N x classes), in batches of
    images of one size; `progress(completed=, total=)` hears of each batch."""
    mapping = class_mapping(classes, split.classes, split.path)
    labels, outputs = [], []
    for images, batch_labels in batches(split.samples()):
        outputs.append(probabilities(images))
        labels += [mapping[label] for label in batch_labels]
        if progress:
            progress(completed=len(labels), total=split.count)
    return Evaluation(classes, np.array(labels, np.int64), np.concatenate(outputs).astype(np.float64))


def batches(samples: Iterator[tuple[torch.Tensor, int]]) -> Iterator[tuple[np.ndarray, list[int]]]:
    images: list[torch.Tensor] = []
    labels: list[int] = []
    for image, label in samples:
        if images and (len(images) == BATCH or image.shape != images[0].shape):
            yield torch.stack(images).numpy(), labels
            images, labels = [], []
        images.append(image)
        labels.append(label)
    if images:
        yield torch.stack(images).numpy(), labels
