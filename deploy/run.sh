#!/usr/bin/env bash
# Submit the app to a SuperLink, stream its log, and exit with the run's real outcome.
#
#   deploy/run.sh CONNECTION [flwr run options ...]
#   deploy/run.sh edge --run-config "min-nodes=2 num-server-rounds=10"
#
# `flwr run . CONNECTION --stream` (flwr 1.42) exits 0 even when the ServerApp fails (and `flwr ls
# --format json` exits 0 on its own errors). This wrapper reads the run id from the stream, asks the
# SuperLink for the final status (`flwr ls --run-id ID --format json`) and exits
#   0  the run finished:completed
#   1  it finished any other way (failed, stopped) or its status could not be read
#   2  usage error / the run was not even submitted
# The last line it prints is `[run.sh] run <id>: <status>`.
#
# CONNECTION is a [superlink.<name>] entry of $FLWR_HOME/config.toml (default ~/.flwr/config.toml):
#   [superlink.edge]
#   address = "127.0.0.1:8000"                  # on the server, or through ssh -N -L 8000:127.0.0.1:8000
#   root-certificates = "/abs/path/ca.crt"      # or: insecure = true (flwr run has no --insecure)
# Run it from the app folder (the repository root), or set APP_DIR.
set -uo pipefail

[[ $# -ge 1 && "$1" != -* ]] || { sed -n '2,20p' "$0" >&2; exit 2; }
CONN="$1"; shift
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
APP_DIR="${APP_DIR:-$ROOT}"
FLWR="${FLWR:-$(command -v flwr || echo "$ROOT/.venv/bin/flwr")}"
export FLWR_TELEMETRY_ENABLED="${FLWR_TELEMETRY_ENABLED:-0}" FLWR_DISABLE_UPDATE_CHECK="${FLWR_DISABLE_UPDATE_CHECK:-1}"
POLL_S="${RUN_STATUS_TIMEOUT_S:-60}"  # how long to wait for a status that is not final yet

LOG="$(mktemp "${TMPDIR:-/tmp}/taskedge-run.XXXXXX")"
trap 'rm -f "$LOG"' EXIT

(cd "$APP_DIR" && "$FLWR" run . "$CONN" --stream "$@") 2>&1 | tee "$LOG"
RC=${PIPESTATUS[0]}
RUN_ID="$(grep -oE 'Successfully started run [0-9]+' "$LOG" | grep -oE '[0-9]+$' | tail -1)"
if [[ -z "$RUN_ID" ]]; then
  echo "[run.sh] the run was not submitted (flwr run exited $RC)" >&2
  exit 2
fi

status() {
  "$FLWR" ls "$CONN" --run-id "$RUN_ID" --format json 2>/dev/null |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["runs"][0]["status"])' 2>/dev/null
}
STATUS="$(status)"
for ((i = 0; i < POLL_S; i++)); do  # the stream can end a moment before the status is final
  [[ "$STATUS" == finished:* ]] && break
  sleep 1
  STATUS="$(status)"
done
echo "[run.sh] run $RUN_ID: ${STATUS:-status unknown (SuperLink unreachable?)}"
[[ "$STATUS" == "finished:completed" ]] && exit 0
echo "[run.sh] the run did not complete; see its log: flwr log $RUN_ID $CONN --show" >&2
exit 1
