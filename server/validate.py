"""Reply validation: every field a client sends is checked before use; a bad reply is dropped with a reason.

Flower's FedAvg sums arrays key-wise without shape checks (a ragged reply is silently broadcast into
garbage), so every reply is checked against what the server sent and what it can justify:

* arrays: exact key set; dtype, shape and byte size read from the record's metadata BEFORE anything
  is decoded (a 400 MB array is refused unread); the payload must be a plain numpy array
  (`Array.numpy()` loads with allow_pickle=False: received data is never unpickled, and an `.npz`
  archive is refused); after decoding, the same dtype and shape again, finite values, and
  |value| <= MAX_ABS (no trained weight, delta or statistic of these models comes near it).
* counts (num-examples, budget rank, row counts): integral, finite, within limits the server set
  (`max-examples`, the calibration size times the rows one example makes in that module).
* metrics: finite scalars; losses >= 0, accuracies in [0, 1]; lists are refused.
Any other exception while reading a reply is turned into a BadReply by the caller (the guard and the
phases catch everything per reply), so one reply can never stop a round.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import io

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord

from common.classes import check_names

MAX_ABS = 1e6  # largest credible |value| of a trained array entry
MAX_MEAN_SQUARE = 1e24  # largest credible per-column mean square of an activation (RMS 1e12)
HEADER_BYTES = 1024  # room for the .npy header in a serialized Array

Spec = tuple[tuple[int, ...], str]  # (shape, dtype name)


class BadReply(ValueError):
    """Reason a reply was dropped (the message is logged and recorded)."""


def _record(msg: Message, name: str, kind: type):
    if name not in msg.content:
        raise BadReply(f"no '{name}' record (got {sorted(msg.content.keys())})")
    rec = msg.content[name]
    if not isinstance(rec, kind):
        raise BadReply(f"'{name}' is a {type(rec).__name__}, expected {kind.__name__}")
    return rec


def _keys(record: ArrayRecord, expected) -> None:
    unknown = sorted(set(record.keys()) - set(expected))
    if unknown:
        raise BadReply(f"unknown key '{unknown[0]}'" + (f" (+{len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    missing = sorted(set(expected) - set(record.keys()))
    if missing:
        raise BadReply(f"missing key '{missing[0]}'" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))


_HEADERS: dict[tuple[str, tuple[int, ...]], bytes] = {}


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The exact .npy header `np.save` (Flower's `Array(ndarray)`) writes for a C-ordered array."""
    key = (dtype.str, shape)
    if key not in _HEADERS:
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                   "fortran_order": False, "shape": shape})
        _HEADERS[key] = buf.getvalue()
    return _HEADERS[key]


def npy_view(a: Array, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """`a.numpy()` without parsing the .npy header: when the payload is exactly the header np.save writes for
    (dtype, shape) followed by the data, a read-only zero-copy view of it; anything else goes through
    `Array.numpy()` (np.load, allow_pickle=False), as before. The values are the same either way."""
    head = _npy_header(dtype, shape)
    data = a.data
    if isinstance(data, bytes) and len(data) == len(head) + math.prod(shape) * dtype.itemsize and data.startswith(head):
        return np.frombuffer(data, dtype=dtype, offset=len(head)).reshape(shape)
    return a.numpy()


class DecodedArray(Array):
    """An `Array` already validated and decoded once (by the reply guard): `numpy()` returns a fresh writable
    copy of the decoded values (what `np.load` returned, without parsing the header again), `view` the
    read-only decoded array itself. Same fields and bytes as the original (byte accounting unchanged)."""

    view: np.ndarray

    @classmethod
    def of(cls, a: Array, view: np.ndarray) -> "DecodedArray":
        out = cls.__new__(cls)
        out.__dict__.update(a.__dict__)
        out.view = view
        return out

    def numpy(self) -> np.ndarray:
        return np.array(self.view)


def decoded_view(a: Array) -> np.ndarray:
    """The read-only decoded values of an Array (no copy when the guard decoded it already)."""
    return a.view if isinstance(a, DecodedArray) else a.numpy()


def decode_array(record: ArrayRecord, key: str, shape: tuple[int, ...] | None, dtype: str,
                 max_len: int | None = None, copy: bool = True, bound: float | None = None) -> np.ndarray:
    """One array, checked from its metadata before decoding. shape None: 1-D of at most `max_len`.
    copy False: the array may be a read-only view of the received bytes (nothing is copied).
    bound: float entries must also satisfy |value| <= bound (checked from the same min / max)."""
    a = record[key]
    if a.stype != "numpy.ndarray":
        raise BadReply(f"'{key}' is serialized as {a.stype!r}, expected a plain numpy array")
    want = np.dtype(dtype)
    if str(a.dtype) != want.name:
        raise BadReply(f"'{key}' has dtype {a.dtype}, expected {want.name}")
    got = tuple(int(d) for d in a.shape)
    if shape is not None and got != tuple(shape):
        raise BadReply(f"'{key}' has shape {got} (length {math.prod(got)}), expected {tuple(shape)}")
    if shape is None and (len(got) != 1 or got[0] > max_len):
        raise BadReply(f"'{key}' has shape {got}, expected a 1-D array of at most {max_len} entries")
    if len(a.data) > math.prod(got) * want.itemsize + HEADER_BYTES:
        raise BadReply(f"'{key}' carries {len(a.data)} bytes for a {got} {want.name} array")
    try:
        arr = npy_view(a, want, got)  # read-only; a.numpy() unless the payload is the canonical .npy
    except Exception as exc:  # noqa: BLE001 - undecodable, object arrays (would need pickle), archives, ...
        raise BadReply(f"'{key}' cannot be decoded: {type(exc).__name__}: {exc}") from None
    if not isinstance(arr, np.ndarray) or arr.dtype != want or arr.shape != got:
        raise BadReply(f"'{key}' decodes to {type(arr).__name__} {getattr(arr, 'dtype', '?')} "
                       f"{getattr(arr, 'shape', '?')}, not the declared {want.name} {got}")
    if arr.dtype.kind == "f" and arr.size:
        lo, hi = float(arr.min()), float(arr.max())  # min/max propagate NaN and reach +-Inf: no temporaries
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise BadReply(f"'{key}' contains NaN/Inf")
        if bound is not None and (top := max(-lo, hi)) > bound:
            raise BadReply(f"'{key}' has |value| {top:.3g} > {bound:g}")  # = max |value|
    return arr if not copy or arr.flags.writeable else arr.copy()


def decode(record: ArrayRecord, specs: Mapping[str, Spec], copy: bool = True,
           bound: float | None = None) -> dict[str, np.ndarray]:
    """Arrays of a record checked against key -> (shape, dtype). Raises BadReply."""
    _keys(record, specs)
    return {key: decode_array(record, key, shape, dtype, copy=copy, bound=bound) for key, (shape, dtype) in specs.items()}


def count(metrics: MetricRecord, key: str, limit: int, required: bool = True) -> int:
    """A non-negative integer count <= limit (absent and not required: 0)."""
    if key not in metrics:
        if required:
            raise BadReply(f"metrics lack '{key}'")
        return 0
    n = metrics[key]
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or n < 0 or n != int(n):
        raise BadReply(f"'{key}' must be a non-negative integer, got {n!r}")
    if n > limit:
        raise BadReply(f"'{key}' is {int(n)}, more than the limit {limit}")
    return int(n)


def scalar_metrics(metrics: MetricRecord, required: tuple[str, ...] = ()) -> dict[str, float]:
    """Every metric a finite number; '*-loss' >= 0, '*-acc' in [0, 1]; `required` keys present."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise BadReply(f"metric '{k}' must be a finite number, got {type(v).__name__} {v!r:.40}")
        if (k.endswith("-loss") and v < 0) or (k.endswith("-acc") and not 0 <= v <= 1):
            raise BadReply(f"metric '{k}' is {v}, outside its range")
        out[k] = float(v)
    for k in required:
        if k not in out:
            raise BadReply(f"metrics lack '{k}'")
    return out


def check_error(msg: Message, records: tuple[str, ...]) -> None:
    """No error, and exactly the expected records (nothing extra a later step might trip on)."""
    if msg.has_error():
        raise BadReply(f"client error: {msg.error.reason}")
    if sorted(msg.content.keys()) != sorted(records):
        raise BadReply(f"records {sorted(msg.content.keys())}, expected {sorted(records)}")


def train_reply(msg: Message, specs: Mapping[str, Spec], max_examples: int) -> tuple[dict[str, np.ndarray], int, dict]:
    """(arrays, num-examples, metrics) of a training reply, or BadReply. The arrays are read-only (views of the
    received bytes where possible); `DecodedArray.of` lets later steps reuse them without decoding again."""
    check_error(msg, ("arrays", "metrics"))
    metrics = _record(msg, "metrics", MetricRecord)
    n = count(metrics, "num-examples", max_examples)
    m = scalar_metrics(metrics)
    return decode(_record(msg, "arrays", ArrayRecord), specs, copy=False, bound=MAX_ABS), n, m


def eval_reply(msg: Message, max_examples: int) -> tuple[int, dict]:
    check_error(msg, ("metrics",))
    metrics = _record(msg, "metrics", MetricRecord)
    return count(metrics, "num-examples", max_examples), scalar_metrics(metrics, ("eval-loss", "eval-acc"))


def mask_reply(msg: Message, version: int) -> int:
    """The node's budget rank from its mask-delivery reply (0 = the whole mask), or BadReply."""
    check_error(msg, ("info",))
    info = _record(msg, "info", MetricRecord)
    if info.get("mask-version") != version:
        raise BadReply(f"acknowledged mask version {info.get('mask-version')!r}, expected {version}")
    return count(info, "budget-rank", 2**31, required=False)


def stats_reply(msg: Message, shapes: Mapping[str, tuple[int, ...]], rows_per_example: Mapping[str, int], calib_size: int,
                max_examples: int, vote_sizes: Mapping[str, int] | None = None,
                grad_shapes: Mapping[str, tuple[int, int]] | None = None
                ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None, dict]:
    """(stats arrays, vote arrays or None, info) of a statistics reply, or BadReply.

    shapes: module -> statistic shape; rows_per_example: module -> rows one calibration example
    adds to that module's count, so a row count must be a multiple of it and at most
    `calib_size` examples' worth (the sum over clients then cannot overflow). grad_shapes
    (score='gradient'): module -> (rows, width) of the signed gradient sums, sent as float32 (half
    the bytes of float64; autograd summed them in float32) and returned in the stats as '<module>.g'
    in float64 (finite, |value| <= MAX_ABS), so the server adds them up in float64."""
    expected = ("info", "stats") + (("votes",) if vote_sizes is not None else ()) + (("grads",) if grad_shapes else ())
    check_error(msg, expected)
    info = _record(msg, "info", MetricRecord)
    n_train = count(info, "num-examples", max_examples)
    rec = _record(msg, "stats", ArrayRecord)
    _keys(rec, [f"{m}.{p}" for m in shapes for p in ("ss", "n")])
    stats = {}
    for name, shape in shapes.items():
        ss = decode_array(rec, f"{name}.ss", shape, "float64")
        n = int(decode_array(rec, f"{name}.n", (1,), "int64")[0])
        rows = rows_per_example[name]
        if n <= 0 or n % rows or n // rows > calib_size:
            raise BadReply(f"'{name}.n' is {n}: expected a positive multiple of {rows} rows per example, "
                           f"for at most calib-size={calib_size} examples")
        if (ss < 0).any() or (ss / n > MAX_MEAN_SQUARE).any():
            raise BadReply(f"'{name}.ss' must be sums of squares in [0, {MAX_MEAN_SQUARE:g} x rows]")
        stats[f"{name}.ss"], stats[f"{name}.n"] = ss, np.array([n], np.int64)
    votes = None
    if vote_sizes is not None:
        vrec = _record(msg, "votes", ArrayRecord)
        _keys(vrec, vote_sizes)
        votes = {}
        for key, size in vote_sizes.items():
            arr = decode_array(vrec, key, None, "int64", max_len=size)
            if arr.size and (arr.min() < 0 or arr.max() >= size or np.unique(arr).size != arr.size):
                raise BadReply(f"'{key}' must be unique integer indices in [0, {size})")
            votes[key] = arr
    if grad_shapes:
        specs = {f"{m}.g": (shape, "float32") for m, shape in grad_shapes.items()}
        grads = decode(_record(msg, "grads", ArrayRecord), specs, copy=False, bound=MAX_ABS)
        stats.update({k: v.astype(np.float64) for k, v in grads.items()})
    return stats, votes, {"num-examples": n_train}


def within_submask(values: np.ndarray, sent: np.ndarray, positions: np.ndarray) -> None:
    """A nested-budget node's packed vector: every entry outside its sub-mask (`positions`) unchanged."""
    outside = np.ones(values.size, bool)
    outside[np.asarray(positions)] = False
    changed = int(np.count_nonzero(values.reshape(-1)[outside] != sent.reshape(-1)[outside]))
    if changed:
        raise BadReply(f"{changed} packed entries outside the node's budget-rank sub-mask differ from what was sent "
                       f"(a node trains only its own sub-mask)")


def classes_reply(msg: Message) -> tuple[list[str], int]:
    """(class names of a node's data, the image size it feeds the model) from its ConfigRecord 'classes',
    or BadReply."""
    check_error(msg, ("classes",))
    rec = _record(msg, "classes", ConfigRecord)
    names = rec.get("class-names")
    try:
        check_names(names if isinstance(names, list) else None)
    except ValueError as exc:
        raise BadReply(f"'class-names': {exc}") from None
    size = rec.get("input-size")
    if isinstance(size, bool) or not isinstance(size, int) or not 8 <= size <= 4096:
        raise BadReply(f"'input-size' must be an integer in [8, 4096], got {size!r}")
    return list(names), size
