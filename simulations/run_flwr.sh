#!/usr/bin/env bash
# Run the Flower app with `flwr run . --stream` on a private, offline local SuperLink, then stop it.
#
#   simulations/run_flwr.sh                         # 5 simulated clients, defaults of pyproject.toml
#   simulations/run_flwr.sh -n 3 --run-config "num-server-rounds=2 method='fedlora'"
#
# Why a wrapper: `flwr run` starts a detached local SuperLink that keeps running, probes a fixed
# port (39091) and would silently reuse any SuperLink already listening there, installs the app's
# dependencies per run unless told not to, and phones home (telemetry, update check). Here every
# run gets its own FLWR_HOME and free ports, runs in the current venv, offline. Extra arguments go
# to `flwr run`.
#
# Fail fast: the configuration (pyproject + --run-config, and -n against min-nodes/min-replies) is
# checked by `python -m simulations.check_config` before any Flower process starts (exit code 2).
#
# Stop means stopped: `flwr run` runs in its own session, and every process of this run (the CLI,
# the SuperLink it detaches, SuperExec, flwr-simulation, Ray's gcs_server/raylet/workers/agents,
# which re-parent and change sessions) carries TASKEDGE_RUN_SCRATCH=<scratch dir> in its
# environment. At exit, and on SIGINT (Ctrl-C), SIGTERM or SIGHUP, all of them are found through
# /proc (that variable, the scratch path in the command line, the session, and their descendants),
# sent SIGTERM, then SIGKILL after a short grace; the scratch folder is removed. An interrupted
# run's folder (output-dir/<timestamp>-<method>) gets an INTERRUPTED file.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
N="${NUM_SUPERNODES:-5}"
ARGS=()  # everything but -n N goes to `flwr run`
while [[ $# -gt 0 ]]; do
  if [[ "$1" == "-n" ]]; then
    [[ $# -ge 2 ]] || { echo "[run_flwr] error: -n needs a number of simulated nodes, e.g. -n 5" >&2; exit 2; }
    N="$2"; shift 2
  else
    ARGS+=("$1"); shift
  fi
done
set -- "${ARGS[@]}"
[[ "$N" =~ ^[1-9][0-9]*$ ]] || { echo "[run_flwr] error: -n: number of simulated nodes must be an integer >= 1, got '$N'" >&2; exit 2; }

export PATH="${VENV_BIN:-$ROOT/.venv/bin}:$PATH"  # flwr spawns flower-superlink / flwr-simulation from PATH
RUN_CONFIG="output-dir='$ROOT/runs'"              # before "$@": a user's output-dir wins
GRACE_S="${RUN_FLWR_GRACE_S:-3}"                  # SIGTERM -> SIGKILL

# ---- 1. fail fast: nothing below starts if the configuration is wrong ---------------------------
OUT_DIR="$(python -m simulations.check_config -n "$N" --print output-dir --run-config "$RUN_CONFIG" "$@")" || exit $?
[[ "$OUT_DIR" == /* ]] || OUT_DIR="$ROOT/$OUT_DIR"

# ---- process bookkeeping --------------------------------------------------------------------------
SCRATCH="" FLWR_PID="" TAIL_PID="" SIGNAL="" CLEANED="" FAILED="" STOPPED=0 KILLED=0 LEFT=""
declare -A SEEN=()

say() { echo "[run_flwr] $*" >&2 2>/dev/null || true; }  # the terminal may be gone (SIGHUP)

# The live (non-zombie) processes among the given PIDs and all their descendants, this shell excluded.
live_tree() {
  ps -e -o pid= -o ppid= -o stat= | awk -v seeds="$*" -v self="$$" -v tail="${TAIL_PID:-0}" '
    BEGIN { n = split(seeds, s, " "); for (i = 1; i <= n; i++) keep[s[i]] = 1 }
    { ppid[$1] = $2; stat[$1] = $3 }
    END {
      do { grown = 0; for (p in ppid) if (!(p in keep) && (ppid[p] in keep)) { keep[p] = 1; grown = 1 } } while (grown)
      for (p in keep) if ((p in stat) && stat[p] !~ /^Z/ && p != self && p != tail) print p
    }'
}

# Every live process of this run: Flower and Ray processes inherit TASKEDGE_RUN_SCRATCH; Ray's also
# name the scratch path on their command line; plus the session of `flwr run`, and descendants.
run_pids() {
  local sid="" seeds
  [[ -s "$SCRATCH/flwr.sid" ]] && sid="$(<"$SCRATCH/flwr.sid")"
  seeds="$({
    grep -lsxzF -- "TASKEDGE_RUN_SCRATCH=$SCRATCH" /proc/[0-9]*/environ | cut -d/ -f3
    pgrep -f -- "$SCRATCH"
    [[ -n "$sid" ]] && pgrep -s "$sid"
    echo "$FLWR_PID" "${!SEEN[@]}"
  } 2>/dev/null | tr '\n' ' ')"
  live_tree $seeds
}

# Remember what each new PID is (for the summary line); sets NEW to those new PIDs still alive.
NEW=""
note() {
  local pid args list
  NEW=""
  list="$(for pid in "$@"; do [[ -n "${SEEN[$pid]:-}" ]] || echo "$pid"; done | paste -sd, -)"
  [[ -z "$list" ]] && return
  while read -r pid args; do
    case "$args" in
      *flower-superlink*) SEEN[$pid]="SuperLink" ;;
      *flower-superexec*) SEEN[$pid]="SuperExec" ;;
      *flwr-simulation*) SEEN[$pid]="flwr-simulation" ;;
      *"flwr run"*) SEEN[$pid]="flwr run" ;;
      *ray*|*gcs_server*) SEEN[$pid]="Ray" ;;
      *) args="${args%% *}"; SEEN[$pid]="${args##*/}" ;;
    esac
    NEW+="$pid "
  done < <(ps -o pid=,args= -p "$list" 2>/dev/null)
}

# "4 Ray, SuperExec, SuperLink, flwr run, flwr-simulation" from SEEN
summary() {
  local k
  for k in "${SEEN[@]}"; do echo "$k"; done | sort | uniq -c | sort -k1,1nr -k2 \
    | awk '{ c = $1; $1 = ""; sub(/^ /, ""); out = out (out ? ", " : "") (c > 1 ? c " " : "") $0 } END { print out }'
}

# SIGTERM everything, SIGKILL what is left after GRACE_S; sets STOPPED, KILLED (counts), LEFT (still alive).
stop_run() {
  local pids p i sid="" deadline
  [[ -s "$SCRATCH/flwr.sid" ]] && sid="$(<"$SCRATCH/flwr.sid")"
  deadline=$(( ${EPOCHREALTIME/./} + GRACE_S * 1000000 ))  # microseconds
  note $(run_pids)
  [[ -n "$sid" ]] && kill -TERM -- "-$sid" 2>/dev/null  # the process group of `flwr run`
  while :; do
    for p in $NEW; do kill -TERM "$p" 2>/dev/null; done  # each process once; new ones as they appear
    (( ${EPOCHREALTIME/./} < deadline )) || break
    sleep 0.2
    pids="$(run_pids)"
    [[ -z "$pids" ]] && break
    note $pids
  done
  local -A killed=()
  for ((i = 0; i < 10; i++)); do
    pids="$(run_pids)"
    [[ -z "$pids" ]] && break
    note $pids
    [[ -n "${RUN_FLWR_DEBUG:-}" ]] && ps -o pid=,args= -p "${pids//$'\n'/,}" | cut -c1-120 | sed 's/^/[run_flwr] SIGKILL /' >&2
    for p in $pids; do killed[$p]=1; kill -KILL "$p" 2>/dev/null; done
    sleep 0.2
  done
  KILLED=${#killed[@]}
  STOPPED=${#SEEN[@]}
  LEFT="$(run_pids | tr '\n' ' ')"
}

# The run folder this run created (the newest new folder under output-dir), or nothing.
new_run_dir() {
  [[ -d "$OUT_DIR" ]] || return 0
  ls -1 "$OUT_DIR" | grep -vxF -f "$SCRATCH/runs-before" | sort | tail -1 | sed "s|^|$OUT_DIR/|"
}

cleanup() {
  [[ -n "$CLEANED" || -z "$SCRATCH" ]] && return
  CLEANED=1
  trap '' INT TERM HUP  # a few seconds at most; do not leave it half-way
  local rundir n
  [[ -n "$TAIL_PID" ]] && kill "$TAIL_PID" 2>/dev/null
  stop_run
  rundir="$(new_run_dir 2>/dev/null)"
  n="$STOPPED process$( ((STOPPED == 1)) || echo es)"
  if [[ -n "$SIGNAL" ]]; then
    say "interrupted (SIG$SIGNAL): stopped $n$( ((STOPPED)) && echo " ($(summary))")$( ((KILLED)) && echo "; $KILLED needed SIGKILL")"
    if [[ -n "$rundir" && -d "$rundir" ]]; then
      printf 'interrupted by SIG%s at %s; stopped %d processes\n' "$SIGNAL" "$(date -Iseconds)" "$STOPPED" > "$rundir/INTERRUPTED"
      [[ -f "$rundir/results.json" ]] && python -c 'import json, os, sys
p = sys.argv[1]; d = json.load(open(p)); d["status"] = "interrupted by SIG" + sys.argv[2]
open(p + ".tmp", "w").write(json.dumps(d, indent=2)); os.replace(p + ".tmp", p)' "$rundir/results.json" "$SIGNAL" 2>/dev/null
      say "run folder marked interrupted: $rundir/INTERRUPTED"
    fi
  elif [[ "$STOPPED" -gt 0 ]]; then
    say "stopped $n left by the run ($(summary))"
  fi
  if [[ -n "$FAILED" && -f "${FLWR_HOME:-}/local-superlink/superlink.log" ]]; then
    if [[ -n "$rundir" && -d "$rundir" ]]; then
      cp "$FLWR_HOME/local-superlink/superlink.log" "$rundir/" && say "SuperLink log kept: $rundir/superlink.log"
    else
      say "last lines of the SuperLink log:"; tail -n 15 "$FLWR_HOME/local-superlink/superlink.log" >&2 2>/dev/null
    fi
  fi
  if [[ -n "$LEFT" ]]; then
    say "WARNING: could not stop these processes: $LEFT(scratch folder kept: $SCRATCH)"
  else
    rm -rf "$SCRATCH"
  fi
}

on_signal() {  # $1 = INT | TERM | HUP
  SIGNAL="$1"
  say "SIG$1 received: stopping the run..."
  exit $((128 + $(kill -l "$1")))  # -> on_exit
}

on_exit() {
  local rc=$?
  cleanup
  if [[ -n "$SIGNAL" ]]; then  # die of the signal, as callers (make, shells, loops) expect
    trap - "$SIGNAL" EXIT
    kill -s "$SIGNAL" $$
  fi
  exit "$rc"
}
trap on_exit EXIT
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM
trap 'on_signal HUP' HUP

# ---- 2. private scratch: FLWR_HOME, Ray's temp dir, ports ---------------------------------------
SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/taskedge-flwr.XXXXXX")" || exit 1
export FLWR_HOME="${FLWR_HOME:-$SCRATCH/flwr-home}"
export RAY_TMPDIR="${RAY_TMPDIR:-$SCRATCH/ray}"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0
# The app runs from Flower's installed bundle (FAB), which carries no .safetensors: point it at the
# checkout's shipped backbone so a first run does not pre-train it (common/backbones.py shipped_weights).
export TASKEDGE_WEIGHTS_DIR="${TASKEDGE_WEIGHTS_DIR:-$ROOT/common/weights}"
# Ray: Flower already starts it without the dashboard (include_dashboard=False); this makes Ray pick
# 127.0.0.1 as the node address instead of the machine's outward IP (ray._private.services).
# RAY_ADDRESS set (e.g. RAY_ADDRESS=10.0.0.5:6379 or auto): Ray's own variable, read by the `ray.init` that
# Flower's simulation calls: the run attaches to that running Ray cluster (docs/deployment.md, "A Ray
# cluster") instead of starting a private Ray; then the node address is left to Ray (it must match the
# address of this machine's raylet) and the CPUs are the cluster's (`ray start --num-cpus` on each node).
INIT_ARGS="init-args-num-cpus=$(nproc)"
if [[ -n "${RAY_ADDRESS:-}" ]]; then
  INIT_ARGS=""  # ray.init refuses num_cpus when it attaches to a cluster
else
  export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="${RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER:-0}"
fi
mkdir -p "$FLWR_HOME" "$RAY_TMPDIR"
ls -1 "$OUT_DIR" > "$SCRATCH/runs-before" 2>/dev/null

free_port() { python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
export FLWR_LOCAL_SUPERLINK_HTTP_API_PORT="${FLWR_LOCAL_SUPERLINK_HTTP_API_PORT:-$(free_port)}"
export FLWR_LOCAL_CONTROL_API_PORT="${FLWR_LOCAL_CONTROL_API_PORT:-$(free_port)}"

# ---- 3. the run -----------------------------------------------------------------------------------
say "FLWR_HOME=$FLWR_HOME port=$FLWR_LOCAL_SUPERLINK_HTTP_API_PORT supernodes=$N${RAY_ADDRESS:+ ray-cluster=$RAY_ADDRESS}"
LOG="$SCRATCH/flwr-run.log"
: > "$LOG"
# Own session (Ctrl-C reaches this script, not Flower half-way), a marker every child inherits, and
# the session id written down for the cleanup.
TASKEDGE_RUN_SCRATCH="$SCRATCH" setsid -w bash -c 'echo $$ > "$0"; exec "$@"' "$SCRATCH/flwr.sid" \
  flwr run . --stream \
  --federation-config "num-supernodes=$N client-resources-num-cpus=1${INIT_ARGS:+ $INIT_ARGS}" \
  --run-config "$RUN_CONFIG" "$@" > "$LOG" 2>&1 < /dev/null &
FLWR_PID=$!
tail -n +1 -s 0.2 -f --pid="$FLWR_PID" "$LOG" &
TAIL_PID=$!
wait "$FLWR_PID"
RC=$?
wait "$TAIL_PID" 2>/dev/null
TAIL_PID=""

# `flwr run --stream` exits 0 even when the run fails; the streamed log carries Flower's exit code.
if [[ $RC -ne 0 ]] || grep -q "Exit Code: [1-9]" "$LOG"; then
  FAILED=1
  say "the run failed (see above)"
  exit 1
fi
exit 0
