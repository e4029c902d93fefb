"""The query phases of a TaskEdge run, outside `Strategy.start`: statistics and mask delivery.

* Statistics (`query.stats`): every connected node returns the sums of squares of its calibration
  activations (and its local top-k for `vote`; its signed calibration-gradient sums for
  score='gradient'); the server reconciles them into one global mask
  (server/reconcile.py). Runs before training and again every `reconcile-every` rounds.
* Mask delivery (`query.mask`): the mask's indices and ranks go down once per mask version; the
  node keeps them in its state and answers with its budget rank, from which the server derives
  the entries it trains (`common.wire.nested`). Nodes that join later, or that lost their state,
  get the mask when they are first sampled.
Every reply is validated; a bad one is dropped with a reason in the run's results.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import replace

import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from common.taskedge.allocation import Mask
from common.classes import global_classes, parse_class_names
from common.methods import base_model
from common.privacy import clip_grads, clip_stats
from common.settings import AppConfig
from common.taskedge.stats import collect_stats
from common.taskedge.scores import get_score
from common.taskedge.tuner import target_modules
from common.wire import nested

from . import validate
from .messages import array_record, content_bytes, match_replies, message_bytes, record_bytes
from .reconcile import stats_mask, vote_mask
from .recorder import RoundLog


def server_model(cfg: AppConfig):
    """The server's copy of the frozen pre-trained model (masks are built on it; statistics are probed on it)."""
    return base_model(cfg.model, cfg.head_size, cfg.weights_path, cfg.seed, cfg.img_size)


def send_query(grid: Grid, cfg: AppConfig, log: RoundLog, content: RecordDict, nodes: list[int], kind: str) -> dict:
    """One query to `nodes`; replies by node, with the bytes booked to the next round record."""
    msgs = [Message(content, dst_node_id=n, message_type=f"query.{kind}", group_id=kind) for n in nodes]
    log.add(query_bytes_down=sum(content_bytes(m.content) for m in msgs))
    replies = match_replies(msgs, grid.send_and_receive(msgs, timeout=cfg.round_timeout),
                            lambda nid, why: log.drop(nid, f"{kind}: {why}"))
    log.add(query_bytes_up=sum(message_bytes(r) for r in replies.values()))
    return replies


USER_DATA_MAX_EXAMPLES = 10_000_000  # the server cannot know the size of a user's data: a bound that only stops absurd claims


def max_examples(cfg: AppConfig) -> int:
    """The largest credible num-examples of one reply: `max-examples`, else the built-in task's training split,
    or USER_DATA_MAX_EXAMPLES when the nodes hold their own data (a data-path, or classes other than the task's:
    set max-examples to bound one node's weight in FedAvg)."""
    from common.data.tasks import get_task

    if cfg.max_examples:
        return cfg.max_examples
    if cfg.partitioner == "generated" and not cfg.data_path:
        return cfg.examples_per_node
    return USER_DATA_MAX_EXAMPLES if cfg.data_path or cfg.class_names else get_task(cfg.task).train_size


def setup_cohort(nodes: list[int], cfg: AppConfig, salt: int = 0) -> list[int]:
    """The nodes a setup phase (classes, statistics, first mask delivery) asks: all of them, or with
    setup-fraction < 1 a seeded sample of that share (at least max(1, min-replies)).

    Why: a fleet of 10,000 nodes would otherwise spend three calls per node before round 1 (the exact pooled
    mask needs them all); a cohort's pooled statistics estimate the fleet's, and the others get the mask when
    they are first sampled for training (MaskDelivery.ensure)."""
    if cfg.setup_fraction >= 1.0 or not nodes:
        return list(nodes)
    k = min(len(nodes), max(1, cfg.min_replies, math.ceil(cfg.setup_fraction * len(nodes))))
    return sorted(random.Random(cfg.seed * 1_000_003 + salt).sample(sorted(nodes), k))


def stats_input_size(cfg: AppConfig) -> int:
    """The image size the nodes feed: `img-size` (set from the nodes' reports by the classes phase), else the
    built-in task's."""
    from common.data.tasks import get_task

    return cfg.img_size or get_task(cfg.task).image_size


def stats_limits(base, cfg: AppConfig, targets: dict) -> tuple[dict[str, tuple], dict[str, int]]:
    """Statistic shape and rows per calibration example of every target module (one probe example)."""
    size = stats_input_size(cfg)
    probe = collect_stats(base, targets, [torch.zeros(1, 3, size, size)])
    return ({n: tuple(st.ss.shape) for n, st in probe.items()}, {n: int(st.n) for n, st in probe.items()})


def classes_phase(grid: Grid, cfg: AppConfig, nodes: list[int], log: RoundLog) -> AppConfig:
    """Ask `nodes` for the class names of their data and fix the federation's classes (common/classes.py).

    The run config with `class-names` / `num-classes` set when they differ from the task's (every later
    message carries them); unchanged when every node holds the built-in task. A node whose reply is bad is
    dropped with a reason; none valid: an error naming the reasons."""
    replies = send_query(grid, cfg, log, RecordDict({"config": ConfigRecord(cfg.client_config())}), nodes, "classes")
    reports, sizes = [], {}
    for nid in nodes:
        try:
            if nid not in replies:
                raise validate.BadReply("no reply before the timeout")
            names, sizes[nid] = validate.classes_reply(replies[nid])
            reports.append(names)
        except Exception as exc:  # noqa: BLE001 - one reply never stops the phase
            log.drop(nid, f"classes: {exc}")
    if not reports:
        why = "; ".join(d["reason"] for d in log.dropped[-3:])
        raise RuntimeError(f"classes phase: no node reported its classes ({why})")
    size = max(set(sizes.values()), key=list(sizes.values()).count)  # the nodes' input size (the majority's)
    for nid in [n for n, s in sizes.items() if s != size]:
        log.drop(nid, f"classes: feeds {sizes[nid]}-px images, the others {size} px (set img-size)")
    names = global_classes(reports, parse_class_names(cfg.class_names), cfg.num_classes)
    if size != stats_input_size(cfg):
        cfg = replace(cfg, img_size=size)  # the statistics probe and a ViT's grid follow the nodes' images
    if names == cfg.classes and len(names) == cfg.head_size:
        return cfg
    log.info("Classes: %d (%s%s), from %s", len(names), ", ".join(names[:6]), ", ..." if len(names) > 6 else "",
             "the run config" if cfg.class_names else f"the {len(reports)} node(s)' data")
    return replace(cfg, class_names=json.dumps(names), num_classes=len(names))


def stats_config(cfg: AppConfig) -> ConfigRecord:
    """The statistics query's config: the run config's client keys plus `backbone-sha256`, the fingerprint of
    the server's frozen backbone (common.models.backbone_fingerprint, hashed once per process). A node
    whose own backbone hashes otherwise refuses the query, naming both fingerprints, and is dropped."""
    from common.methods import base_fingerprint
    from common.models import BACKBONE_KEY

    fingerprint = base_fingerprint(cfg.model, cfg.head_size, cfg.weights_path, cfg.seed, cfg.img_size)
    return ConfigRecord({**cfg.client_config(), BACKBONE_KEY: fingerprint})


def statistics_phase(grid: Grid, cfg: AppConfig, nodes: list[int], log: RoundLog) -> Mask | None:
    """Ask `nodes` for statistics and reconcile them; None when fewer than min-replies were valid.
    The query carries the server's backbone fingerprint (`stats_config`): a node on another backbone refuses
    and is dropped with both fingerprints in the reason."""
    base, tcfg = server_model(cfg), cfg.taskedge_config()
    targets = target_modules(base, tcfg)
    shapes, rows = stats_limits(base, cfg, targets)
    vote_sizes = {f"{n}.idx": int(m.weight.numel()) for n, m in targets.items()} if cfg.reconcile == "vote" else None
    grad_shapes = ({n: (m.weight.shape[0], m.weight[0].numel()) for n, m in targets.items()}
                   if get_score(tcfg.score).needs_gradients else None)
    replies = send_query(grid, cfg, log, RecordDict({"config": stats_config(cfg)}), nodes, "stats")
    log.add(**stats_upload(replies.values(), grad_shapes is not None))
    stats, votes = [], []
    for nid in nodes:
        try:
            if nid not in replies:
                raise validate.BadReply("no reply before the timeout")
            st, vt, _ = validate.stats_reply(replies[nid], shapes, rows, cfg.calib_size, max_examples(cfg),
                                             vote_sizes, grad_shapes)
        except Exception as exc:  # noqa: BLE001 - one reply, whatever is wrong with it, never stops the phase
            log.drop(nid, f"statistics: {exc}" if isinstance(exc, validate.BadReply)
                     else f"statistics: unreadable reply ({type(exc).__name__}: {exc})")
            continue
        stats.append(st)
        votes.append(vt)
    log.info("Statistics phase: %d/%d valid replies", len(stats), len(nodes))
    stats = _bounded_stats(stats, shapes, rows, cfg, log)
    if len(stats) < cfg.min_replies:
        return None
    if cfg.reconcile == "vote":
        return vote_mask(base, tcfg, stats, votes)
    return stats_mask(base, tcfg, stats, cfg.stats_aggregation)


def _bounded_stats(stats: list[dict], shapes: dict, rows: dict, cfg: AppConfig, log: RoundLog) -> list[dict]:
    """Every node's statistics under the clip the secure and DP statistics use (`stats-clip-norm` on its
    n/N-weighted mean-square vector): one node's claimed sums of squares no longer decide the pooled mask
    (valid-looking values up to 1e24 x rows did); honest nodes under the bound are untouched."""
    modules = sorted(shapes)
    max_rows = {m: rows[m] * cfg.calib_size for m in modules}
    out = [clip_stats(st, modules, max_rows, cfg.stats_clip_norm) for st in stats]
    clipped = sum(c for _, c in out)
    log.set(stats_clipped=clipped)
    if clipped:
        log.info("Statistics phase: %d of %d nodes' statistics clipped to stats-clip-norm=%g (raise it if this "
                 "model's activations are large and every node is clipped)", clipped, len(out), cfg.stats_clip_norm)
    if not any(k.endswith(".g") for st, _ in out for k in st):
        return [st for st, _ in out]
    # score='gradient': each node's sums / calib-size clipped to grad-clip-norm, as the secure and DP phases do
    grads = [clip_grads(st, modules, cfg.calib_size, cfg.grad_clip_norm) for st, _ in out]
    clipped = sum(c for _, c in grads)
    log.set(grad_clipped=clipped)
    if clipped:
        log.info("Statistics phase: %d of %d nodes' gradient sums clipped to grad-clip-norm=%g", clipped, len(out),
                 cfg.grad_clip_norm)
    return [{**st, **g} for (st, _), (g, _) in zip(out, grads)]


def stats_upload(replies, gradients: bool) -> dict[str, int]:
    """The statistics query's upload for the round record: all bytes, the replies, and (score='gradient') the
    bytes of the gradient records alone — the one-off dense part, which a benchmark reports separately."""
    ok = [r for r in replies if not r.has_error()]
    out = {"stats_bytes_up": sum(message_bytes(r) for r in ok), "stats_replies": len(ok)}
    if gradients:
        out["grad_bytes_up"] = sum(record_bytes(r.content["grads"]) for r in ok if "grads" in r.content)
    return out


class MaskDelivery:
    """Which node holds which mask version, and each node's budget rank (from its delivery reply)."""

    def __init__(self, cfg: AppConfig, log: RoundLog):
        self.cfg, self.log = cfg, log
        self.mask: Mask | None = None
        self.version = 0
        self.ranks: dict[int, int] = {}
        self._holders: dict[int, int] = {}
        self._positions: dict[int, object] = {}

    def install(self, mask: Mask, version: int | None = None) -> None:
        """A new global mask: every node needs it again."""
        self.mask, self.version = mask, self.version + 1 if version is None else version
        self._holders, self._positions = {}, {}

    def forget(self, node: int) -> None:
        """The node failed a round: it may have lost its state, so resend the mask next time."""
        self._holders.pop(node, None)

    def ensure(self, grid: Grid, nodes: list[int]) -> set[int]:
        """Deliver the current mask to those of `nodes` that lack it; the nodes that hold it."""
        missing = [n for n in nodes if self._holders.get(n) != self.version]
        if missing:
            content = RecordDict({"mask": array_record(self.mask.to_arrays(compact=True)),
                                  "config": ConfigRecord({**self.cfg.client_config(), "mask-version": self.version})})
            replies = send_query(grid, self.cfg, self.log, content, missing, "mask")
            for nid in missing:
                try:
                    if nid not in replies:
                        raise validate.BadReply("no reply before the timeout")
                    self.ranks[nid] = validate.mask_reply(replies[nid], self.version)
                    self._holders[nid] = self.version
                except Exception as exc:  # noqa: BLE001 - one reply never stops the phase
                    self.log.drop(nid, f"mask delivery: {exc}")
        return {n for n in nodes if self._holders.get(n) == self.version}

    def positions(self, node: int):
        """Positions of the node's entries in the packed vector (None: it trains the whole mask)."""
        return self.rank_positions(self.ranks.get(node, 0))

    def rank_positions(self, rank: int):
        """Positions in the packed vector that budget rank `rank` trains (None: the whole mask)."""
        if rank not in self._positions:
            self._positions[rank] = nested(self.mask, rank)[1]
        return self._positions[rank]
