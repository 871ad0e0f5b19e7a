"""Jobs on a Ray cluster through the Ray Jobs API: submit a job file, list, show or follow logs, stop.

The Jobs API (the head's dashboard port, 8265 by default) checks the cluster's Ray auth token. kdpipe reads the
token where Ray itself looks (RAY_AUTH_TOKEN, then the file named by RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token),
never from the job file or the command line, and sends it as a bearer header.

A submitted job is `kdpipe run JOB` on the head node. Its runtime env carries this package and the job file, so
the cluster runs the code that submitted it; the cluster's Python only needs kdpipe's dependencies. Relative paths
in the job file are taken from KDPIPE_STORAGE on the cluster (the folder every node shares), so the job file that
ran locally runs there unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import requests
from ray.dashboard.modules.job.sdk import JobSubmissionClient
from ray.exceptions import AuthenticationError
from ray.job_submission import JobDetails, JobStatus

from kdpipe.errors import UserError
from kdpipe.job.spec import JobSpec

PACKAGE = Path(__file__).resolve().parent
DEFAULT_TOKEN_FILE = Path("~/.ray/auth_token")
# The cluster's Python: the scripts in cluster/ set KDPIPE_PYTHON on every node; Ray's images have `python`.
CLUSTER_PYTHON = '"${KDPIPE_PYTHON:-python}"'
METADATA_JOB = "kdpipe_job"  # Ray job metadata: the kdpipe job's name, how `kdpipe jobs` tells its own jobs


def read_token() -> tuple[str, str] | None:
    """The Ray auth token and where it came from, looked up in Ray's own order; None if there is none."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    named = os.environ.get("RAY_AUTH_TOKEN_PATH")
    path = Path(named or DEFAULT_TOKEN_FILE).expanduser()
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        if named:
            raise UserError(f"RAY_AUTH_TOKEN_PATH: no token file at {path}") from None
        return None
    except OSError as err:
        raise UserError(f"{path}: cannot read the Ray auth token ({err.strerror})") from None
    if not token:
        raise UserError(f"{path}: the Ray auth token file is empty")
    return token, str(path)


@contextlib.contextmanager
def session(address: str | None) -> Iterator[JobSubmissionClient]:
    """A Jobs API client for the cluster at `address`. Inside the block, a refused token, an unreachable head or
    an unknown job id becomes a one-line `UserError` naming the cluster (and the token's source, if refused)."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS")
    if not address:
        raise UserError(
            "--address: expected the Ray head's dashboard URL, e.g. http://HEAD:8265 (or set RAY_API_SERVER_ADDRESS)"
        )
    token = read_token()
    for name in ("ray.dashboard.modules.dashboard_sdk", "ray._private.runtime_env.packaging"):
        logging.getLogger(name).setLevel(logging.WARNING)  # "Uploading package ...": noise on every submit
    try:
        yield JobSubmissionClient(address, headers={"Authorization": f"Bearer {token[0]}"} if token else {})
    except AuthenticationError:
        sent = f"the token from {token[1]}" if token else "no token (none found)"
        raise UserError(
            f"{address}: the Ray cluster refused the request, sent with {sent}; set RAY_AUTH_TOKEN or "
            "RAY_AUTH_TOKEN_PATH to the cluster's token"
        ) from None
    except (ConnectionError, requests.RequestException) as err:
        raise UserError(f"{address}: no Ray dashboard answers there ({type(err).__name__})") from None
    except RuntimeError as err:  # the SDK's error for any other HTTP failure, e.g. an unknown job id
        raise UserError(f"{address}: {str(err).strip().splitlines()[0][:300]}") from None


def submit(
    client: JobSubmissionClient,
    job_file: Path,
    job: JobSpec,
    storage: str | None,
    tracking_uri: str | None,
    settings: Sequence[str] = (),
) -> str:
    """Submit `kdpipe run` of `job_file` (checked as `job`, with its `--set` settings) as a Ray job; returns its
    submission id. The Jobs API runs the entrypoint through a shell: every argument is quoted."""
    argv = ["-m", "kdpipe", "run", job_file.name] + (["--tracking-uri", tracking_uri] if tracking_uri else [])
    argv += [f"--set={setting}" for setting in settings]
    env = {"KDPIPE_STORAGE": storage} if storage else {}
    with tempfile.TemporaryDirectory() as folder:
        shutil.copytree(PACKAGE, Path(folder) / PACKAGE.name, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copyfile(job_file, Path(folder) / job_file.name)
        return client.submit_job(
            entrypoint=f"{CLUSTER_PYTHON} {shlex.join(argv)}",
            submission_id=f"kdpipe-{job.name}-{uuid.uuid4().hex[:8]}",
            runtime_env={"working_dir": folder, "env_vars": env},
            metadata={METADATA_JOB: job.name},
        )


def kdpipe_jobs(client: JobSubmissionClient) -> list[JobDetails]:
    """The cluster's kdpipe jobs, newest first."""
    jobs = [job for job in client.list_jobs() if METADATA_JOB in (job.metadata or {})]
    return sorted(jobs, key=lambda job: job.start_time or 0, reverse=True)


def follow_logs(client: JobSubmissionClient, job_id: str, write: Callable[[str], None]) -> JobStatus:
    """Write the job's logs as they come until it ends; returns how it ended."""
    client.get_job_status(job_id)  # an unknown id fails here, before the log stream starts

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)

    asyncio.run(tail())
    return client.get_job_status(job_id)


def stop(client: JobSubmissionClient, job_id: str, seconds: float = 60) -> JobStatus:
    """Stop the job (Ray signals its driver, then kills it) and wait until it has ended."""
    client.stop_job(job_id)
    deadline = time.monotonic() + seconds
    while not (status := client.get_job_status(job_id)).is_terminal() and time.monotonic() < deadline:
        time.sleep(1)
    return status
