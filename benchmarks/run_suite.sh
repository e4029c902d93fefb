#!/usr/bin/env bash
# Regenerate every result of the suite study, in order; a stage whose output exists is skipped
# (delete results/<file> to redo it). WORKERS=N parallel runs of one torch thread each (default 2).
#   1. benchmarks/sweep.py            lr x head-lr on the validation splits -> common/defaults.json
#   2. benchmarks/compare_scores.py   scores/allocations at equal entries (central) -> default selection,
#                                      and TaskEdge budgets vs LoRA ranks (central)
#   3. benchmarks/bench_federation.py the federated benchmark (+ budget vs rank, federated)
#   4. benchmarks/figures.py          PNGs + the README results table
#   5. benchmarks/edge_suite.py       the edge PEFT benchmark (ViT / ResNet / MobileNetV2; its own README table)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
W=${WORKERS:-2}
export HF_HUB_OFFLINE=1
mkdir -p results
$PY -c "from benchmarks.central import warm_cache; warm_cache()"
[ -s results/sweep.json ] || $PY -m benchmarks.sweep --workers "$W"
[ -s results/compare_scores.json ] || $PY -m benchmarks.compare_scores --workers "$W"
[ -s results/bench_federation.json ] || $PY -m benchmarks.bench_federation --workers "$W" --budget-sweep \
    --cache results/bench_runs.jsonl
[ -n "${SKIP_FIGURES:-}" ] || $PY -m benchmarks.figures
[ -s results/edge_suite.json ] || $PY -m benchmarks.edge_suite --workers "$W"
