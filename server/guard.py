"""A strategy wrapper that lets only valid replies through, and books every round's traffic.

Flower's FedAvg checks neither shapes nor finiteness (a ragged reply is silently broadcast into
garbage) and its DP wrappers refuse a round with any error reply, so every reply is checked here
first, against what the server sent this round: replies matched to their message, at most one
per node, exact keys, dtype, shape, finite values, a sane example count (server/validate.py).
A bad reply is dropped with a reason in the run's results; with fewer than `min-replies` valid
replies the round is skipped and the global state stays as it was. It wraps any Strategy, like
Flower's DP wrappers do, so it composes with them: `ReplyGuard(DifferentialPrivacy…(strategy))`.
A node on a smaller budget rank (nested masks, `positions`) sends the whole packed vector back; every
entry outside its sub-mask must come back exactly as sent, or the reply is refused before any clipping
measures it (a rank-1 node writing 0.5 outside its sub-mask inflated its norm 6x and shrank its real
update under the adaptive clip).
In a DP run (`private`) each reply's metrics are cut to its weight before anything aggregates or logs
them: a client's training loss and accuracy are un-noised functions of its data.
With `codec` (run config value-dtype float16 / int8, server/codec.py) the broadcast is encoded before it
is booked, and each training reply's encoded update is decoded (global + update) before the checks above,
so everything inside sees float32 arrays and the bytes booked are the encoded bytes.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from common.wire import PACKED

from . import validate
from .codec import ValueCodec
from .messages import content_bytes, match_replies, message_bytes
from .recorder import RoundLog


class ReplyGuard(Strategy):
    def __init__(self, strategy: Strategy, log: RoundLog, min_replies: int = 1, max_examples: int = 10**9,
                 on_failure: Callable[[int], None] | None = None, private: bool = False,
                 positions: Callable[[int], np.ndarray | None] | None = None, codec: ValueCodec | None = None):
        self.strategy, self.log, self.min_replies, self.max_examples = strategy, log, min_replies, max_examples
        self.codec = codec if codec is not None and codec.active else None
        self._global: dict[str, np.ndarray] = {}
        self._up: dict[int, int] = {}  # bytes of each node's reply as received (encoded)
        self.private, self.positions = private, positions
        self._packed: np.ndarray | None = None
        self.on_failure = on_failure  # e.g. MaskDelivery.forget: a failed node may have lost its state
        self._sent: list[Message] = []
        self._specs: dict[str, tuple[tuple[int, ...], str]] = {}

    def summary(self) -> None:
        self.strategy.summary()

    def _book(self, messages: Iterable[Message], prefix: str) -> list[Message]:
        self._sent = list(messages)
        down = [content_bytes(m.content) for m in self._sent]
        self.log.set(**{f"{prefix}bytes_down": sum(down)})
        return self._sent

    def _valid(self, replies: Iterable[Message], phase: str, check: Callable[[Message], object]) -> list:
        """(node, reply, checked) of every valid reply; every other one dropped with its reason."""
        drop = lambda nid, why: self.log.drop(nid, f"{phase}: {why}")  # noqa: E731
        got = match_replies(self._sent, replies, drop)
        self._up = {nid: message_bytes(r) for nid, r in got.items()}
        self.log.set(**{("eval_bytes_up" if phase == "evaluation" else "bytes_up"):
                        sum(message_bytes(r) for r in got.values())})
        out = []
        for m in self._sent:
            nid = m.metadata.dst_node_id
            try:
                if nid not in got:
                    raise validate.BadReply("no reply before the timeout")
                out.append((nid, got[nid], check(got[nid])))
            except Exception as exc:  # noqa: BLE001 - whatever is wrong with one reply rejects that reply only
                drop(nid, str(exc) if isinstance(exc, validate.BadReply) else f"unreadable ({type(exc).__name__}: {exc})")
                if self.on_failure is not None and (nid not in got or got[nid].has_error()):
                    self.on_failure(nid)
        return out

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._specs = {k: (tuple(v.shape), v.dtype) for k, v in arrays.items()}
        self._packed = arrays[PACKED].numpy() if self.positions is not None and PACKED in arrays else None
        msgs = self.strategy.configure_train(server_round, arrays, config, grid)
        if self.codec is not None:
            self._global = {k: v.numpy() for k, v in arrays.items()}
            msgs = self.codec.broadcast(msgs, arrays, server_round, 0)
        msgs = self._book(msgs, "")
        entries = sum(int(np.prod(s)) for s, _ in self._specs.values())
        self.log.set(sent=len(msgs), bytes_down_per_client=float(np.mean([content_bytes(m.content) for m in msgs]))
                     if msgs else 0.0, bound_bytes_per_client=4.0 * entries if self.codec is None
                     else self.codec.bound_bytes(self._specs))
        return msgs

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid = self._valid(replies, "training", self._train_reply)
        valid = [v for v in valid if v[2][1] > 0]  # a reply of 0 examples is valid but carries no weight
        self.log.set(replies=len(valid), bytes_up_per_client=float(np.mean([self._up[nid] for nid, _, _ in valid]))
                     if valid else 0.0)
        if len(valid) < self.min_replies:
            self.log.info("Round %d skipped: %d valid training replies, min-replies=%d", self.log.round, len(valid),
                          self.min_replies)
            self.log.set(skipped=True)
            return None, None
        if self.private:
            for _, reply, (_, n, _) in valid:
                reply.content["metrics"] = MetricRecord({"num-examples": n})
        try:
            arrays, metrics = self.strategy.aggregate_train(server_round, [r for _, r, _ in valid])
        except Exception as exc:  # noqa: BLE001 - the global state stays as it was
            self.log.info("Round %d skipped: aggregation failed (%s: %s)", self.log.round, type(exc).__name__, exc)
            self.log.set(skipped=True, aggregation_error=f"{type(exc).__name__}: {exc}")
            return None, None
        if metrics is not None:
            self.log.set(train_loss=metrics.get("train-loss"), train_acc=metrics.get("train-acc"))
        return arrays, metrics

    def _train_reply(self, reply: Message):
        if self.codec is not None:  # the encoded update -> float32 global + update, in the reply (BadReply if not)
            self.codec.decode_reply(reply, self._specs, self._global)
        checked = validate.train_reply(reply, self._specs, self.max_examples)
        record = reply.content["arrays"]  # decoded once: clipping and the strategy reuse the validated values
        for key, arr in checked[0].items():
            record[key] = validate.DecodedArray.of(record[key], arr)
        pos = self.positions(reply.metadata.src_node_id) if self._packed is not None else None
        if pos is not None:
            validate.within_submask(checked[0][PACKED], self._packed, pos)
        return checked

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        msgs = self.strategy.configure_evaluate(server_round, arrays, config, grid)
        if self.codec is not None:
            msgs = self.codec.broadcast(msgs, arrays, server_round, 1)
        return self._book(msgs, "eval_")

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        valid = self._valid(replies, "evaluation", lambda r: validate.eval_reply(r, self.max_examples))
        if not valid:
            return None
        try:
            metrics = self.strategy.aggregate_evaluate(server_round, [r for _, r, _ in valid])
        except Exception as exc:  # noqa: BLE001
            self.log.info("Round %d: federated evaluation not aggregated (%s: %s)", self.log.round,
                          type(exc).__name__, exc)
            return None
        if metrics is not None:
            self.log.set(fed_loss=metrics.get("eval-loss"), fed_acc=metrics.get("eval-acc"))
        return metrics
