"""TaskEdge federation strategy on Flower's Message API (`flwr.serverapp.strategy.Strategy`).

One class runs all three methods (taskedge, fedavg-full, fedlora); only taskedge has a mask.
Per round: optional re-reconciliation -> sample nodes -> per-node train messages (the client
setup and the mask indices only to nodes that lack the current mask version, values every
round, the nested sub-mask's values for small-budget nodes) -> validate replies, masked weighted mean, server optimizer ->
federated evaluation -> centralised evaluation, round record, checkpoint (`evaluate_fn`).
Bytes are counted from the records actually sent and received. Federated evaluation of a
small-budget node uses its own sub-model (what that device can run); the centralised
evaluation always uses the full global model.
"""
from __future__ import annotations

import random
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from client.data import server_test_split
from client.methods import PACKED, base_model, build, export, get_arrays, num_entries, set_arrays
from client.settings import AppConfig
from client.task import local_eval, mask_to_wire, taskedge_config
from common.allocation import Mask
from common.data import get_task
from common.stats import FeatureStats
from common.tuner import target_modules

from . import validate
from .aggregate import Update, make_server_optimizer, masked_mean
from .checkpoint import Checkpoint, export_model, load_checkpoint, save_checkpoint
from .reconcile import carry_values, packed_positions, stats_mask, vote_mask
from .results import RunRecorder
from .wire import array_record, by_source, content_bytes, message_bytes, wait_for_nodes


@dataclass
class View:
    """What one node trains: the full mask, or a nested sub-mask (smaller budget rank)."""

    rank: int
    mask: Mask | None
    positions: np.ndarray | None  # into the packed global values; None = all
    specs: dict[str, tuple[tuple[int, ...], str]]
    entries: int


class TaskEdgeStrategy(Strategy):
    """Masked federated fine-tuning with exact (stats) or vote reconciliation."""

    def __init__(self, cfg: AppConfig, run_dir: str | Path | None = None):
        self.cfg, self.method = cfg, cfg.method
        self.tcfg = taskedge_config(cfg.to_dict())
        self.num_classes = get_task(cfg.task).num_classes
        self.rng = random.Random(cfg.seed)
        self.opt = make_server_optimizer(cfg.server_opt, cfg.server_lr, cfg.server_momentum)
        self.mask: Mask | None = None
        self.mask_version = 0
        self.model = None
        self.global_arrays: OrderedDict[str, np.ndarray] = OrderedDict()
        self.node_rank: dict[int, int] = {}
        self.node_mask: dict[int, int] = {}
        self.round_offset = 0
        self.run_dir = Path(run_dir) if run_dir else None
        self.recorder = RunRecorder(self.run_dir, cfg.to_dict()) if self.run_dir else None
        self.history: list[dict] = []
        self.dropped: list[dict] = []
        self._views: dict[int, View] = {}
        self._sent: dict[int, tuple[View, bool]] = {}
        self._rec: dict = {}
        self._query_bytes = [0, 0]
        self._t0 = time.time()
        self._cum_bytes = 0
        self._round = 0

    # ------------------------------------------------------------------ setup / reconciliation
    def _base(self):
        return base_model(self.cfg.model, self.num_classes, self.cfg.weights_path, self.cfg.seed)

    def initialize(self, grid: Grid) -> ArrayRecord:
        """Initial global arrays: reconcile (taskedge) or the baseline's initial state; or resume."""
        ck = load_checkpoint(self.cfg.resume) if self.cfg.resume else None
        if ck is not None and ck.method != self.method:
            raise ValueError(f"run config 'resume': checkpoint is for method {ck.method!r}, not {self.method!r}")
        if self.method == "taskedge":
            if ck is None:
                self.reconcile(grid)
            else:  # keep the checkpoint's mask; the query only refreshes the nodes' budget ranks
                self._query(grid)
                self._install(ck.mask, ck.arrays)
                self.mask_version = ck.mask_version
        else:
            self.model = build(self.method, self._base(), self.tcfg, None, self.cfg.lora_rank, self.cfg.seed)
            self.global_arrays = get_arrays(self.method, self.model)
            if ck is not None:
                set_arrays(self.method, self.model, ck.arrays)
                self.global_arrays = get_arrays(self.method, self.model)
        if ck is not None:
            self.round_offset = ck.round
            self.opt.load_state(ck.opt_state)
            log(INFO, "Resumed from %s at round %d", self.cfg.resume, ck.round)
        return array_record(self.global_arrays)

    def _stats_specs(self):
        specs = {}
        for name, mod in target_modules(self._base(), self.tcfg).items():
            specs[f"{name}.ss"] = (tuple(FeatureStats(mod).ss.shape), "float64")
            specs[f"{name}.n"] = ((1,), "int64")
        return specs

    def _query(self, grid: Grid) -> tuple[list, list]:
        """Statistics round over every connected node; learns each node's budget rank."""
        nodes = wait_for_nodes(grid, self.cfg.min_nodes, self.cfg.round_timeout)
        content = RecordDict({"config": ConfigRecord(self._config(0)), "setup": ConfigRecord(self.cfg.client_config())})
        msgs = [Message(content, dst_node_id=n, message_type="query.stats", group_id="stats") for n in nodes]
        self._query_bytes[1] += sum(content_bytes(m.content) for m in msgs)
        specs = self._stats_specs()
        vote_specs = None
        if self.cfg.reconcile == "vote":
            vote_specs = {f"{n}.idx": int(m.weight.numel()) for n, m in target_modules(self._base(), self.tcfg).items()}
        stats, votes = [], []
        replies = by_source(grid.send_and_receive(msgs, timeout=self.cfg.round_timeout))
        for nid in nodes:
            msg = replies.get(nid)
            if msg is None:
                self._drop(self._round, nid, "statistics: no reply before the timeout")
                continue
            self._query_bytes[0] += message_bytes(msg)
            try:
                st, vt, info = validate.stats_reply(msg, specs, vote_specs)
            except validate.BadReply as exc:
                self._drop(self._round, nid, f"statistics: {exc}")
                continue
            stats.append(st)
            votes.append(vt)
            self.node_rank[nid] = info["budget-rank"]
        log(INFO, "Statistics round: %d/%d valid replies", len(stats), len(nodes))
        return stats, votes

    def reconcile(self, grid: Grid) -> None:
        """(Re)build the global mask from fresh statistics; surviving entries keep their values."""
        stats, votes = self._query(grid)
        if len(stats) < self.cfg.min_replies:
            if self.mask is None:
                why = "; ".join(d["reason"] for d in self.dropped[-3:])
                raise RuntimeError(f"statistics round: {len(stats)} valid replies, min-replies="
                                   f"{self.cfg.min_replies}" + (f" (e.g. {why})" if why else ""))
            log(WARNING, "Re-reconciliation skipped: only %d valid statistics replies", len(stats))
            return
        base = self._base()
        mask = stats_mask(base, self.tcfg, stats) if self.cfg.reconcile == "stats" else vote_mask(base, self.tcfg, stats, votes)
        carried = None
        if self.mask is not None:
            carried = OrderedDict(self.global_arrays)
            carried[PACKED] = carry_values(self.mask, self.global_arrays[PACKED], mask)
            kept = int(np.count_nonzero(carried[PACKED]))
            log(INFO, "Re-reconciled mask v%d: %d entries, %d carried values", self.mask_version + 1, mask.num_entries, kept)
        self._install(mask, carried)
        self.mask_version += 1

    def _install(self, mask: Mask, arrays: dict | None) -> None:
        self.model = build("taskedge", self._base(), self.tcfg, mask)
        if arrays is not None:
            set_arrays("taskedge", self.model, arrays)
        self.mask = mask
        self.global_arrays = get_arrays("taskedge", self.model)
        self._views = {}
        self.opt.reset()

    # ------------------------------------------------------------------ per-node payloads
    def _view(self, nid: int) -> View:
        rank = self.node_rank.get(nid, 0) if self.method == "taskedge" else 0
        if self.mask is not None and rank > 0:
            top = max((int(r.max()) + 1 for r in self.mask.ranks.values() if r.numel()), default=0)
            rank = 0 if rank >= top else rank
        if rank not in self._views:
            specs = {k: (tuple(v.shape), "float32") for k, v in self.global_arrays.items()}
            sub, pos = self.mask, None
            if rank > 0:
                sub = self.mask.subset(rank)
                pos = packed_positions(self.mask, sub)
                specs[PACKED] = ((len(pos),), "float32")
            entries = sum(int(np.prod(s)) for s, _ in specs.values())
            self._views[rank] = View(rank, sub, pos, specs, entries)
        return self._views[rank]

    def _config(self, server_round: int) -> dict:
        return {"server-round": server_round, "mask-version": self.mask_version}

    def _messages(self, nodes: list[int], server_round: int, mtype: str) -> list[Message]:
        conf = ConfigRecord(self._config(server_round))
        setup = ConfigRecord(self.cfg.client_config())
        cache: dict[int, ArrayRecord] = {}
        msgs = []
        self._sent = {}
        for nid in nodes:
            view = self._view(nid)
            if view.rank not in cache:
                arrays = dict(self.global_arrays)
                if view.positions is not None:
                    arrays[PACKED] = self.global_arrays[PACKED][view.positions]
                cache[view.rank] = array_record(arrays)
            content = RecordDict({"arrays": cache[view.rank], "config": conf})
            include = self.node_mask.get(nid) != self.mask_version  # first contact / new mask / lost state
            if include:
                content["setup"] = setup
                if self.method == "taskedge":
                    content["mask"] = array_record(mask_to_wire(view.mask))
            self._sent[nid] = (view, include)
            msgs.append(Message(content, dst_node_id=nid, message_type=mtype, group_id=str(server_round)))
        return msgs

    def _sample(self, grid: Grid, fraction: float) -> list[int]:
        nodes = wait_for_nodes(grid, self.cfg.min_nodes, self.cfg.round_timeout)
        k = max(1, int(round(len(nodes) * fraction)))
        return nodes if k >= len(nodes) else sorted(self.rng.sample(nodes, k))

    def _drop(self, rnd: int, nid: int, reason: str) -> None:
        log(WARNING, "Round %d: dropped reply of node %d: %s", rnd, nid, reason)
        self.dropped.append({"round": rnd, "node": nid, "reason": reason})
        self._rec.setdefault("drop_reasons", []).append(f"node {nid}: {reason}")

    def _mask_delivered(self, nid: int, msg: Message | None, included: bool) -> None:
        """Track which nodes hold the current setup + mask (sent once; resent after an error)."""
        if msg is None or msg.has_error():
            self.node_mask.pop(nid, None)  # it may have lost its state: resend next time
        elif included:
            self.node_mask[nid] = self.mask_version

    # ------------------------------------------------------------------ Strategy interface
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        rnd = self._round = self.round_offset + server_round
        self._rec = {"round": rnd, "t_start": time.time(), "skipped": False, "dropped": 0}
        if (self.method == "taskedge" and self.cfg.reconcile_every > 0 and rnd > 1
                and (rnd - 1) % self.cfg.reconcile_every == 0):
            self.reconcile(grid)
        nodes = self._sample(grid, self.cfg.fraction_train)
        msgs = self._messages(nodes, rnd, MessageType.TRAIN)
        down = [content_bytes(m.content) for m in msgs]
        self._rec.update(sent=len(msgs), bytes_down=sum(down), bytes_down_per_client=float(np.mean(down)),
                         bound_bytes_per_client=float(np.mean([4 * self._sent[n][0].entries for n in nodes])),
                         mask_sent_to=sum(inc for _, inc in self._sent.values()))
        log(INFO, "Round %d: training on %d nodes, %.0f B down per node", rnd, len(msgs), np.mean(down))
        return msgs

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rnd = self.round_offset + server_round
        got = by_source(replies)
        updates, ups, metrics = [], [], []
        for nid, (view, included) in self._sent.items():
            msg = got.pop(nid, None)
            self._mask_delivered(nid, msg, included)
            if msg is None:
                self._drop(rnd, nid, "no reply before the timeout")
                continue
            ups.append(message_bytes(msg))
            try:
                arrays, n, m = validate.train_reply(msg, view.specs)
            except validate.BadReply as exc:
                self._drop(rnd, nid, str(exc))
                continue
            pos = {PACKED: view.positions} if view.positions is not None else {}
            updates.append(Update(arrays, float(n), pos))
            metrics.append((n, m))
        for nid in got:
            self._drop(rnd, nid, "reply from a node that was not asked to train")
        self._rec.update(replies=len(updates), dropped=len(self._rec.get("drop_reasons", [])), bytes_up=sum(ups),
                         bytes_up_per_client=float(np.mean(ups)) if ups else 0.0)
        if len(updates) < self.cfg.min_replies:
            log(WARNING, "Round %d skipped: %d valid training replies, min-replies=%d", rnd, len(updates),
                self.cfg.min_replies)
            self._rec["skipped"] = True
            return None, None
        avg, coverage = masked_mean(self.global_arrays, updates)
        new = self.opt.step(self.global_arrays, avg, coverage)
        self.global_arrays = OrderedDict((k, np.asarray(new[k], dtype=np.float32)) for k in self.global_arrays)
        agg = _weighted(metrics, ("train-loss", "train-acc"))
        self._rec.update(train_loss=agg.get("train-loss"), train_acc=agg.get("train-acc"))
        return array_record(self.global_arrays), MetricRecord({**agg, "num-replies": len(updates)})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if self.cfg.fraction_evaluate == 0.0:
            self._sent = {}
            return []
        rnd = self.round_offset + server_round
        msgs = self._messages(self._sample(grid, self.cfg.fraction_evaluate), rnd, MessageType.EVALUATE)
        self._rec["eval_bytes_down"] = sum(content_bytes(m.content) for m in msgs)
        return msgs

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        rnd = self.round_offset + server_round
        got = by_source(replies)
        metrics, up = [], 0
        for nid, (_, included) in self._sent.items():
            msg = got.get(nid)
            self._mask_delivered(nid, msg, included)
            if msg is None:
                self._drop(rnd, nid, "evaluation: no reply before the timeout")
                continue
            up += message_bytes(msg)
            try:
                metrics.append(validate.eval_reply(msg))
            except validate.BadReply as exc:
                self._drop(rnd, nid, f"evaluation: {exc}")
        self._rec["eval_bytes_up"] = up
        if not metrics:
            return None
        agg = _weighted(metrics, ("eval-loss", "eval-acc"))
        self._rec.update(fed_loss=agg.get("eval-loss"), fed_acc=agg.get("eval-acc"))
        return MetricRecord(agg)

    def summary(self) -> None:
        c = self.cfg
        log(INFO, "\t├── method=%s, budget=%s, score=%s, reconcile=%s (every %s rounds)", c.method, c.budget,
            c.score, c.reconcile, c.reconcile_every or "-")
        log(INFO, "\t├── fraction-train=%s, fraction-evaluate=%s, min-replies=%d, server-opt=%s", c.fraction_train,
            c.fraction_evaluate, c.min_replies, c.server_opt)
        if self.mask is not None:
            log(INFO, "\t└── mask: %d entries over %d modules (+%d head); %d global entries travel",
                self.mask.num_entries, len(self.mask.names()), num_entries(self.global_arrays) - self.mask.num_entries,
                num_entries(self.global_arrays))
        else:
            log(INFO, "\t└── %d entries travel per round", num_entries(self.global_arrays))

    # ------------------------------------------------------------------ centralised eval + records
    def central_evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """`evaluate_fn` of Strategy.start: central eval, then close the round (record, checkpoint)."""
        rnd = self.round_offset + server_round
        if server_round == 0:
            self._rec = {"round": rnd, "t_start": self._t0, "skipped": False, "dropped": len(self.dropped)}
        rec, out = self._rec, {}
        self._round = rnd
        if self.cfg.server_test_size > 0:
            set_arrays(self.method, self.model, self.global_arrays)
            x, y = server_test_split(self.cfg.task, self.cfg.server_test_size)
            res = local_eval(self.model, x, y)
            out = {"central-acc": res["acc"], "central-loss": res["loss"]}
            rec.update(central_acc=res["acc"], central_loss=res["loss"])
        rec["query_bytes_up"], rec["query_bytes_down"] = self._query_bytes
        self._query_bytes = [0, 0]
        traffic = sum(rec.get(k) or 0 for k in ("bytes_up", "bytes_down", "eval_bytes_up", "eval_bytes_down",
                                                  "query_bytes_up", "query_bytes_down"))
        self._cum_bytes += traffic
        now = time.time()
        rec.update(cum_bytes=self._cum_bytes, trainable_entries=num_entries(self.global_arrays),
                   mask_entries=self.mask.num_entries if self.mask is not None else 0,
                   mask_version=self.mask_version, round_time_s=now - rec.pop("t_start", now),
                   wall_time_s=now - self._t0)
        self.history.append(rec)
        log(INFO, "Round %d: central acc %s | fed acc %s | up %s B/client | down %s B/client | dropped %d%s", rnd,
            _fmt(rec.get("central_acc")), _fmt(rec.get("fed_acc")), _fmt(rec.get("bytes_up_per_client"), 0),
            _fmt(rec.get("bytes_down_per_client"), 0), rec.get("dropped", 0), " | SKIPPED" if rec["skipped"] else "")
        if self.recorder is not None:
            self.recorder.add(rec)
            save_checkpoint(Checkpoint(rnd, self.method, dict(self.global_arrays), self.mask, self.mask_version,
                                       self.opt.state(), self.cfg.to_dict()), self.run_dir / "checkpoint.safetensors")
        return MetricRecord(out) if out else None

    def finish(self) -> dict:
        """Export the merged model and write the run summary."""
        set_arrays(self.method, self.model, self.global_arrays)
        summary = summarize(self.history, self.method)
        summary["dropped_replies"] = len(self.dropped)
        if self.run_dir is not None:
            plain = export(self.method, self.model)
            export_model(plain.state_dict(), self.run_dir / "final_model.safetensors",
                         {"method": self.method, "model": self.cfg.model, "task": self.cfg.task,
                          "rounds": summary.get("rounds", 0)})
            summary["run_dir"] = str(self.run_dir)
            self.recorder.summary = summary
            self.recorder.write()
        return summary


def summarize(history: list[dict], method: str) -> dict:
    """Final accuracy and traffic per client and round over the training rounds."""
    trained = [r for r in history if "sent" in r]
    last = history[-1] if history else {}
    mean = lambda k: float(np.mean([r[k] for r in trained if r.get(k) is not None])) if trained else 0.0  # noqa: E731
    s = {"method": method, "rounds": len(trained), "initial_acc": history[0].get("central_acc") if history else None,
         "final_acc": last.get("central_acc"), "final_fed_acc": last.get("fed_acc"),
         "upload_bytes_per_client_round": mean("bytes_up_per_client"),
         "download_bytes_per_client_round": mean("bytes_down_per_client"),
         "total_bytes": last.get("cum_bytes", 0), "trainable_entries": last.get("trainable_entries"),
         "skipped_rounds": sum(bool(r.get("skipped")) for r in trained)}
    bound = mean("bound_bytes_per_client")
    s["bound_ratio"] = s["upload_bytes_per_client_round"] / bound if bound else None
    return s


def _weighted(items: list[tuple[int, dict]], keys: tuple[str, ...]) -> dict:
    total = sum(n for n, _ in items)
    out = {}
    for k in keys:
        vals = [(n, float(m[k])) for n, m in items if k in m]
        if vals:
            w = sum(n for n, _ in vals)
            out[k] = sum(n * v for n, v in vals) / w if w > 0 else float(np.mean([v for _, v in vals]))
    out["num-examples"] = int(total)
    return out


def _fmt(v, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"
