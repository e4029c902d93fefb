#!/usr/bin/env bash
# Run the Flower app with `flwr run . --stream` on a private, offline local SuperLink, then stop it.
#
#   simulations/run_flwr.sh                         # 5 simulated clients, defaults of pyproject.toml
#   simulations/run_flwr.sh -n 3 --run-config "num-server-rounds=2 method='fedlora'"
#
# Why a wrapper: `flwr run` starts a detached local SuperLink that keeps running, probes a fixed
# port (39091) and would silently reuse any SuperLink already listening there, installs the app's
# dependencies per run unless told not to, and phones home (telemetry, update check). Here every
# run gets its own FLWR_HOME and free ports, runs in the current venv, offline, and the SuperLink
# it started is stopped by PID at exit. Extra arguments go to `flwr run`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
N="${NUM_SUPERNODES:-5}"
if [[ "${1:-}" == "-n" ]]; then N="$2"; shift 2; fi

export PATH="${VENV_BIN:-$ROOT/.venv/bin}:$PATH"  # flwr spawns flower-superlink / flwr-simulation from PATH
SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/taskedge-flwr.XXXXXX")"
export FLWR_HOME="${FLWR_HOME:-$SCRATCH/flwr-home}"
export RAY_TMPDIR="${RAY_TMPDIR:-$SCRATCH/ray}"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0
mkdir -p "$FLWR_HOME" "$RAY_TMPDIR"

free_port() { python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
export FLWR_LOCAL_SUPERLINK_HTTP_API_PORT="${FLWR_LOCAL_SUPERLINK_HTTP_API_PORT:-$(free_port)}"
export FLWR_LOCAL_CONTROL_API_PORT="${FLWR_LOCAL_CONTROL_API_PORT:-$(free_port)}"

stop_superlink() {
  # the SuperLink this script's `flwr run` started: the process listening on our private port
  local pid
  pid="$(ss -ltnpH "sport = :$FLWR_LOCAL_SUPERLINK_HTTP_API_PORT" 2>/dev/null | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2 || true)"
  if [[ -n "$pid" ]]; then
    kill "$pid" 2>/dev/null || true
    echo "[run_flwr] stopped local SuperLink (pid $pid); logs: $FLWR_HOME/local-superlink/superlink.log"
  fi
}
trap stop_superlink EXIT

echo "[run_flwr] FLWR_HOME=$FLWR_HOME port=$FLWR_LOCAL_SUPERLINK_HTTP_API_PORT supernodes=$N"
flwr run . --stream \
  --federation-config "num-supernodes=$N client-resources-num-cpus=1 init-args-num-cpus=$(nproc)" \
  --run-config "output-dir='$ROOT/runs'" "$@" 2>&1 | tee "$SCRATCH/flwr-run.log"
# `flwr run --stream` exits 0 even when the run fails; the streamed log carries Flower's exit code.
if grep -q "Exit Code: [1-9]" "$SCRATCH/flwr-run.log"; then
  echo "[run_flwr] the run failed (see above)" >&2
  exit 1
fi
