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
              "stats_bytes_up", "grad_bytes_up",  # of query_bytes_up: the statistics query, its gradient sums
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
        # "running" while rounds are written, then "complete" or "stopped: <why>" (server/runner.py);
        # simulations/run_flwr.sh sets "interrupted" when a signal stops the run
        self.status = "running"
        self._t0 = self._last = time.time()
        self._cum_bytes = 0
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
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
        if "sent" not in rec:  # before training (or a segment's start): the query phases' traffic only
            flwr_log(INFO, "Round %d (before training): acc %s (loss %s) | statistics + mask phases: %s B", rnd,
                     _fmt(rec.get("central_acc"), 3), _fmt(rec.get("central_loss"), 3),
                     f"{(rec.get('query_bytes_up') or 0) + (rec.get('query_bytes_down') or 0):,}")
        else:
            flwr_log(INFO, "Round %d: acc %s (loss %s) | fed acc %s | %s replies | up %s B, down %s B per client | "
                     "%.1f s%s%s", rnd, _fmt(rec.get("central_acc"), 3), _fmt(rec.get("central_loss"), 3),
                     _fmt(rec.get("fed_acc"), 3), rec.get("replies", "-"), _fmt(rec.get("bytes_up_per_client"), 0, ","),
                     _fmt(rec.get("bytes_down_per_client"), 0, ","), rec["round_time_s"],
                     f" | dropped {rec['dropped']}" if rec["dropped"] else "", " | SKIPPED" if rec["skipped"] else "")
        if self.dir is not None:
            self.write()
            if checkpoint is not None:
                save_checkpoint(checkpoint, self.dir / "checkpoint.safetensors")
        return rec

    def write(self) -> None:
        doc = {"status": self.status, "config": self.config,
               "rounds": [{k: _clean(v) for k, v in r.items()} for r in self.rounds], "summary": self.summary}
        tmp = self.dir / ".results.json.tmp"
        tmp.write_text(json.dumps(doc, indent=2))
        os.replace(tmp, self.dir / "results.json")
        with open(self.dir / "rounds.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
            w.writeheader()
            for r in self.rounds:
                w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS})
        c = self.config
        plot_rounds(self.rounds, self.dir / "accuracy.png",
                    title=f"{c.get('method')} on {c.get('task')} ({c.get('model')}): accuracy per round and per byte, "
                          f"{c.get('partitioner')} partitions" + (f" (α={c.get('alpha')})" if c.get("partitioner") == "dirichlet" else ""))


def plot_rounds(rounds: list[dict], path: str | os.PathLike, title: str = "",
                series: dict[str, list[dict]] | None = None) -> Path | None:
    """Accuracy vs round and vs cumulative bytes; `series` plots several runs together.

    Round 0 is the model before training; its bytes are those of the statistics and mask phases."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter, MaxNLocator, NullFormatter

    series = series or {"run": rounds}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    ylabel = "accuracy (centralised test split)"
    for label, rs in series.items():
        key = "central_acc" if any(r.get("central_acc") is not None for r in rs) else "fed_acc"
        pts = [r for r in rs if r.get(key) is not None]
        if not pts:
            continue
        ylabel = ylabel if key == "central_acc" else "accuracy (clients' local test splits)"
        ax1.plot([r["round"] for r in pts], [r[key] for r in pts], marker="o", label=label)
        sent = [r for r in pts if (r.get("cum_bytes") or 0) > 0]  # log axis: nothing sent yet = no point
        ax2.plot([r["cum_bytes"] for r in sent], [r[key] for r in sent], marker="o", label=label)
    ax1.set_xlabel("round (0 = before training)")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.set_ylabel(ylabel)
    ax2.set_xlabel("cumulative bytes, up + down, all clients\n(first point: round 0, the statistics + mask phases)")
    lo, hi = ax2.get_xlim()
    if lo > 0 and hi / lo > 100:  # log only when the traffic spans orders of magnitude
        ax2.set_xscale("log")
        ax2.xaxis.set_minor_formatter(NullFormatter())
    ax2.xaxis.set_major_formatter(EngFormatter(unit="B"))
    ax2.xaxis.set_major_locator(MaxNLocator(5))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def _fmt(v, digits: int = 4, sep: str = "") -> str:
    return "-" if v is None else f"{v:{sep}.{digits}f}"
