#!/usr/bin/env bash
# Join a worker node to the kdpipe cluster whose head cluster/start-head.sh started:
#   cluster/start-worker.sh HEAD_IP:6379
# with Ray token authentication on and the head's token file copied here first.
#
# Settings, from the environment (as on the head):
#   RAY_AUTH_TOKEN_PATH  the head's token file, copied here (default ~/.ray/auth_token)
#   NODE_IP              the address other nodes reach this one at (default: the first of `hostname -I`)
#   NUM_CPUS, NUM_GPUS   the resources this node offers (default: what Ray detects)
#   KDPIPE_STORAGE       the shared folder, mounted at the same path as on the head
#   KDPIPE_PYTHON        the Python that has kdpipe's dependencies (default: the python3 beside `ray` on PATH)
#   MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD  the MLflow server's login, for the stages' workers
# Further arguments go to `ray start` unchanged (e.g. --block).
set -euo pipefail

head_address="${1:?usage: start-worker.sh HEAD_IP:PORT [ray start options]}"
shift
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
[[ -s "$RAY_AUTH_TOKEN_PATH" ]] || { echo "no Ray auth token at $RAY_AUTH_TOKEN_PATH: copy the head's" >&2; exit 2; }
: "${KDPIPE_STORAGE:?set KDPIPE_STORAGE to the folder every node shares}"
export KDPIPE_STORAGE
export KDPIPE_PYTHON="${KDPIPE_PYTHON:-$(dirname "$(command -v ray)")/python3}"

resources=()
[[ -n "${NUM_CPUS:-}" ]] && resources+=(--num-cpus "$NUM_CPUS")
[[ -n "${NUM_GPUS:-}" ]] && resources+=(--num-gpus "$NUM_GPUS")
exec ray start --address "$head_address" \
    --node-ip-address "${NODE_IP:-$(hostname -I | awk '{print $1}')}" \
    "${resources[@]}" "$@"
