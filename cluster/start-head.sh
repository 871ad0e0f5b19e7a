#!/usr/bin/env bash
# Start the Ray head node of a kdpipe cluster, with Ray token authentication on.
#
# Ports (open them between the cluster's nodes; only the dashboard to the people who submit jobs):
#   RAY_PORT (6379)        the GCS: worker nodes join here
#   DASHBOARD_PORT (8265)  the dashboard and the Jobs API (`kdpipe submit --address http://HEAD:8265`)
#   10001                  the Ray Client server
#   node manager, object manager, worker and metrics ports: Ray picks free ones (`ray start --help` pins them)
# Every request to any of them must carry the token.
#
# Settings, from the environment:
#   RAY_AUTH_TOKEN_PATH  the token file (default ~/.ray/auth_token; created with a random token, mode 600, if
#                        absent). Copy it to every worker node and to each user who submits jobs.
#   HEAD_IP              the address other nodes reach this one at (default: the first of `hostname -I`)
#   RAY_PORT, DASHBOARD_PORT
#   DASHBOARD_HOST       the address the dashboard binds to (default 127.0.0.1: users reach it through
#                        `ssh -L 8265:127.0.0.1:8265 HEAD`; 0.0.0.0 opens it to the network, token-checked)
#   NUM_CPUS, NUM_GPUS   the resources this node offers to jobs (default: what Ray detects)
#   KDPIPE_STORAGE       the folder every node mounts at the same path: jobs' relative paths are taken from it
#   KDPIPE_PYTHON        the Python that has kdpipe's dependencies (default: the python3 beside `ray` on PATH)
#   MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD  the MLflow server's login, for jobs' drivers and workers
# Further arguments go to `ray start` unchanged (e.g. --block, --temp-dir DIR).
set -euo pipefail

export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
if [[ ! -s "$RAY_AUTH_TOKEN_PATH" ]]; then
    mkdir -p "$(dirname "$RAY_AUTH_TOKEN_PATH")"
    (umask 077 && openssl rand -hex 32 > "$RAY_AUTH_TOKEN_PATH")
    echo "wrote a new Ray auth token to $RAY_AUTH_TOKEN_PATH" >&2
fi
: "${KDPIPE_STORAGE:?set KDPIPE_STORAGE to the folder every node shares}"
export KDPIPE_STORAGE
export KDPIPE_PYTHON="${KDPIPE_PYTHON:-$(dirname "$(command -v ray)")/python3}"
HEAD_IP="${HEAD_IP:-$(hostname -I | awk '{print $1}')}"

resources=()
[[ -n "${NUM_CPUS:-}" ]] && resources+=(--num-cpus "$NUM_CPUS")
[[ -n "${NUM_GPUS:-}" ]] && resources+=(--num-gpus "$NUM_GPUS")
exec ray start --head \
    --node-ip-address "$HEAD_IP" \
    --port "${RAY_PORT:-6379}" \
    --dashboard-host "${DASHBOARD_HOST:-127.0.0.1}" \
    --dashboard-port "${DASHBOARD_PORT:-8265}" \
    "${resources[@]}" "$@"
