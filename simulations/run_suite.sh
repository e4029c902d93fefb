#!/usr/bin/env bash
# Regenerate every result of the suite study, in order; a stage whose output exists is skipped
# (delete results/<file> to redo it). WORKERS=N parallel runs of one torch thread each (default 2).
#   1. simulations/sweep.py            lr x head-lr on the validation splits -> common/defaults.json
#   2. simulations/compare_scores.py   scores/allocations at equal entries (central) -> default selection,
#                                      and TaskEdge budgets vs LoRA ranks (central)
#   3. simulations/bench_federation.py the federated benchmark (+ budget vs rank, federated)
#   4. simulations/figures.py          PNGs + the README results table
#   5. simulations/edge_suite.py       the edge PEFT benchmark (ViT / ResNet / MobileNetV2; its own README table)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
W=${WORKERS:-2}
export HF_HUB_OFFLINE=1
mkdir -p results
$PY -c "from simulations.central import warm_cache; warm_cache()"
[ -s results/sweep.json ] || $PY -m simulations.sweep --workers "$W"
[ -s results/compare_scores.json ] || $PY -m simulations.compare_scores --workers "$W"
[ -s results/bench_federation.json ] || $PY -m simulations.bench_federation --workers "$W" --budget-sweep \
    --cache results/bench_runs.jsonl
[ -n "${SKIP_FIGURES:-}" ] || $PY -m simulations.figures
[ -s results/edge_suite.json ] || $PY -m simulations.edge_suite --workers "$W"
