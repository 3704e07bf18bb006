#!/usr/bin/env bash
# Start a one-machine Ray cluster that jobs can be submitted to, token authentication on.
#
#   bash cluster/local.sh [ray start options ...]   # e.g. --port=6380 --dashboard-port=8266 --block
#   export RAY_AUTH_MODE=token RAY_ADDRESS=http://127.0.0.1:8265
#   .venv/bin/ray job submit --working-dir . -- python jobs/online_dpo.py run_dir=$PWD/runs/cluster-demo
#   .venv/bin/ray stop                  # when done
#
# * Everything binds to 127.0.0.1 (GCS port 6379 and dashboard 8265 unless given).
# * Token authentication: Ray 2.60's `ray start --head` turns it on only if a token
#   already exists (~/.ray/auth_token), and with RAY_AUTH_MODE=token it refuses to start
#   without one. So: write a token if there is none, then start with RAY_AUTH_MODE=token.
#   Clients send it only with RAY_AUTH_MODE=token.
# * Logical CPUs: the demo's roles that stay up together (trainer 2, sampler 1, judge
#   0.5, policy 1, and 1 for Ray Data tasks) need 6, and its phases run one after
#   another, so they can share fewer cores. The head gets max(cores, 6) logical CPUs
#   unless --num-cpus is given. A job checks at start that its roles fit the cluster.
# * Worker processes: one per role replica, most of them 0-CPU actors. The raylet warns
#   on every driver's console once it holds 4x its startup concurrency in them, and that
#   defaults to the CPUs (8 processes on 2 cores: every demo). The head expects
#   max(cores, 8) concurrent starts instead (raydpo.cluster.STARTUP_CONCURRENCY does the same for a
#   local Ray).
# * The venv goes first on PATH, so that a job's `python` entrypoint is the venv's.
set -euo pipefail
VENV_BIN="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin"
if [ ! -x "$VENV_BIN/ray" ]; then
  echo "cluster/local.sh: $VENV_BIN/ray not found; run 'make setup' first" >&2
  exit 2
fi
export PATH="$VENV_BIN:$PATH"
ray get-auth-token --generate > /dev/null   # keeps an existing token; prints it, hence > /dev/null
export RAY_AUTH_MODE=token

args=("$@")
if [[ "${1:-}" =~ ^[0-9]+$ ]]; then args=("--port=$1" "${@:2}"); fi   # the old form: local.sh PORT
have() { for a in "${args[@]+"${args[@]}"}"; do case "$a" in "$1"|"$1"=*) return 0;; esac; done; return 1; }
have --port || args+=("--port=6379")
cores="$(python -c 'import os; print(len(os.sched_getaffinity(0)))')"   # nproc obeys OMP_NUM_THREADS
have --num-cpus || args+=("--num-cpus=$(( cores > 6 ? cores : 6 ))")
export RAY_worker_maximum_startup_concurrency="${RAY_worker_maximum_startup_concurrency:-$(( cores > 8 ? cores : 8 ))}"
exec ray start --head --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1 --disable-usage-stats "${args[@]}"
