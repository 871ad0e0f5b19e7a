"""One MLflow run's artifact files, moved through the run's artifact URI alone."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

from kdpipe.tracking.uri import Guarded, naming_uri, resolve_uri


class RunArtifacts:
    """One run's artifact files, reached through its artifact URI alone. Moving files needs no tracking store, so a
    Ray worker that only uploads its part of a checkpoint or downloads a teacher never opens the SQL store (a
    second of imports and mapper set-up in every process) nor asks the server for the run."""

    def __init__(self, artifact_uri: str, tracking_uri: str):
        uri = resolve_uri(tracking_uri)
        with naming_uri(uri):  # an `mlflow-artifacts:` location is resolved against the tracking server
            self.repository = Guarded(get_artifact_repository(artifact_uri, tracking_uri=uri), uri)

    def holds(self, path: str) -> bool:
        """Whether the run has the artifact file `path`."""
        folder = str(Path(path).parent)
        return path in {a.path for a in self.repository.list_artifacts(None if folder == "." else folder)}

    def folders_holding(self, parent: str, file: str) -> list[str]:
        """Names of the folders under `parent` that hold a file named `file`."""
        return [
            Path(folder.path).name
            for folder in self.repository.list_artifacts(parent)
            if folder.is_dir and self.holds(f"{folder.path}/{file}")
        ]

    def list_folder(self, folder: str) -> list[str]:
        """Names of the entries of an artifact folder."""
        return [Path(a.path).name for a in self.repository.list_artifacts(folder)]

    def log_files(self, files: list[Path], folder: str) -> None:
        for path in files:
            self.repository.log_artifact(str(path), folder)

    def log_folder(self, local: Path, folder: str) -> None:
        self.repository.log_artifacts(str(local), folder)

    def delete(self, paths: list[str]) -> None:
        for path in paths:
            self.repository.delete_artifacts(path)

    @contextlib.contextmanager
    def downloaded(self, folder: str, names: Sequence[str] = ()) -> Iterator[Path]:
        """An artifact folder, or only its files `names`, downloaded to a local folder removed after the block."""
        with tempfile.TemporaryDirectory(prefix="kdpipe-artifacts-") as target:
            for path in [f"{folder}/{name}" for name in names] or [folder]:
                self.repository.download_artifacts(path, target)  # to target/<path>
            yield Path(target) / folder
