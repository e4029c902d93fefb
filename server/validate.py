"""Reply validation: a bad reply is dropped from the round with a reason, never aggregated.

Stock FedAvg sums arrays key-wise without shape checks (a ragged reply silently broadcasts into
garbage), so every reply is checked against what the server sent: exact key set, dtype,
shape, finite values, a sane example count. Arrays are decoded with Flower's `Array.numpy()`,
which loads with allow_pickle=False: received data is never unpickled.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord


class BadReply(ValueError):
    """Reason a reply was dropped (the message is logged and recorded)."""


def _record(msg: Message, name: str, kind: type):
    if name not in msg.content:
        raise BadReply(f"no '{name}' record (got {sorted(msg.content.keys())})")
    rec = msg.content[name]
    if not isinstance(rec, kind):
        raise BadReply(f"'{name}' is a {type(rec).__name__}, expected {kind.__name__}")
    return rec


def decode(record: ArrayRecord, specs: Mapping[str, tuple[tuple[int, ...], str]]) -> dict[str, np.ndarray]:
    """Arrays of a record checked against key -> (shape, dtype kind/name). Raises BadReply."""
    unknown = sorted(set(record.keys()) - set(specs))
    if unknown:
        raise BadReply(f"unknown key '{unknown[0]}'" + (f" (+{len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    missing = sorted(set(specs) - set(record.keys()))
    if missing:
        raise BadReply(f"missing key '{missing[0]}'" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
    out = {}
    for key, (shape, dtype) in specs.items():
        try:
            arr = record[key].numpy()
        except Exception as exc:  # undecodable, object arrays (would need pickle), ...
            raise BadReply(f"'{key}' cannot be decoded: {type(exc).__name__}: {exc}") from None
        if arr.dtype != np.dtype(dtype):
            raise BadReply(f"'{key}' has dtype {arr.dtype}, expected {np.dtype(dtype)}")
        if tuple(arr.shape) != tuple(shape):
            raise BadReply(f"'{key}' has shape {tuple(arr.shape)} (length {arr.size}), expected {tuple(shape)}")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise BadReply(f"'{key}' contains NaN/Inf")
        out[key] = arr
    return out


def num_examples(metrics: MetricRecord, key: str = "num-examples", required: bool = True) -> int:
    """A non-negative integer count (absent and not required: 0)."""
    if key not in metrics and required:
        raise BadReply(f"metrics lack '{key}'")
    n = metrics.get(key, 0)
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not np.isfinite(n) or n < 0 or float(n) != int(n):
        raise BadReply(f"'{key}' must be a non-negative integer, got {n!r}")
    return int(n)


def check_error(msg: Message) -> None:
    if msg.has_error():
        raise BadReply(f"client error: {msg.error.reason}")


def train_reply(msg: Message, specs: Mapping[str, tuple[tuple[int, ...], str]]) -> tuple[dict[str, np.ndarray], int, dict]:
    """(arrays, num-examples, metrics dict) of a training reply, or BadReply."""
    check_error(msg)
    metrics = _record(msg, "metrics", MetricRecord)
    n = num_examples(metrics)
    arrays = decode(_record(msg, "arrays", ArrayRecord), specs)
    return arrays, n, {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def eval_reply(msg: Message) -> tuple[int, dict]:
    check_error(msg)
    metrics = _record(msg, "metrics", MetricRecord)
    n = num_examples(metrics)
    for k in ("eval-loss", "eval-acc"):
        if k not in metrics or not np.isfinite(float(metrics[k])):
            raise BadReply(f"metrics lack a finite '{k}'")
    return n, {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def mask_reply(msg: Message, version: int) -> int:
    """The node's budget rank from its mask-delivery reply (0 = the whole mask), or BadReply."""
    check_error(msg)
    info = _record(msg, "info", MetricRecord)
    if info.get("mask-version") != version:
        raise BadReply(f"acknowledged mask version {info.get('mask-version')!r}, expected {version}")
    return num_examples(info, "budget-rank", required=False)


def stats_reply(msg: Message, stats_specs, vote_specs=None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None, dict]:
    """(stats arrays, vote arrays or None, info) of a statistics reply, or BadReply."""
    check_error(msg)
    info = _record(msg, "info", MetricRecord)
    stats = decode(_record(msg, "stats", ArrayRecord), stats_specs)
    for key, arr in stats.items():
        if key.endswith(".ss") and (arr < 0).any():
            raise BadReply(f"'{key}' has negative sums of squares")
        if key.endswith(".n") and arr[0] <= 0:
            raise BadReply(f"'{key}' row count must be > 0")
    votes = None
    if vote_specs is not None:
        rec = _record(msg, "votes", ArrayRecord)
        votes = {}
        unknown = sorted(set(rec.keys()) - set(vote_specs))
        if unknown or set(vote_specs) - set(rec.keys()):
            raise BadReply(f"vote keys differ from the target modules (e.g. '{(unknown or sorted(vote_specs))[0]}')")
        for key, size in vote_specs.items():
            arr = rec[key].numpy()
            if arr.dtype.kind not in "iu" or arr.ndim != 1 or (arr.size and (arr.min() < 0 or arr.max() >= size)) \
                    or np.unique(arr).size != arr.size:
                raise BadReply(f"'{key}' must be unique integer indices in [0, {size})")
            votes[key] = arr.astype(np.int64)
    return stats, votes, {"num-examples": num_examples(info)}
