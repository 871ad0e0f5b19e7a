#!/usr/bin/env bash
# The MLflow tracking server of a kdpipe cluster: a database for runs, an artifact store for weights and
# checkpoints (served through the server: clients need no storage credentials), MLflow's basic auth on.
#
# Settings, from the environment:
#   MLFLOW_AUTH_ADMIN_PASSWORD  the admin password (12 characters or more), needed the first time: MLflow
#                       creates the admin user then
#   MLFLOW_STORE        a folder for the databases and the default artifact store (default $KDPIPE_STORAGE/mlflow)
#   MLFLOW_BACKEND_URI  where runs go (default sqlite:///$MLFLOW_STORE/mlflow.db; postgresql://... for a team)
#   MLFLOW_ARTIFACTS    where artifacts go (default $MLFLOW_STORE/artifacts; s3://BUCKET/PATH or gs://... on a cloud)
#   MLFLOW_HOST         the address to bind (default 127.0.0.1; 0.0.0.0 lets the cluster's nodes reach it)
#   MLFLOW_PORT         default 5000
#   MLFLOW_WORKERS      server processes (default 4)
#   MLFLOW_ALLOWED_HOSTS  Host headers it answers besides localhost and private IPs (DNS-rebinding guard),
#                       e.g. mlflow.example.com,kdpipe-mlflow:5000
# Jobs log in with MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (set them where `ray start` runs);
# add users beside admin with MLflow's auth API (mlflow.server.auth.client).
set -euo pipefail

store="${MLFLOW_STORE:-${KDPIPE_STORAGE:?set MLFLOW_STORE or KDPIPE_STORAGE}/mlflow}"
mkdir -p "$store"
# MLflow's auth settings: users in their own database, new users may read every experiment and edit their own.
# A job sends hundreds of requests per stage (metrics, each checkpoint file), each checking the password with a
# deliberately slow hash (scrypt, ~0.13 s of CPU here) unless a recent check of the same login is cached: a
# minute's cache. A changed password or a removed user then reaches the other server processes within the minute.
export MLFLOW_AUTH_CONFIG_PATH="$store/basic_auth.ini"
cat > "$MLFLOW_AUTH_CONFIG_PATH" <<INI
[mlflow]
default_permission = READ
database_uri = sqlite:///$store/basic_auth.db
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = 60
INI
# The session secret of the server's forms (CSRF): one per store, kept beside it, never in a config.
secret="$store/flask_secret"
[[ -s "$secret" ]] || (umask 077 && openssl rand -hex 32 > "$secret")
export MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat "$secret")"
# kdpipe uses no MLflow server jobs (GenAI evaluation): without them the server starts no job-runner processes.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

exec mlflow server --app-name basic-auth \
    --backend-store-uri "${MLFLOW_BACKEND_URI:-sqlite:///$store/mlflow.db}" \
    --artifacts-destination "${MLFLOW_ARTIFACTS:-$store/artifacts}" \
    --host "${MLFLOW_HOST:-127.0.0.1}" --port "${MLFLOW_PORT:-5000}" --workers "${MLFLOW_WORKERS:-4}" \
    ${MLFLOW_ALLOWED_HOSTS:+--allowed-hosts "$MLFLOW_ALLOWED_HOSTS"}
