"""Files behind an MLflow URI (`runs:/<id>/<path>`, `models:/<name>/<version>`, `models:/<name>@<alias>`), downloaded
once into a cache. A run's files and a registered version do not change, so the URI (an alias resolved to the
version it points at now) names the cached copy."""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from kdpipe.errors import UserError
from kdpipe.tracking import TrackingError
from kdpipe.tracking.uri import naming_uri, resolve_uri

COMPLETE = ".complete"  # written last: a folder without it is a download that was cut off
ALIAS = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/]+)$")


def download(uri: str, tracking_uri: str, cache: Path, where: str, fetch: bool = True) -> Path | None:
    """A local folder holding what `uri` names (a file, or a folder of files); one line naming `where` when the
    store cannot be read or holds no such thing. With `fetch` False, None unless it was downloaded before."""
    tracking = resolve_uri(tracking_uri)
    try:
        with naming_uri(tracking):
            fixed = pinned(uri, tracking)
            target = cache / hashlib.sha256(fixed.encode()).hexdigest()[:16]
            if not (target / COMPLETE).exists():
                if not fetch:
                    return None
                shutil.rmtree(target, ignore_errors=True)
                target.mkdir(parents=True)
                mlflow.artifacts.download_artifacts(artifact_uri=fixed, dst_path=str(target), tracking_uri=tracking)
                (target / COMPLETE).touch()
    except TrackingError as err:
        raise UserError(f"{where}: cannot read mlflow:{uri} ({str(err).split(': ', 1)[-1]})") from None
    return target


def pinned(uri: str, tracking_uri: str) -> str:
    """`models:/<name>@<alias>` as the version the alias points at now; any other URI as it is."""
    match = ALIAS.match(uri)
    if not match:
        return uri
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    version = client.get_model_version_by_alias(match["name"], match["alias"]).version
    return f"models:/{match['name']}/{version}"
