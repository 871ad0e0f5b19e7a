"""Every MLflow call kdpipe makes: the store and its runs (`store`), leases (`lease`), artifact files (`files`)."""

import logging
import os

# kdpipe prints its own table of run ids; MLflow's per-run "View run at" lines and download bars would break into
# the progress bars.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# "Creating initial MLflow database tables...": a new sqlite store's set-up, not news for the user.
logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
# "Validating input example against model signature": each logged model's routine check.
logging.getLogger("mlflow.pyfunc").setLevel(logging.WARNING)


class TrackingError(Exception):
    """MLflow failed (server unreachable, store broken): one line that names the tracking URI."""
