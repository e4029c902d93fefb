"""Run folder outputs: per-round JSON + CSV, accuracy plots, written after every round.

Files (output-dir/<timestamp>-<method>/): config.json, results.json (config, every round,
summary), rounds.csv, accuracy.png (accuracy vs round and vs cumulative bytes),
checkpoint.safetensors and, at the end, final_model.safetensors.
"""
from __future__ import annotations

import csv
import json
import math
import os
import time
from pathlib import Path

CSV_FIELDS = ["round", "central_acc", "central_loss", "fed_acc", "fed_loss", "train_loss", "train_acc",
              "replies", "dropped", "skipped", "bytes_up", "bytes_down", "bytes_up_per_client",
              "bytes_down_per_client", "eval_bytes_down", "eval_bytes_up", "query_bytes_up", "query_bytes_down",
              "cum_bytes", "trainable_entries", "mask_entries", "round_time_s", "wall_time_s"]


def new_run_dir(output_dir: str | os.PathLike, method: str) -> Path:
    """output-dir/<YYYYmmdd-HHMMSS>-<method>, suffixed if it already exists."""
    base = Path(output_dir).expanduser().resolve() / f"{time.strftime('%Y%m%d-%H%M%S')}-{method}"
    path, i = base, 1
    while path.exists():
        path, i = base.with_name(f"{base.name}-{i}"), i + 1
    path.mkdir(parents=True)
    return path


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class RunRecorder:
    """Collects one dict per round and rewrites the result files each time (crash-safe enough)."""

    def __init__(self, run_dir: Path, config: dict):
        self.dir = Path(run_dir)
        self.config = config
        self.rounds: list[dict] = []
        self.summary: dict = {}
        (self.dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))

    def add(self, record: dict) -> None:
        self.rounds = [r for r in self.rounds if r["round"] != record["round"]] + [record]
        self.write()

    def write(self) -> None:
        doc = {"config": self.config, "rounds": [{k: _clean(v) for k, v in r.items()} for r in self.rounds],
               "summary": self.summary}
        tmp = self.dir / ".results.json.tmp"
        tmp.write_text(json.dumps(doc, indent=2))
        os.replace(tmp, self.dir / "results.json")
        with open(self.dir / "rounds.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
            w.writeheader()
            for r in self.rounds:
                w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS})
        plot_rounds(self.rounds, self.dir / "accuracy.png", title=f"{self.config.get('method', '')}")


def plot_rounds(rounds: list[dict], path: str | os.PathLike, title: str = "",
                series: dict[str, list[dict]] | None = None) -> Path | None:
    """Accuracy vs round and vs cumulative bytes; `series` plots several runs together."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = series or {title or "run": rounds}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for label, rs in series.items():
        pts = [r for r in rs if r.get("central_acc") is not None]
        if not pts:
            pts = [r for r in rs if r.get("fed_acc") is not None]
            key = "fed_acc"
        else:
            key = "central_acc"
        if not pts:
            continue
        ax1.plot([r["round"] for r in pts], [r[key] for r in pts], marker="o", label=label)
        sent = [r for r in pts if (r.get("cum_bytes") or 0) > 0]  # log axis: nothing sent yet = no point
        ax2.plot([r["cum_bytes"] for r in sent], [r[key] for r in sent], marker="o", label=label)
    ax1.set_xlabel("round")
    ax1.set_ylabel("accuracy (centralised test split)")
    ax2.set_xlabel("cumulative bytes (up + down, all clients)")
    ax2.set_xscale("log")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
