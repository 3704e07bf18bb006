#!/usr/bin/env bash
# Start a one-machine Ray cluster that jobs can be submitted to.
#
#   bash cluster/local.sh [PORT]        # default GCS port 6379, dashboard on 8265
#   export RAY_AUTH_MODE=token RAY_ADDRESS=http://127.0.0.1:8265
#   .venv/bin/ray job submit --working-dir . -- python jobs/online_dpo.py
#   .venv/bin/ray stop                  # when done
#
# Everything binds to 127.0.0.1. Ray 2.60's token authentication stays on: the
# head writes ~/.ray/auth_token, and clients read it only with RAY_AUTH_MODE=token.
# The venv goes first on PATH so that a job's `python` entrypoint is the venv's.
set -euo pipefail
PORT="${1:-6379}"
VENV_BIN="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin"
export PATH="$VENV_BIN:$PATH"
ray start --head --port "$PORT" --node-ip-address 127.0.0.1 --dashboard-host 127.0.0.1 --disable-usage-stats
