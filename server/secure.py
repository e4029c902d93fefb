"""Secure aggregation with Flower's SecAgg+, driven from the Message-API ServerApp.

Flower 1.42 ships SecAgg+ only as a legacy *workflow* (`SecAggPlusWorkflow`, client
`secaggplus_mod`), made for a `LegacyContext` whose legacy strategy's `configure_fit` /
`aggregate_fit` bracket the protocol. This module runs that very workflow object, unchanged, as the
summation step of one round of this app, instead of running the whole app as a legacy workflow:

* `secure_sum` calls `SecAggPlusWorkflow(...)(grid, context)` with a LegacyContext whose legacy
  strategy only names the round's nodes (`configure_fit`) and receives the unmasked aggregate
  (`aggregate_fit`); the grid it gets (`_StageGrid`) puts the server's real request (the training
  content of `Strategy.start`, or the statistics query) into the stage that collects the masked
  vectors, checks every stage's replies (a malformed one counts as a dropout, which SecAgg+
  tolerates up to its threshold) and counts the bytes. Key agreement, Shamir sharing, masking,
  quantization, dropout recovery and unmasking are Flower's code.
* `SecureGrid` wraps the run's grid for `Strategy.start`: a training round's messages go through
  `secure_sum` instead of being sent as they are, and every node that stayed in the protocol
  gets back a reply that carries the *aggregate* (global arrays + the weighted mean update) in place
  of its own arrays. So the reply guard, Flower's DP wrapper (noise, accounting) and FedAvg keep
  working unchanged, and none of them ever holds one node's update.

Why not the workflow path: it replaces `Strategy.start` by a legacy `DefaultWorkflow` with a legacy
strategy, which would drop the message-API strategy (FedAvg/FedAvgM, mask delivery, nested budgets),
Flower's message-API DP wrappers and their privacy accountant, the reply guard and the per-round
recorder; and the statistics round is no fit round, which is all the workflow can run.
"""
from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common import FitIns, Parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.compat.common.parameter import bytes_to_ndarray
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid
from flwr.supercore import log as flwr_log

from common.privacy import merge_ranks, quantization_bound, train_mean, train_shapes
from common.settings import AppConfig
from common.wire import PACKED

from .messages import array_record, content_bytes, message_bytes, stamp
from .recorder import RoundLog

REQUEST = "secure-request"  # client/privacy.py reads the real request's parameters from this ConfigRecord
ERROR_CODE = 0
# Fewest nodes in a secure sum, and in every weight slot of one: with 2, each node learns the other's update
# from the sum (the next global model carries it) less its own; with 1, the server reads it.
MIN_SECURE_NODES = 3


@dataclass(frozen=True)
class SecAggSettings:
    """SecAgg+ parameters (Flower's): shares, threshold, quantizer range and levels, modulus."""

    num_shares: int | float
    threshold: int | float
    clipping_range: float
    quantization_range: int = 2**22
    modulus_range: int = 2**32

    @staticmethod
    def from_config(cfg: AppConfig, clipping_range: float) -> "SecAggSettings":
        shares, thr = cfg.secagg_num_shares, cfg.secagg_reconstruction_threshold
        return SecAggSettings(int(shares) if shares > 1 else float(shares), int(thr) if thr > 1 else float(thr),
                              float(clipping_range), int(cfg.secagg_quantization_range))

    def workflow(self, timeout: float | None) -> SecAggPlusWorkflow:
        # max_weight 1 with every node reporting weight 1: Flower's own weighting is the identity and the
        # weights travel as a vector inside the sum (common.privacy)
        return SecAggPlusWorkflow(self.num_shares, self.threshold, max_weight=1.0, clipping_range=self.clipping_range,
                                  quantization_range=self.quantization_range, modulus_range=self.modulus_range,
                                  timeout=timeout)


@dataclass
class SecureSum:
    """What the server learns from one SecAgg+ run: the sum over `active`, and who dropped where."""

    sums: list[np.ndarray] | None
    active: list[int]
    dropped: dict[int, str] = field(default_factory=dict)
    bytes_down: int = 0
    bytes_up: int = 0
    seconds: float = 0.0
    collect_seconds: float = 0.0  # the collect stage's round trip: the nodes' own work (training) + masking
    reason: str = ""
    vector_bytes: list[int] = field(default_factory=list)  # per contributed vector: its masked bytes, all nodes

    @property
    def overhead_seconds(self) -> float:
        """Time SecAgg+ adds to a round: every stage but the collect stage's round trip, plus the server's
        summing and unmasking (the nodes' masking inside the collect stage is not separated out)."""
        return self.seconds - self.collect_seconds


class _Node:
    """The ClientProxy stand-in the workflow keys its state by (it only reads `node_id`)."""

    def __init__(self, node_id: int):
        self.node_id = node_id


class _Manager:
    """The client manager the workflow only asks how many nodes are available (for its log line)."""

    def __init__(self, n: int):
        self.n = n

    def num_available(self) -> int:
        return self.n


class _Round:
    """The legacy strategy the workflow calls: which nodes take part, and where the aggregate goes."""

    def __init__(self, nodes: list[int]):
        self.nodes, self.mean, self.active = nodes, None, []

    def configure_fit(self, server_round, parameters, client_manager):
        return [(_Node(n), FitIns(Parameters(tensors=[], tensor_type="numpy.ndarray"), {})) for n in self.nodes]

    def aggregate_fit(self, server_round, results, failures):
        if results:
            # SecAggPlusWorkflow.unmask_stage hands every result the same aggregated parameters
            self.mean = parameters_to_ndarrays(results[0][1].parameters)
            self.active = [proxy.node_id for proxy, _ in results]
        return None, {}


def _keys_present(conf: ConfigRecord, kinds: dict[str, type]) -> None:
    for key, kind in kinds.items():
        if key not in conf:
            raise ValueError(f"missing '{key}'")
        value = conf[key]
        if kind is list and not isinstance(value, list):
            raise ValueError(f"'{key}' is not a list")
        if kind is bytes and not isinstance(value, bytes):
            raise ValueError(f"'{key}' is not bytes")


class _DelegatingGrid(Grid):
    """A Grid that forwards everything to `self.grid`; subclasses override `send_and_receive`."""

    grid: Grid

    def set_run(self, run):
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, *args, **kwargs):
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self):
        return self.grid.get_node_ids()

    def push_messages(self, messages):
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids):
        return self.grid.pull_messages(message_ids)


class _StageGrid(_DelegatingGrid):
    """The grid the SecAgg+ workflow talks to: the real request in the collect stage, checked replies."""

    def __init__(self, grid: Grid, requests: dict[int, RecordDict], shapes: list[tuple[int, ...]], modulus: int):
        self.grid, self.requests, self.shapes, self.modulus = grid, requests, shapes, modulus
        self.dropped: dict[int, str] = {}
        self.bytes_down = self.bytes_up = 0
        self.seconds: dict[str, float] = {}  # wall time of each stage's round trip
        self.vector_bytes = [0] * len(shapes)  # masked bytes of each contributed vector, over the checked replies


    def _collect_message(self, msg: Message) -> Message:
        nid = msg.metadata.dst_node_id
        content = RecordDict(dict(self.requests[nid].items()))
        content[RECORD_KEY_CONFIGS] = msg.content.config_records[RECORD_KEY_CONFIGS]
        return Message(content, dst_node_id=nid, message_type=MessageType.TRAIN, group_id=msg.metadata.group_id)

    def _check(self, stage: str, reply: Message) -> None:
        conf = reply.content.config_records.get(RECORD_KEY_CONFIGS)
        if conf is None:
            raise ValueError(f"no '{RECORD_KEY_CONFIGS}' record")
        if stage == Stage.SETUP:
            _keys_present(conf, {Key.PUBLIC_KEY_1: bytes, Key.PUBLIC_KEY_2: bytes})
        elif stage == Stage.SHARE_KEYS:
            self._id_value_lists(conf, Key.DESTINATION_LIST, "destination", Key.CIPHERTEXT_LIST, "ciphertext")
        elif stage == Stage.COLLECT_MASKED_VECTORS:
            _keys_present(conf, {Key.MASKED_PARAMETERS: list})
            blobs = conf[Key.MASKED_PARAMETERS]
            want = [(1,)] + list(self.shapes)
            if len(blobs) != len(want):
                raise ValueError(f"{len(blobs)} masked arrays, expected {len(want)}")
            for blob, shape in zip(blobs, want):
                arr = bytes_to_ndarray(blob)  # np.load(allow_pickle=False)
                if arr.dtype != np.int64 or tuple(arr.shape) != tuple(shape):
                    raise ValueError(f"masked array {arr.dtype} {arr.shape}, expected int64 {shape}")
                if arr.size and (arr.min() < 0 or arr.max() >= self.modulus):
                    raise ValueError("masked array outside [0, modulus)")
            if compat.recorddict_to_fitres(reply.content, keep_input=True).num_examples != 1:
                raise ValueError("weight other than 1 (the weights travel inside the sum)")
            for i, blob in enumerate(blobs[1:]):
                self.vector_bytes[i] += len(blob)
        elif stage == Stage.UNMASK:
            self._id_value_lists(conf, Key.NODE_ID_LIST, "share owner", Key.SHARE_LIST, "share")

    def _id_value_lists(self, conf: ConfigRecord, ids_key: str, ids_what: str, values_key: str, what: str) -> None:
        """A list of node ids and a list of bytes of the same length. The ids: unique integers, every one a
        node of this secure round (Flower's unmask stage indexes its per-node state by them: an outside id
        was a KeyError that ended the run)."""
        _keys_present(conf, {ids_key: list, values_key: list})
        ids = conf[ids_key]
        if len(ids) != len(conf[values_key]):
            raise ValueError(f"{ids_what} and {what} lists differ in length")
        if not all(isinstance(v, bytes) for v in conf[values_key]):
            raise ValueError(f"every {what} must be bytes")
        if any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
            raise ValueError(f"{ids_what} ids must be integers")
        if len(set(ids)) != len(ids):
            raise ValueError(f"{ids_what} ids repeat")
        outside = sorted(set(ids) - set(self.requests))
        if outside:
            raise ValueError(f"{ids_what} id {outside[0]} is not a node of this round")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        msgs = list(messages)
        if not msgs:
            return []
        stage = str(msgs[0].content.config_records[RECORD_KEY_CONFIGS][Key.STAGE])
        if stage == Stage.COLLECT_MASKED_VECTORS:
            msgs = [self._collect_message(m) for m in msgs]
        self.bytes_down += sum(content_bytes(m.content) for m in msgs)
        t0 = time.time()
        replies = list(self.grid.send_and_receive(msgs, timeout=timeout))
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.time() - t0
        self.bytes_up += sum(message_bytes(r) for r in replies)
        sent = {m.metadata.dst_node_id: m for m in msgs}
        out, seen = [], set()
        for r in replies:
            nid = r.metadata.src_node_id
            if r.has_error():
                out.append(r)
                continue
            if nid not in sent or nid in seen:
                continue  # a reply to nothing this stage sent, or a second one: ignored
            seen.add(nid)
            try:
                self._check(stage, r)
            except Exception as exc:  # noqa: BLE001 - a malformed reply is a dropout of that node
                self.dropped.setdefault(nid, f"secure aggregation ({stage}): invalid reply: {exc}")
                out.append(Message(Error(code=ERROR_CODE, reason=str(exc)), reply_to=sent[nid]))
                continue
            out.append(r)
        for nid, m in sent.items():
            if nid not in seen and nid not in self.dropped:
                errs = [r.error.reason for r in replies if r.has_error() and r.metadata.reply_to_message_id
                        == m.metadata.message_id]
                self.dropped[nid] = (f"secure aggregation ({stage}): dropped out"
                                     + (f" ({errs[0]})" if errs else " (no reply)"))
        return out


def secure_sum(grid: Grid, requests: dict[int, RecordDict], shapes: list[tuple[int, ...]], settings: SecAggSettings,
               server_round: int, timeout: float | None = None) -> SecureSum:
    """The sum over the nodes that complete SecAgg+ of the vectors each node derives from its request.

    `requests[node]`: the content the node's handler gets (with a `secure-request` ConfigRecord);
    `shapes`: the shapes of the vectors every node contributes. None as `sums` when the protocol
    halted (too few nodes left for the reconstruction threshold)."""
    nodes = sorted(requests)
    if len(nodes) * settings.quantization_range >= settings.modulus_range:
        raise ValueError(f"secure aggregation: {len(nodes)} nodes x secagg-quantization-range="
                         f"{settings.quantization_range} would overflow the modulus 2^32; lower the range")
    t0 = time.time()
    legacy = _Round(nodes)
    ctx = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                        strategy=legacy, client_manager=_Manager(len(nodes)))
    ctx.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: int(server_round)})
    ctx.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    stage_grid = _StageGrid(grid, requests, shapes, settings.modulus_range)
    error = ""
    if len(nodes) >= MIN_SECURE_NODES:
        try:
            settings.workflow(timeout)(stage_grid, ctx)
        except Exception as exc:  # noqa: BLE001 - whatever a reply did inside Flower's protocol, the run goes on
            error, legacy.mean = f"secure aggregation failed ({type(exc).__name__}: {exc}); round skipped", None
    res = SecureSum(None, [], dict(stage_grid.dropped), stage_grid.bytes_down, stage_grid.bytes_up, time.time() - t0,
                    stage_grid.seconds.get(Stage.COLLECT_MASKED_VECTORS, 0.0), vector_bytes=stage_grid.vector_bytes)
    if legacy.mean is None:
        res.reason = error or (
            f"secure aggregation needs at least {MIN_SECURE_NODES} nodes, got {len(nodes)}"
            if len(nodes) < MIN_SECURE_NODES else
            "secure aggregation halted: too few nodes or shares left for the reconstruction threshold")
        return res
    if len(legacy.active) < MIN_SECURE_NODES:  # the sum of fewer would give a node's update away
        res.reason = (f"secure aggregation: only {len(legacy.active)} node(s) completed the protocol, fewer than "
                      f"{MIN_SECURE_NODES}; their sum is discarded")
        return res
    # SecAgg+ divides the sum by the summed weights; every node's weight is 1, so that is the number of nodes
    res.active = sorted(legacy.active)
    res.sums = [np.asarray(m, np.float64) * len(res.active) for m in legacy.mean]
    for nid in res.active:
        res.dropped.pop(nid, None)  # dropped after its masked vector went in (unmask stage): still summed
    return res


class SecureTraining:
    """Training rounds through SecAgg+: the aggregate replaces every surviving node's reply."""

    def __init__(self, cfg: AppConfig, log: RoundLog, settings: SecAggSettings, update_bound: float,
                 max_weight: int, delivery=None):
        self.cfg, self.log, self.settings = cfg, log, settings
        self.update_bound, self.max_weight, self.delivery = update_bound, max_weight, delivery
        self.last: SecureSum | None = None

    def _slots(self, nodes: list[int]) -> tuple[dict[int, int], dict[int, int], list]:
        """Budget rank the round gives every node (rank groups of >= MIN_SECURE_NODES, `merge_ranks`), its weight
        slot (one per rank) and the packed positions each slot trains."""
        own = {n: (self.delivery.ranks.get(n, 0) if self.delivery is not None else 0) for n in nodes}
        ranks = merge_ranks(own, MIN_SECURE_NODES)
        order = sorted(set(ranks.values()))
        slot = {n: order.index(r) for n, r in ranks.items()}
        positions = [self.delivery.rank_positions(r) if self.delivery is not None else None for r in order]
        return ranks, slot, positions

    def round(self, grid: Grid, messages: list[Message], timeout: float | None) -> list[Message]:
        for m in messages:
            if not m.metadata.message_id:
                stamp(m)  # the guard matches replies to these messages by id
        nodes = [m.metadata.dst_node_id for m in messages]
        content = messages[0].content
        rnd = int(content["config"].get("server-round", self.log.round))
        current = {k: v.numpy() for k, v in content["arrays"].items()}
        ranks, slot, positions = self._slots(nodes)
        c = self.settings.clipping_range
        requests = {}
        for m in messages:
            nid = m.metadata.dst_node_id
            req = ConfigRecord({"message-type": MessageType.TRAIN, "clipping-range": c,
                                "update-bound": float(self.update_bound), "max-weight": float(self.max_weight),
                                "uniform-weights": bool(self.cfg.uniform_weights or self.cfg.dp != "none"),
                                "weight-slot": slot[nid], "num-slots": len(positions), "budget-rank": ranks[nid]})
            requests[nid] = RecordDict({**dict(m.content.items()), REQUEST: req})
        res = secure_sum(grid, requests, train_shapes(current, len(positions)), self.settings, rnd, timeout)
        thin = sorted({slot[n] for n in res.active if sum(slot[a] == slot[n] for a in res.active) < MIN_SECURE_NODES})
        if res.sums is not None and thin:  # dropouts left a rank's slot with fewer than 3 contributors
            res.sums, res.reason = None, (f"secure aggregation: budget rank {sorted(set(ranks.values()))[thin[0]]} "
                                          f"kept fewer than {MIN_SECURE_NODES} nodes after dropouts; sum discarded")
        self.last = res
        self.log.set(secagg_nodes=len(nodes), secagg_active=len(res.active),
                     secagg_dropped=len(nodes) - len(res.active),
                     secagg_bytes_down=res.bytes_down, secagg_bytes_up=res.bytes_up, secagg_time_s=res.seconds,
                     secagg_overhead_s=res.overhead_seconds,
                     secagg_clipping_range=c)
        if res.sums is None:
            self.log.set(secagg_error=res.reason)
            flwr_log(WARNING, "Round %d: %s", rnd, res.reason)
            return [Message(Error(code=ERROR_CODE, reason=res.reason), reply_to=m) for m in messages]
        arrays, info = train_mean(current, res.sums, c, positions, PACKED)
        self.log.set(secagg_quant_bound=quantization_bound(c, self.settings.quantization_range, len(res.active),
                                                           info["min-weight"]))
        if self.cfg.dp == "none":  # with DP an un-noised count of clipped nodes is not released
            self.log.set(secagg_clipped=info["clipped"])
        record = array_record(arrays)
        metrics = {"num-examples": 1, "train-loss": info["train-loss"], "train-acc": info["train-acc"]}
        out = []
        for m in messages:
            nid = m.metadata.dst_node_id
            if nid in res.active:
                out.append(Message(RecordDict({"arrays": record, "metrics": MetricRecord(dict(metrics))}), reply_to=m))
            else:
                out.append(Message(Error(code=ERROR_CODE, reason=res.dropped.get(nid, "secure aggregation: dropped")),
                                   reply_to=m))
        return out


class SecureGrid(_DelegatingGrid):
    """The run's grid for `Strategy.start`: training messages are aggregated with SecAgg+."""

    def __init__(self, grid: Grid, training: SecureTraining):
        self.grid, self.training = grid, training


    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        msgs = list(messages)
        if msgs and all(m.metadata.message_type == MessageType.TRAIN and "arrays" in m.content for m in msgs):
            return self.training.round(self.grid, msgs, timeout)
        return self.grid.send_and_receive(msgs, timeout=timeout)
