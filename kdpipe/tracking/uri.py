"""Failures of MLflow as one line naming the store, and store URIs every process resolves alike."""

from __future__ import annotations

import contextlib
from pathlib import Path

import mlflow
import requests

from kdpipe.tracking import TrackingError


@contextlib.contextmanager
def naming_uri(uri: str):
    """Turn any MLflow, HTTP or file-store failure inside the block into a one-line `TrackingError`."""
    try:
        yield
    except (mlflow.exceptions.MlflowException, requests.RequestException, OSError) as err:
        reason = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise TrackingError(f"MLflow tracking at {uri} failed: {reason[:300]}") from None


class Guarded:
    """An MLflow client or artifact repository whose every failing call raises a `TrackingError` naming the
    tracking URI."""

    def __init__(self, target, uri: str):
        self.uri, self._target = uri, target

    def __getattr__(self, name: str):
        method = getattr(self._target, name)
        if not callable(method):
            return method

        def call(*args, **kwargs):
            with naming_uri(self.uri):
                return method(*args, **kwargs)

        return call


def resolve_uri(uri: str) -> str:
    """Make a relative sqlite path absolute, so Ray workers (whose working folder differs) find the same store."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def ui_hint(uri: str, experiment_id: str) -> str:
    """Where to see an experiment's runs in MLflow's UI. MLflow 3.17's UI opens on its GenAI view (traces, judges)
    whatever an experiment's kind, unless the address asks for model training, as this one does."""
    page = f"#/experiments/{experiment_id}?workflowType=machine_learning"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{page}"
    return f"mlflow ui --backend-store-uri {uri}, then http://127.0.0.1:5000/{page}"
