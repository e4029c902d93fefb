"""Client-side privacy mods: Flower's SecAgg+ (`secaggplus_mod`) and DP clipping (`fixedclipping_mod`).

Both are Flower's own; what is here only lets them act on this app's messages:

* `SecureAggregationMod` puts Flower's `secaggplus_mod` in front of the app, for messages that carry
  its `secaggplus_configs` record only (everything else passes straight through). The SecAgg+
  stages travel as `train` messages (Flower's workflow sends them so); in the stage that collects
  the masked vectors, the server's real request (a training round or the statistics query, named
  in the `secure-request` record) is dispatched to its handler through the whole app, and the reply
  is turned into the vectors of `common.privacy` (update clipped to the bound, weights, metrics;
  statistics and / or gradient sums, each clipped to its own bound), which `secaggplus_mod` quantizes,
  masks and sends. Nothing else of the reply leaves the node.
* `dp_clipping_mod`: Flower's `fixedclipping_mod` on training messages whose config carries the
  clipping norm that `DifferentialPrivacyClientSideFixedClipping` injects (so the same app serves
  plain, server-side DP and client-side DP runs).
* uniform weights (`uniform-weights`, forced on with DP): training replies report num-examples = 1,
  what Flower's privacy accountant requires (equal client weights).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.app.metadata import Metadata
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.mod import fixedclipping_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from common.privacy import grad_secure, stats_contribution, train_contribution

REQUEST = "secure-request"  # ConfigRecord of the server's real request inside the SecAgg+ collect stage
RANK_FLOOR = "budget-rank-floor"  # config key: train at least this budget rank (a secure round's merged rank)


def _arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def _fitres(vectors: list[np.ndarray]) -> RecordDict:
    """The legacy FitRes layout `secaggplus_mod` reads; weight 1 = max_weight, so Flower's own weighting
    is the identity and the sum is exactly what `common.privacy` laid out."""
    res = FitRes(status=Status(Code.OK, "ok"), parameters=ndarrays_to_parameters(vectors), num_examples=1, metrics={})
    return compat.fitres_to_recorddict(res, keep_input=True)


class SecureAggregationMod:
    """Flower's `secaggplus_mod` for this app's messages; `dispatch` is the whole ClientApp."""

    def __init__(self, dispatch: Callable[[Message, Context], Message]):
        self.dispatch = dispatch

    def __call__(self, msg: Message, context: Context, call_next) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN or RECORD_KEY_CONFIGS not in msg.content.config_records:
            return call_next(msg, context)
        return secaggplus_mod(msg, context, lambda m, c: self._collect(m, c))

    def _collect(self, msg: Message, context: Context) -> Message:
        """The collect-masked-vectors stage: run the real request, reply with the vectors to sum."""
        req = msg.content.config_records[REQUEST]
        kind = str(req["message-type"])
        content = RecordDict({k: v for k, v in msg.content.items() if k not in (RECORD_KEY_CONFIGS, REQUEST)})
        if "budget-rank" in req and "config" in content:  # the round's rank: groups of >= 3 (server/secure.py)
            content["config"] = ConfigRecord({**dict(content["config"].items()), RANK_FLOOR: int(req["budget-rank"])})
        md = msg.metadata
        inner = Message(content, metadata=Metadata(run_id=md.run_id, message_id=md.message_id,
                                                   src_node_id=md.src_node_id, dst_node_id=md.dst_node_id,
                                                   reply_to_message_id=md.reply_to_message_id, group_id=md.group_id,
                                                   created_at=md.created_at, ttl=md.ttl, message_type=kind))
        reply = self.dispatch(inner, context)
        if reply.has_error():
            raise RuntimeError(f"secure {kind}: the handler failed: {reply.error.reason}")
        c = float(req["clipping-range"])
        if kind == MessageType.TRAIN:
            metrics = reply.content["metrics"]
            n = float(metrics["num-examples"])
            weight = 1.0 if bool(req["uniform-weights"]) else min(n / float(req["max-weight"]), 1.0)
            if weight <= 0:
                raise RuntimeError("secure train: no training examples (weight 0)")
            vectors = train_contribution(_arrays(content["arrays"]), _arrays(reply.content["arrays"]), weight,
                                         float(req["update-bound"]), c, int(req["weight-slot"]), int(req["num-slots"]),
                                         float(metrics.get("train-loss", 0.0)), float(metrics.get("train-acc", 0.0)))
        elif kind == "query.stats":
            modules = list(req["modules"])
            vectors = (stats_contribution(_arrays(reply.content["stats"]), modules,
                                          dict(zip(modules, (int(r) for r in req["max-rows"]))),
                                          float(req["stats-bound"]), c, bool(req["weighted"]))
                       if bool(req.get("with-stats", True)) else [])
            if float(req.get("grad-bound", 0.0)) > 0:  # score='gradient': the signed gradient sums, clipped
                if "grads" not in reply.content:
                    raise RuntimeError("secure query.stats: the server asked for gradient sums; the handler sent none")
                vectors += grad_secure(_arrays(reply.content["grads"]), modules, float(req["grad-scale"]),
                                       float(req["grad-bound"]), c)
        else:
            raise ValueError(f"secure aggregation of {kind!r} messages is not supported")
        return Message(_fitres(vectors), reply_to=msg)


def dp_clipping_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's `fixedclipping_mod`, on training messages whose config names a clipping norm."""
    conf = msg.content.config_records.get("config") if msg.metadata.message_type == MessageType.TRAIN else None
    if conf is None or KEY_CLIPPING_NORM not in conf:
        return call_next(msg, context)
    return fixedclipping_mod(msg, context, call_next)


def uniform_weights_mod(msg: Message, context: Context, call_next) -> Message:
    """Training replies report num-examples = 1 when the config says `uniform-weights`."""
    reply = call_next(msg, context)
    conf = msg.content.config_records.get("config")
    if (msg.metadata.message_type == MessageType.TRAIN and conf is not None and bool(conf.get("uniform-weights"))
            and not reply.has_error() and "metrics" in reply.content):
        metrics = dict(reply.content["metrics"])
        metrics["num-examples"] = 1
        reply.content["metrics"] = MetricRecord(metrics)
    return reply


def privacy_mods(dispatch: Callable[[Message, Context], Message]) -> tuple:
    """The mods every app of this project runs, outermost first: SecAgg+ wraps the DP clipping, so a
    clipped update is what gets quantized and masked."""
    return (SecureAggregationMod(dispatch), uniform_weights_mod, dp_clipping_mod)

