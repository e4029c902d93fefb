"""ClientApp (Flower Message API): statistics query, train and evaluate handlers.

Thin by design: it unpacks messages, keeps the mask in `context.state` (it is sent once per
mask version) and calls the plain functions in client/task.py and client/methods.py.
Node config (deployment): `partition-id`, `num-partitions`, optional `data-path` (local
folder, replaces the simulated partition) and `budget-rank` (smaller device budget).
"""
from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.data import load_local_data
from client.methods import base_model, build, get_arrays, set_arrays
from client.settings import CLIENT_KEYS, AppConfig, parse_run_config
from client.task import local_eval, local_stats, local_train, local_vote, mask_from_wire, taskedge_config
from common.data import get_task

app = ClientApp()


def _setup(msg: Message, context: Context) -> tuple[AppConfig, int, int]:
    """Run config, overridden by the server's setup (sent on first contact, cached in the state).

    The server's run config is authoritative: `run_simulation` gives clients no run config.
    """
    if "setup" in msg.content:
        context.state["setup"] = msg.content["setup"]
    elif "setup" not in context.state:
        raise RuntimeError("no cached setup (state lost?); the server must resend it")
    sent = {k: v for k, v in context.state["setup"].items() if k in CLIENT_KEYS}
    cfg = parse_run_config({**context.run_config, **sent})
    nc = context.node_config
    pid = int(nc.get("partition-id", 0))
    parts = cfg.num_partitions or int(nc.get("num-partitions", 1))
    return cfg, pid, parts


def _data(msg: Message, context: Context):
    cfg, pid, parts = _setup(msg, context)
    return load_local_data(cfg.task, pid, parts, partitioner=cfg.partitioner, alpha=cfg.alpha, seed=cfg.seed,
                           test_fraction=cfg.test_fraction, calib_size=cfg.calib_size,
                           data_path=str(context.node_config.get("data-path", "")))


def _budget_rank(msg: Message, context: Context) -> int:
    cfg, pid, _ = _setup(msg, context)
    return int(context.node_config.get("budget-rank", cfg.ranks_for(pid)))


def _arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def _base(cfg: AppConfig):
    return base_model(cfg.model, get_task(cfg.task).num_classes, cfg.weights_path, cfg.seed)


def _model(msg: Message, context: Context):
    """Pre-trained model + this method's trainable part, loaded with the server's values."""
    cfg, _, _ = _setup(msg, context)
    conf = msg.content["config"]
    method = cfg.method
    mask = None
    if method == "taskedge":
        version = int(conf["mask-version"])
        if "mask" in msg.content:  # first contact or re-reconciliation: cache it
            context.state["mask"] = msg.content["mask"]
            context.state["mask-meta"] = ConfigRecord({"version": version})
        elif "mask" not in context.state or int(context.state["mask-meta"]["version"]) != version:
            raise RuntimeError(f"no cached mask for version {version}; the server must resend it")
        mask = mask_from_wire(_arrays(context.state["mask"]))
    model = build(method, _base(cfg), taskedge_config(cfg.to_dict()), mask, cfg.lora_rank, cfg.seed)
    set_arrays(method, model, _arrays(msg.content["arrays"]))
    return model, method


@app.query("stats")
def stats(msg: Message, context: Context) -> Message:
    """Sum-of-squares statistics of the local calibration data (plus local top-k when voting)."""
    cfg, _, _ = _setup(msg, context)
    tcfg = taskedge_config(cfg.to_dict())
    data = _data(msg, context)
    model = _base(cfg)
    st = local_stats(model, tcfg, data.x_calib, cfg.batch_size)
    content = RecordDict({
        "stats": ArrayRecord({k: Array(v) for k, v in st.items()}),
        "info": MetricRecord({"num-examples": len(data.x_train), "calib-examples": len(data.x_calib),
                              "budget-rank": _budget_rank(msg, context)}),
    })
    if cfg.reconcile == "vote":
        content["votes"] = ArrayRecord({k: Array(v) for k, v in local_vote(model, tcfg, st).items()})
    return Message(content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """E local epochs on the received values; reply with the updated values in mask order."""
    cfg, pid, _ = _setup(msg, context)
    model, method = _model(msg, context)
    data = _data(msg, context)
    seed = cfg.seed * 100_003 + int(msg.content["config"]["server-round"]) * 1_009 + pid
    res = local_train(model, data.x_train, data.y_train, epochs=cfg.local_epochs, batch_size=cfg.batch_size,
                      lr=cfg.lr, seed=seed)
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in get_arrays(method, model).items()}),
        "metrics": MetricRecord({"num-examples": int(res["examples"]), "train-loss": float(res["loss"]),
                                 "train-acc": float(res["acc"])}),
    })
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Loss / accuracy of the received model on the local test split."""
    model, _ = _model(msg, context)
    data = _data(msg, context)
    res = local_eval(model, data.x_test, data.y_test)
    content = RecordDict({"metrics": MetricRecord({"num-examples": int(res["examples"]),
                                                   "eval-loss": float(res["loss"]),
                                                   "eval-acc": float(res["acc"])})})
    return Message(content, reply_to=msg)
