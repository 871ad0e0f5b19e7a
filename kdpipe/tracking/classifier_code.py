"""A kdpipe stage's network as an MLflow Model, by MLflow's models-from-code: MLflow runs this file, on its own, to
load the model. It imports torch, torchvision and the network's own library, never kdpipe, so a service needs
neither kdpipe nor its dependencies, and loading unpickles nothing: the weights are safetensors, the network is
rebuilt by the constructor its config names (`kdpipe.models.constructor`), and preprocessing is the code below.

Input: uint8 images, N x H x W x 3 (or N x H x W grey), all of one size. Output: per image, the predicted class
name (`label`) and every class's probability (`probabilities`, in the order of the model's `classes`).
"""

from __future__ import annotations

import importlib

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel
from safetensors.torch import load_file
from torchvision.transforms.v2 import functional as TF


class ImageClassifier(PythonModel):
    def load_context(self, context) -> None:
        self.config = config = context.model_config
        build = config["constructor"]
        network = getattr(importlib.import_module(build["module"]), build["function"])(**build["kwargs"])
        network.load_state_dict(load_file(context.artifacts["weights"]), strict=True)
        self.network = network.eval()
        self.classes = config["classes"]
        self.resize, self.crop = config["resize"], config["crop"]
        self.mean, self.std = (torch.tensor(config[key]).view(1, -1, 1, 1) for key in ("mean", "std"))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """The held-out transform the network was evaluated with: resize, centre crop, scale to [0, 1],
        normalize."""
        images = images if images.ndim == 4 else images.unsqueeze(-1)  # grey broadcasts over the channels
        images = TF.resize(images.permute(0, 3, 1, 2), self.resize, antialias=True)
        images = TF.center_crop(images, [self.crop, self.crop]).float().div(255)
        return (images - self.mean) / self.std

    @torch.inference_mode()
    def probabilities(self, images: np.ndarray) -> torch.Tensor:
        return self.network(self.preprocess(torch.as_tensor(np.asarray(images, dtype=np.uint8)))).float().softmax(1)

    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> pd.DataFrame:
        probabilities = self.probabilities(model_input)
        labels = [self.classes[i] for i in probabilities.argmax(1).tolist()]
        return pd.DataFrame({"label": labels, "probabilities": probabilities.double().tolist()})


mlflow.models.set_model(ImageClassifier())
