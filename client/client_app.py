"""ClientApp (Flower Message API): statistics, mask, train and evaluate handlers.

Thin by design: it unpacks messages, keeps the mask in `context.state` (sent once per mask
version by the `query.mask` phase) and calls the plain functions of `common/`. Every message's
ConfigRecord carries the run configuration the server runs with (the server's run config is
authoritative: `run_simulation` gives clients none). Node config (deployment): `partition-id`,
`num-partitions`, optional `data-path` (local folder instead of the simulated partition),
`budget-rank` (a smaller device budget: the node trains the nested sub-mask of that rank) and
`num-threads` (torch threads; default: run config `client-threads`).

Backbone check: the statistics query carries the server's `backbone-sha256` (common.models.
backbone_fingerprint of its frozen pre-trained model). A node whose own backbone hashes otherwise
refuses that query, and every later mask / train / evaluate message, with both fingerprints named.
"""
from __future__ import annotations

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from common.taskedge.allocation import Mask
from common.local import local_eval, local_gradients, local_stats, local_train, local_vote
from common.registry import MASK_METHODS
from common.methods import (base_fingerprint, base_model, get_arrays, method_model, node_mask,
                            set_arrays)
from common.architectures import EMBEDDED_MODELS
from common.backbones import WEIGHTS_ENV, shipped_weights
from common.models import BACKBONE_KEY, BackboneMismatch
from common.partition import node_class_names, node_data, node_input_size
from common.settings import CLIENT_KEYS, AppConfig, parse_run_config
from common.taskedge.scores import get_score
from common.wire import put, take

from .codec import value_codec_mod
from .privacy import RANK_FLOOR, privacy_mods


def _config(msg: Message, context: Context) -> AppConfig:
    """The run config as the server sent it; also sets this process's torch threads."""
    sent = {k: v for k, v in msg.content["config"].items() if k in CLIENT_KEYS}
    cfg = parse_run_config({**context.run_config, **sent})
    torch.set_num_threads(int(context.node_config.get("num-threads", cfg.client_threads)))
    return cfg


BACKBONE_STATE = "backbone"  # context.state: the server's fingerprint, as the statistics query sent it


def _backbone_source(cfg: AppConfig) -> str:
    """Where this node's frozen backbone came from, for the mismatch error."""
    if cfg.weights_path == "hub":
        return f"{cfg.model} from the hub"
    if cfg.weights_path:
        return f"weights-path {cfg.weights_path!r} on this node"
    if cfg.model in EMBEDDED_MODELS:
        return f"embedded weights {shipped_weights(cfg.model) or '(pre-trained here)'}"
    return f"random init of {cfg.model} (seed {cfg.seed})"


def _check_backbone(msg: Message, context: Context, cfg: AppConfig) -> None:
    """Refuse to work on another frozen backbone than the server's.

    The server's fingerprint comes with the statistics query (message config, not a run-config key) and is
    kept in the node's state, so the mask, train and evaluate messages that follow are refused too; a
    message with no fingerprint, before any was received, is not checked."""
    conf = msg.content.get("config")
    expected = conf.get(BACKBONE_KEY) if conf is not None else None
    if expected:
        context.state[BACKBONE_STATE] = ConfigRecord({BACKBONE_KEY: str(expected)})
    elif BACKBONE_STATE in context.state:
        expected = context.state[BACKBONE_STATE][BACKBONE_KEY]
    else:
        return
    own = base_fingerprint(cfg.model, cfg.head_size, cfg.weights_path, cfg.seed, cfg.img_size)
    if own != str(expected):
        raise BackboneMismatch(
            f"backbone mismatch: this node's {cfg.model} hashes to {own[:12]}, the server's to {str(expected)[:12]} "
            f"(sha256 of the frozen weights as loaded, head excluded; this node: {_backbone_source(cfg)}); it refuses "
            f"to train deltas for another backbone: give it the server's weights (the same weights-path file; for an "
            f"embedded model {WEIGHTS_ENV} at the shipped common/weights/, which python -m "
            f"simulations.pretrain_backbone --check verifies) and restart it")


def _rank(cfg: AppConfig, context: Context, conf: ConfigRecord | None = None) -> int:
    """This node's budget rank; a secure round may raise it (`RANK_FLOOR`: rank groups of >= 3 nodes)."""
    own = int(context.node_config.get("budget-rank", cfg.ranks_for(int(context.node_config.get("partition-id", 0)))))
    return max(own, int(conf.get(RANK_FLOOR, 0))) if conf is not None else own


def _arrays(record: ArrayRecord) -> dict:
    return {k: v.numpy() for k, v in record.items()}


def _record(arrays: dict) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


def _model(msg: Message, context: Context, cfg: AppConfig):
    """(model loaded with this node's share of the server's arrays, received arrays, positions)."""
    _check_backbone(msg, context, cfg)
    received = _arrays(msg.content["arrays"])
    mask, positions = None, None
    if cfg.method in MASK_METHODS:
        version = int(msg.content["config"]["mask-version"])
        if "mask" not in context.state or int(context.state["mask-meta"]["version"]) != version:
            raise RuntimeError(f"this node holds no mask version {version} (it joined after the mask phase or "
                               f"lost its state); the server must resend it")
        mask, positions = node_mask(cfg.method, Mask.from_arrays(_arrays(context.state["mask"])),
                                    _rank(cfg, context, msg.content["config"]))
    model = method_model(cfg, mask)
    set_arrays(cfg.method, model, take(received, positions))
    return model, received, positions


def stats(msg: Message, context: Context) -> Message:
    """Sum-of-squares statistics of the local calibration data (plus local top-k when voting, and the
    signed calibration-gradient sums for score='gradient')."""
    cfg = _config(msg, context)
    _check_backbone(msg, context, cfg)
    tcfg, data = cfg.taskedge_config(), node_data(cfg, context.node_config)
    model = base_model(cfg.model, cfg.head_size, cfg.weights_path, cfg.seed, cfg.img_size)
    st = local_stats(model, tcfg, data.x_calib, cfg.batch_size)
    content = RecordDict({"stats": _record(st), "info": MetricRecord({"num-examples": len(data.x_train),
                                                                      "calib-examples": len(data.x_calib)})})
    if cfg.reconcile == "vote":
        content["votes"] = _record(local_vote(model, tcfg, st))
    if get_score(tcfg.score).needs_gradients:
        content["grads"] = _record(local_gradients(model, tcfg, data.x_calib, data.y_calib, cfg.batch_size))
    return Message(content, reply_to=msg)


def classes(msg: Message, context: Context) -> Message:
    """The class names of this node's dataset: the server fixes the federation's classes from them."""
    cfg = _config(msg, context)
    return Message(RecordDict({"classes": ConfigRecord({"class-names": node_class_names(cfg, context.node_config),
                                                        "input-size": node_input_size(cfg, context.node_config)})}),
                   reply_to=msg)


def install_mask(msg: Message, context: Context) -> Message:
    """Keep the global mask (indices and ranks) for the training rounds; answer with the budget rank."""
    cfg = _config(msg, context)
    _check_backbone(msg, context, cfg)
    version = int(msg.content["config"]["mask-version"])
    Mask.from_arrays(_arrays(msg.content["mask"]))  # validate before keeping it
    context.state["mask"] = msg.content["mask"]
    context.state["mask-meta"] = ConfigRecord({"version": version})
    return Message(RecordDict({"info": MetricRecord({"mask-version": version, "budget-rank": _rank(cfg, context)})}),
                   reply_to=msg)


def train(msg: Message, context: Context) -> Message:
    """E local epochs on the received values; reply with the full-length arrays (same keys and shapes)."""
    cfg = _config(msg, context)
    model, received, positions = _model(msg, context, cfg)
    data = node_data(cfg, context.node_config)
    conf = msg.content["config"]
    rnd = int(conf.get("round-offset", 0)) + int(conf["server-round"])
    seed = cfg.seed * 100_003 + rnd * 1_009 + int(context.node_config.get("partition-id", 0))
    res = local_train(model, data.x_train, data.y_train, epochs=cfg.local_epochs, batch_size=cfg.batch_size,
                      lr=cfg.lr, seed=seed)
    arrays = put(received, get_arrays(cfg.method, model), positions)
    content = RecordDict({
        "arrays": _record({k: arrays[k] for k in received}),
        "metrics": MetricRecord({"num-examples": int(res["examples"]), "train-loss": float(res["loss"]),
                                 "train-acc": float(res["acc"])}),
    })
    return Message(content, reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    """Loss / accuracy of the received model (this node's share of it) on the local test split."""
    cfg = _config(msg, context)
    model, _, _ = _model(msg, context, cfg)
    data = node_data(cfg, context.node_config)
    res = local_eval(model, data.x_test, data.y_test)
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": int(res["examples"]),
                                                        "eval-loss": float(res["loss"]),
                                                        "eval-acc": float(res["acc"])})}), reply_to=msg)


def train_only(mod):
    """Apply a Flower mod to training messages only.

    flwr 1.42's `fixedclipping_mod` / `adaptiveclipping_mod` say they operate on train messages but
    check every message for exactly one ArrayRecord with a clipping norm, so they turn this app's
    statistics, mask and evaluate messages into errors; wrapped here, those pass straight through.
    """
    def mod_for_train(msg: Message, context: Context, call_next):
        if msg.metadata.message_type == MessageType.TRAIN:
            return mod(msg, context, call_next)
        return call_next(msg, context)

    return mod_for_train


def create_app(mods: tuple = ()) -> ClientApp:
    """The ClientApp with these handlers, behind Flower mods (DP clipping mods: wrap in `train_only`).

    `value_codec_mod` (client/codec.py: value-dtype float16 / int8) is the outermost, so every other mod
    and handler sees float32 arrays. The privacy mods (client/privacy.py: SecAgg+, DP clipping, uniform
    weights) come next; they act only on messages that ask for them, so one app serves plain and private runs."""
    client = ClientApp(mods=[value_codec_mod, *privacy_mods(lambda m, c: client(m, c)), *mods])
    client.query("classes")(classes)
    client.query("stats")(stats)
    client.query("mask")(install_mask)
    client.train()(train)
    client.evaluate()(evaluate)
    return client


app = create_app()
