"""A stage's network as an MLflow Model in its run (`model`), and its versions in the Model Registry.

The model is MLflow's models-from-code (`classifier_code.py`): safetensors weights, a config that names the
network's constructor, the class names and the preprocessing, and code that imports no kdpipe. Chosen over
`torch.export` (whose `.pt2` files unpickle their tensors with torch's unrestricted loader) and over
ONNX inside the model (whose export needs onnx at every stage's end, and whose runtime would replace torch's
numerics in serving).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.types import ColSpec, Schema, TensorSpec
from mlflow.types.schema import Array

from kdpipe.errors import UserError
from kdpipe.tracking.uri import resolve_uri

MODEL = "model"  # the logged model's name in its run
CODE = Path(__file__).with_name("classifier_code.py")
ALIAS = "candidate"
GLOBALS, EXPERIMENT_ID = threading.Lock(), "MLFLOW_EXPERIMENT_ID"
SIGNATURE = ModelSignature(
    inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
    outputs=Schema([ColSpec("string", "label"), ColSpec(Array("double"), "probabilities")]),
)


@contextlib.contextmanager
def tracking(uri: str, experiment_id: str | None = None) -> Iterator[None]:
    """MLflow's model functions read the tracking URI and the experiment from process-wide settings: set for the
    call, one call at a time (stages finish on several driver threads), then restored."""
    with GLOBALS:
        before, experiment = mlflow.get_tracking_uri(), os.environ.get(EXPERIMENT_ID)
        mlflow.set_tracking_uri(resolve_uri(uri))
        if experiment_id:
            os.environ[EXPERIMENT_ID] = experiment_id
        try:
            yield
        finally:
            mlflow.set_tracking_uri(before)
            os.environ.pop(EXPERIMENT_ID, None)
            if experiment is not None:
                os.environ[EXPERIMENT_ID] = experiment


def log_classifier(
    uri: str, run_id: str, weights: Path, config: dict, code_paths: list[str], requirements: list[str]
) -> str:
    """Log the network whose safetensors file is `weights` as the run's MLflow Model; returns its `models:/` URI."""
    example = np.zeros((1, config["crop"], config["crop"], 3), np.uint8)
    experiment_id = mlflow.MlflowClient(resolve_uri(uri)).get_run(run_id).info.experiment_id
    with tracking(uri, experiment_id):
        info = Model.log(
            artifact_path=None,
            name=MODEL,
            flavor=mlflow.pyfunc,
            run_id=run_id,
            python_model=str(CODE),
            artifacts={"weights": str(weights)},
            model_config=config,
            code_paths=code_paths or None,
            pip_requirements=requirements,
            signature=SIGNATURE,
            input_example=example,
        )
    return info.model_uri


def load_classifier(uri: str, model_uri: str):
    """The logged model's Python object (`classifier_code.ImageClassifier`): what `predict` runs, by MLflow's own
    loading, so `kdpipe eval` scores exactly what a service serves."""
    with tracking(uri):
        return mlflow.pyfunc.load_model(model_uri).unwrap_python_model()


def logged_model_uri(uri: str, run_id: str) -> str | None:
    """The `models:/` URI of the run's logged model, if it has one."""
    client = mlflow.MlflowClient(resolve_uri(uri))
    run = client.get_run(run_id)
    found = client.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run_id}' AND name = '{MODEL}'"
    )
    return f"models:/{found[0].model_id}" if found else None


def register(uri: str, run_id: str, model_uri: str, name: str, tags: dict[str, str], alias: str = ALIAS) -> int:
    """A version of registered model `name` for this run's model, tagged and aliased; the version this run
    already has when it has one (a reused stage is not registered twice)."""
    client = mlflow.MlflowClient(resolve_uri(uri))
    try:
        found = client.search_model_versions(f"name = '{name}' AND run_id = '{run_id}'")
        if found:
            version = found[0].version
        else:
            if not client.search_registered_models(f"name = '{name}'"):
                client.create_registered_model(name)
            with tracking(uri):  # the registry resolves the `models:/` source through the global URI
                version = client.create_model_version(name, model_uri, run_id, tags=tags).version
        client.set_registered_model_alias(name, alias, version)
    except MlflowException as err:
        if err.error_code != "INVALID_PARAMETER_VALUE":
            raise
        raise UserError(f"register: MLflow refuses the model name '{name}': {err.message.splitlines()[0]}") from None
    return int(version)
