"""Tuned defaults shared by the centralised and federated paths, read from `common/defaults.json`.

`benchmarks/sweep.py` writes that file: every method's `lr` (sparse values, adapters or full
weights) and `head_lr` (the dense classifier head), each the best mean validation accuracy over
the offline suite in one small grid, and the selection (score, allocation) that won the
equal-budget comparison of `benchmarks/compare_scores.py`. Methods missing from the file keep
the built-in fallbacks below.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

DEFAULTS_FILE = Path(__file__).resolve().with_name("defaults.json")

FALLBACK_LR = {"taskedge": 0.05, "fedlora": 0.003, "fedavg-full": 0.001, "taskedge-lora": 0.02, "head-only": 0.01}
FALLBACK_HEAD_LR = {"taskedge": 0.01, "fedlora": 0.01, "fedavg-full": 0.001, "taskedge-lora": 0.01, "head-only": 0.01}
FALLBACK_SELECTION = {"score": "taskedge", "allocation": "neuron", "budget": 0.02}


@lru_cache(maxsize=1)
def load() -> dict:
    """The parsed defaults file ({} when it is missing)."""
    if not DEFAULTS_FILE.is_file():
        return {}
    return json.loads(DEFAULTS_FILE.read_text())


def method_lr() -> dict[str, float]:
    tuned = {m: float(v["lr"]) for m, v in load().get("methods", {}).items() if "lr" in v}
    return {**FALLBACK_LR, **tuned}


def method_head_lr() -> dict[str, float]:
    tuned = {m: float(v["head_lr"]) for m, v in load().get("methods", {}).items() if "head_lr" in v}
    return {**FALLBACK_HEAD_LR, **tuned}


def selection() -> dict:
    return {**FALLBACK_SELECTION, **load().get("selection", {})}


# the paper's setting (TaskEdge, Sec. 4: |W|·‖X‖ with neuron-level allocation at a fixed fraction of the backbone);
# run config preset="paper" puts it back in place of the validated default selection
PAPER_SELECTION = {"score": "taskedge", "allocation": "neuron", "budget": 0.02, "budget-per-neuron": 0.0}


def paper_selection() -> dict:
    """The paper preset's run-config values; its lr is the one the selection sweep started from, if recorded."""
    lr = load().get("selection", {}).get("paper_lr")
    return {**PAPER_SELECTION, **({"lr": float(lr)} if lr else {})}
