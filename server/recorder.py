"""What a run records: per-round facts (`RoundLog`), closed once per round by `RunRecorder`.

The phases and the reply guard add to the open round (bytes, replies, drops and their reasons,
client metrics); `RunRecorder.end_round` closes it with the centralised evaluation, appends it
to the history and rewrites the run folder (output-dir/<timestamp>-<method>/): config.json,
results.json (config, every round, summary), rounds.csv, accuracy.png (accuracy vs round and vs
cumulative bytes) and checkpoint.safetensors; final_model.safetensors is written at the end.
"""
from __future__ import annotations

import csv
import json
import math
import os
import time
from logging import INFO, WARNING
from pathlib import Path

from flwr.supercore import log as flwr_log

from .checkpoint import Checkpoint, save_checkpoint

CSV_FIELDS = ["round", "central_acc", "central_loss", "fed_acc", "fed_loss", "train_loss", "train_acc",
              "replies", "dropped", "skipped", "bytes_up", "bytes_down", "bytes_up_per_client",
              "bytes_down_per_client", "eval_bytes_down", "eval_bytes_up", "query_bytes_up", "query_bytes_down",
              "cum_bytes", "trainable_entries", "mask_entries", "round_time_s", "wall_time_s",
              "dp_epsilon", "dp_delta", "secagg_active", "secagg_quant_bound"]  # privacy (server/privacy.py)


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


BYTES = ("bytes_up", "bytes_down", "eval_bytes_up", "eval_bytes_down", "query_bytes_up", "query_bytes_down")


class RoundLog:
    """The open round's facts; every dropped reply with its node, phase and reason."""

    def __init__(self):
        self.round = 0
        self.rec: dict = {}
        self.dropped: list[dict] = []

    def add(self, **counts) -> None:
        for k, v in counts.items():
            self.rec[k] = self.rec.get(k, 0) + v

    def set(self, **values) -> None:
        self.rec.update(values)

    def drop(self, node: int, reason: str) -> None:
        flwr_log(WARNING, "Round %d: dropped reply of node %d: %s", self.round, node, reason)
        self.dropped.append({"round": self.round, "node": node, "reason": reason})
        self.rec.setdefault("drop_reasons", []).append(f"node {node}: {reason}")

    @staticmethod
    def info(msg: str, *args) -> None:
        flwr_log(INFO, msg, *args)

    def close(self, rnd: int) -> dict:
        rec = {"round": rnd, "skipped": False, **self.rec}
        rec["dropped"] = len(rec.get("drop_reasons", []))
        self.rec, self.round = {}, rnd + 1
        return rec


class RunRecorder:
    """Closes each round: history, result files and checkpoint (rewritten every round)."""

    def __init__(self, run_dir: Path | None, config: dict, log: RoundLog):
        self.dir = Path(run_dir) if run_dir else None
        self.config, self.log = config, log
        self.rounds: list[dict] = []
        self.summary: dict = {}
        self._t0 = self._last = time.time()
        self._cum_bytes = 0
        if self.dir is not None:
            (self.dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))

    def end_round(self, rnd: int, central: dict | None, checkpoint: Checkpoint | None = None, **extra) -> dict:
        rec = {**self.log.close(rnd), **extra}
        if central:
            rec.update(central_acc=central["acc"], central_loss=central["loss"])
        self._cum_bytes += sum(rec.get(k) or 0 for k in BYTES)
        now = time.time()
        rec.update(cum_bytes=self._cum_bytes, round_time_s=now - self._last, wall_time_s=now - self._t0)
        self._last = now
        self.rounds = [r for r in self.rounds if r["round"] != rnd] + [rec]
        flwr_log(INFO, "Round %d: central acc %s | fed acc %s | up %s B/client | down %s B/client | dropped %d%s",
                 rnd, _fmt(rec.get("central_acc")), _fmt(rec.get("fed_acc")), _fmt(rec.get("bytes_up_per_client"), 0),
                 _fmt(rec.get("bytes_down_per_client"), 0), rec["dropped"], " | SKIPPED" if rec["skipped"] else "")
        if self.dir is not None:
            self.write()
            if checkpoint is not None:
                save_checkpoint(checkpoint, self.dir / "checkpoint.safetensors")
        return rec

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


def _fmt(v, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"
