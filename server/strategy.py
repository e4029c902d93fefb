"""The federation's strategy: Flower's FedAvg (or FedAvgM), subclassed only where TaskEdge differs.

Flower's own code does the rest: node sampling, one message per node, the weighted mean of the
replies, metric weighting and server momentum (`FedAvgM`). Because every node of a round sends
the same fixed-length vector (`common.wire`), the masked per-entry mean over that vector IS
FedAvg's mean, so `aggregate_train` is FedAvg's weighted mean for all three methods (`TaskEdgeFedAvg`
computes the same mean in one pass per reply; Flower's DP wrappers see a FedAvg mean, as they require).

Two things really differ and are added here:

* `configure_train` / `configure_evaluate` make sure every sampled node holds the current mask
  before it is asked to train (`MaskDelivery`, server/phases.py: a node that joined after the
  mask phase or lost its state gets the indices once); Strategy.start offers no other hook
  between sampling and sending.
* `Nested…` (only when some node has a smaller budget rank): each entry is averaged over the
  nodes that trained it, with its own denominator (`server.aggregate.masked_mean`; median and
  trimmed mean per entry with `aggregation`); the result then goes through the parent's
  `aggregate_train` as a single reply, so FedAvgM's momentum applies unchanged.

`aggregation='trimmed'|'median'` uses Flower's FedTrimmedAvg / FedMedian as the base.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedAvgM, FedMedian, FedTrimmedAvg

from common.settings import AppConfig
from common.wire import PACKED

from .aggregate import Update, masked_mean, masked_robust, weighted_mean
from .messages import array_record
from .phases import MaskDelivery
from .validate import decoded_view


class _DeliversMask:
    """Mixin: drop the messages of sampled nodes that could not be given the current mask."""

    delivery: MaskDelivery | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.current_global = arrays
        return self._with_mask(super().configure_train(server_round, arrays, config, grid), grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self._with_mask(super().configure_evaluate(server_round, arrays, config, grid), grid)

    def _with_mask(self, messages: Iterable[Message], grid: Grid) -> list[Message]:
        messages = list(messages)
        if self.delivery is None:
            return messages
        holders = self.delivery.ensure(grid, [m.metadata.dst_node_id for m in messages])
        return [m for m in messages if m.metadata.dst_node_id in holders]


class _NestedMean:
    """Mixin: per-entry denominators for nodes that train a nested sub-mask (smaller budget)."""

    delivery: MaskDelivery

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = [r for r in replies if not r.has_error()]
        pos = {r.metadata.src_node_id: self.delivery.positions(r.metadata.src_node_id) for r in replies}
        if not replies or all(p is None for p in pos.values()):
            return super().aggregate_train(server_round, replies)
        current = {k: v.numpy() for k, v in self.current_global.items()}
        updates = []
        for r in replies:
            arrays = {k: v.numpy() for k, v in r.content[self.arrayrecord_key].items()}
            p = pos[r.metadata.src_node_id]
            if p is not None:  # the node sends the full vector; only its own entries count
                arrays[PACKED] = arrays[PACKED][p]
            weight = float(next(iter(r.content.metric_records.values()))[self.weighted_by_key])
            updates.append(Update(arrays, weight, {PACKED: p} if p is not None else {}))
        if isinstance(self, FedMedian):
            avg = masked_robust(current, updates, "median")
        elif isinstance(self, FedTrimmedAvg):
            avg = masked_robust(current, updates, "trimmed", self.beta)
        else:
            avg, _ = masked_mean(current, updates)
        one = Message(RecordDict({self.arrayrecord_key: array_record({k: avg[k] for k in current}),
                                  "metrics": MetricRecord({self.weighted_by_key: 1})}),
                      dst_node_id=0, message_type=MessageType.TRAIN)
        arrays, _ = super().aggregate_train(server_round, [one])
        return arrays, self.train_metrics_aggr_fn([r.content for r in replies], self.weighted_by_key)


class TaskEdgeFedAvg(_DeliversMask, FedAvg):
    """FedAvg whose nodes hold the current TaskEdge mask (the common case: every node trains it all).
    Flower's own `aggregate_train`, which Flower's DP wrappers require for their accounting."""


class OnePassFedAvg(TaskEdgeFedAvg):
    """TaskEdgeFedAvg for runs without a DP wrapper: `aggregate_train` is Flower's, step for step (its reply
    checks, its metric aggregation), except that the weighted mean of the arrays is
    `server.aggregate.weighted_mean` over the values the reply guard already decoded: the same mean in one
    pass per reply instead of three (the server's throughput at 1,000 replies, benchmarks/bench_server_agg.py).
    Flower's DP wrappers refuse to account any other aggregate_train than FedAvg's, so DP runs keep the parent."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        contents = [m.content for m in valid]
        weights = [float(next(iter(c.metric_records.values()))[self.weighted_by_key]) for c in contents]
        arrays = [{k: decoded_view(a) for rec in c.array_records.values() for k, a in rec.items()} for c in contents]
        return (array_record(weighted_mean(arrays, weights)),
                self.train_metrics_aggr_fn(contents, self.weighted_by_key))


class TaskEdgeFedAvgM(_DeliversMask, FedAvgM):
    """FedAvgM (server momentum on the pseudo-gradient) with mask delivery."""


class TaskEdgeFedTrimmedAvg(_DeliversMask, FedTrimmedAvg):
    """Flower's coordinate-wise trimmed mean with mask delivery (aggregation='trimmed')."""


class TaskEdgeFedMedian(_DeliversMask, FedMedian):
    """Flower's coordinate-wise median with mask delivery (aggregation='median')."""


class NestedFedAvg(_NestedMean, TaskEdgeFedAvg):
    """TaskEdgeFedAvg with per-entry means over the nodes that trained each entry (nested budgets)."""


class NestedFedAvgM(_NestedMean, TaskEdgeFedAvgM):
    """TaskEdgeFedAvgM with per-entry means over the nodes that trained each entry (nested budgets)."""


class NestedFedTrimmedAvg(_NestedMean, TaskEdgeFedTrimmedAvg):
    """TaskEdgeFedTrimmedAvg with per-entry trimmed means over the nodes that trained each entry."""


class NestedFedMedian(_NestedMean, TaskEdgeFedMedian):
    """TaskEdgeFedMedian with per-entry medians over the nodes that trained each entry."""


BASES = {("mean", "fedavg"): TaskEdgeFedAvg, ("mean", "fedavgm"): TaskEdgeFedAvgM,
         ("trimmed", "fedavg"): TaskEdgeFedTrimmedAvg, ("median", "fedavg"): TaskEdgeFedMedian}
NESTED = {TaskEdgeFedAvg: NestedFedAvg, TaskEdgeFedAvgM: NestedFedAvgM, TaskEdgeFedTrimmedAvg: NestedFedTrimmedAvg,
          TaskEdgeFedMedian: NestedFedMedian}


def make_strategy(cfg: AppConfig, delivery: MaskDelivery | None, nested: bool, evaluate: bool = True,
                  wrapped: bool = False) -> FedAvg:
    """The strategy for a run configuration; `nested` when some node trains a smaller budget; `evaluate`
    False: no federated evaluation whatever fraction-evaluate says (secure and DP runs); `wrapped`: a DP
    wrapper (run config dp, or the caller's) goes around it, so the mean must be Flower's own."""
    cls = BASES[(cfg.aggregation, cfg.server_opt)]
    cls = NESTED[cls] if nested else OnePassFedAvg if cls is TaskEdgeFedAvg and not wrapped else cls
    kw = {}
    if cfg.server_opt == "fedavgm":
        kw = dict(server_learning_rate=cfg.server_lr, server_momentum=cfg.server_momentum)
    elif cfg.aggregation == "trimmed":
        kw = dict(beta=cfg.trim_beta)
    # min-nodes is waited for once, before the first phase (server/runner.py); a round samples whoever is
    # connected then (at least 1): Flower's sample_nodes waits without a time limit for min_available_nodes,
    # so one lost node of min-nodes would stall every later round.
    fraction_evaluate = cfg.fraction_evaluate if evaluate else 0.0
    strategy = cls(fraction_train=cfg.fraction_train, fraction_evaluate=fraction_evaluate, min_train_nodes=1,
                   min_evaluate_nodes=1 if fraction_evaluate > 0 else 0, min_available_nodes=1, **kw)
    strategy.delivery = delivery
    return strategy


def momentum_state(strategy: FedAvg, keys: list[str]) -> dict[str, np.ndarray]:
    """FedAvgM's momentum buffers by array key (for checkpoints); empty for FedAvg."""
    buf = getattr(strategy, "momentum_vector", None)
    return {} if buf is None else {k: np.asarray(v, np.float32) for k, v in zip(keys, buf)}


def restore_momentum(strategy: FedAvg, state: dict[str, np.ndarray], keys: list[str]) -> None:
    """Inverse of `momentum_state`; also forgets FedAvgM's reference arrays (new mask or resume)."""
    if isinstance(strategy, FedAvgM):
        strategy.current_arrays = None
        strategy.momentum_vector = [state[k] for k in keys] if state and set(keys) <= set(state) else None
