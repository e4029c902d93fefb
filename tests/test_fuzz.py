"""Property-based fuzzing of everything a client can send: generated replies through the real reply
guard + strategy (`aggregate_train`) and the real statistics / vote reply handler.

Every generated round mixes good replies with malformed ones (wrong keys, shapes, dtypes, payloads
that lie about their size or type, non-finite or absurd values and counts, bad metrics, error
replies, duplicates, replies to nothing). Properties: no exception escapes; every bad reply is
rejected with a reason; the good ones are aggregated exactly (against a hand numpy mean).
6,000 + 4,000 examples, derandomized so CI sees the same cases every time.
"""
import io
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.settings import parse_run_config
from common.taskedge.stats import arrays_to_norms, median_stats, sum_stats
from server import validate
from server.guard import ReplyGuard
from server.inprocess import InProcessGrid
from server.messages import stamp
from server.recorder import RoundLog
from server.strategy import make_strategy

SHAPES = {"values": (12,), "head.weight": (3, 2), "head.bias": (3,)}
NODES = 4
MAX_EXAMPLES = 1000
FUZZ = settings(max_examples=6000, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))

BAD_TRAIN = ["error", "no-arrays", "extra-record", "key-extra", "key-missing", "shape", "shape-2d", "dtype64",
             "dtype-int", "nan", "inf", "huge", "count-neg", "count-frac", "count-huge", "count-inf", "count-nan",
             "count-list", "count-missing", "metric-nan", "metric-list", "acc-range", "npz", "stype",
             "size-lie", "shape-lie", "object", "config-empty"]
KINDS = ["good", "good", "good", "zero"] + BAD_TRAIN


def _npy(arr: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


def _reply_to(msg: Message, kind: str, rng: np.random.Generator, n: int) -> Message:
    """A training reply of the given kind to `msg` (values in [-1, 1], n examples)."""
    if kind == "error":
        return Message(Error(code=1, reason="boom"), reply_to=msg)
    arrays = {k: rng.uniform(-1, 1, s).astype(np.float32) for k, s in SHAPES.items()}
    items = {k: Array(v) for k, v in arrays.items()}
    metrics = {"num-examples": n, "train-loss": float(rng.uniform(0, 3)), "train-acc": float(rng.uniform(0, 1))}
    records = {}
    if kind == "key-extra":
        items["extra"] = Array(np.zeros(2, np.float32))
    elif kind == "key-missing":
        items.pop("head.bias")
    elif kind in ("shape", "shape-2d", "dtype64", "dtype-int", "nan", "inf", "huge"):
        v = arrays["values"]
        v = {"shape": v[:-1], "shape-2d": v.reshape(12, 1), "dtype64": v.astype(np.float64),
             "dtype-int": v.astype(np.int32)}.get(kind, v)
        if kind in ("nan", "inf", "huge"):
            v = v.copy()
            v[int(rng.integers(12))] = {"nan": np.nan, "inf": -np.inf, "huge": 1e30}[kind]
        items["values"] = Array(v)
    elif kind == "npz":
        buf = io.BytesIO()
        np.savez(buf, values=arrays["values"])
        items["values"] = Array(dtype="float32", shape=(12,), stype="numpy.ndarray", data=buf.getvalue())
    elif kind == "stype":
        items["values"] = Array(dtype="float32", shape=(12,), stype="torch.Tensor", data=_npy(arrays["values"]))
    elif kind == "size-lie":  # declares the expected shape, carries 100k floats
        items["values"] = Array(dtype="float32", shape=(12,), stype="numpy.ndarray",
                                data=_npy(np.zeros(100_000, np.float32)))
    elif kind == "shape-lie":  # declares (12,), decodes to (11,)
        items["values"] = Array(dtype="float32", shape=(12,), stype="numpy.ndarray", data=_npy(arrays["values"][:11]))
    elif kind == "object":
        items["values"] = Array(dtype="float32", shape=(12,), stype="numpy.ndarray",
                                data=_npy(np.array([object()] * 12), allow_pickle=True))
    elif kind.startswith("count-"):
        bad = {"count-neg": -5, "count-frac": 1.5, "count-huge": 1e18, "count-inf": math.inf, "count-nan": math.nan,
               "count-list": [1, 2]}
        if kind == "count-missing":
            metrics.pop("num-examples")
        else:
            metrics["num-examples"] = bad[kind]
    elif kind == "metric-nan":
        metrics["train-loss"] = math.nan
    elif kind == "metric-list":
        metrics["train-loss"] = [1.0, 2.0]
    elif kind == "acc-range":
        metrics["train-acc"] = 2.0
    elif kind == "extra-record":
        records["extra"] = MetricRecord({"x": 1})
    elif kind == "config-empty":
        records["config"] = ConfigRecord({"note": ""})
    content = RecordDict({"metrics": MetricRecord(metrics), **records})
    if kind != "no-arrays":
        content["arrays"] = ArrayRecord(items)
    return Message(content, reply_to=msg)


@pytest.fixture(scope="module")
def grid():
    return InProcessGrid(client_app=None, num_nodes=NODES)  # only its node list is used


@FUZZ
@given(kinds=st.lists(st.sampled_from(KINDS), min_size=NODES, max_size=NODES),
       dups=st.lists(st.sampled_from(["none", "dup", "stray"]), min_size=NODES, max_size=NODES),
       counts=st.lists(st.integers(1, MAX_EXAMPLES), min_size=NODES, max_size=NODES),
       seed=st.integers(0, 2**32 - 1))
def test_training_replies(grid, kinds, dups, counts, seed):
    rng = np.random.default_rng(seed)
    current = {k: rng.uniform(-1, 1, s).astype(np.float32) for k, s in SHAPES.items()}
    log = RoundLog()
    strategy = make_strategy(parse_run_config({"min-nodes": 1, "fraction-evaluate": 0.0}), None, nested=False)
    guard = ReplyGuard(strategy, log, min_replies=1, max_examples=MAX_EXAMPLES)
    sent = [stamp(m) for m in guard.configure_train(1, ArrayRecord({k: Array(v) for k, v in current.items()}),
                                                     ConfigRecord({}), grid)]
    replies, good, want_drops = [], {}, 0
    for i, (msg, kind, extra, n) in enumerate(zip(sent, kinds, dups, counts)):
        n = 0 if kind == "zero" else n
        reply = _reply_to(msg, kind, np.random.default_rng([seed, i]), n)
        replies.append(reply)
        if kind == "good":
            good[msg.metadata.dst_node_id] = (reply, n)
        want_drops += kind not in ("good", "zero")
        if extra == "dup":  # the same reply twice: whichever arrives second is dropped
            replies.append(_reply_to(msg, kind, np.random.default_rng([seed, i]), n))
            want_drops += 1
        elif extra == "stray":  # a reply to a message this round never sent
            replies.append(_reply_to(stamp(Message(RecordDict(), dst_node_id=99, message_type="train")), "good", rng, 1))
            want_drops += 1
    rng.shuffle(replies)
    arrays, _ = guard.aggregate_train(1, replies)  # must not raise, whatever came back
    assert len(log.dropped) == want_drops and all(d["reason"] for d in log.dropped)
    if not good:
        assert arrays is None and log.rec["skipped"]
        return
    total = sum(n for _, n in good.values())
    for key in SHAPES:
        hand = sum(n * r.content["arrays"][key].numpy().astype(np.float64) for r, n in good.values()) / total
        np.testing.assert_allclose(arrays[key].numpy(), hand, rtol=1e-5, atol=1e-6)


STAT_SHAPES = {"lin": (5,), "conv": (2, 3, 3)}
ROWS = {"lin": 4, "conv": 9}
CALIB = 8
BAD_STATS = ["error", "no-info", "key-missing", "key-extra", "shape", "dtype32", "neg", "nan", "huge-ss", "n-zero",
             "n-huge", "n-not-multiple", "n-int64max", "n-float", "count-huge", "vote-range", "vote-dup", "vote-dtype",
             "vote-long", "vote-2d", "vote-missing", "npz", "size-lie"]


def _stats_reply(kind: str, rng: np.random.Generator, examples: int) -> tuple[Message, bool]:
    msg = stamp(Message(RecordDict(), dst_node_id=1, message_type="query.stats"))
    if kind == "error":
        return Message(Error(code=1, reason="boom"), reply_to=msg), False
    items = {}
    for name, shape in STAT_SHAPES.items():
        items[f"{name}.ss"] = Array(rng.uniform(0, 10, shape) * examples * ROWS[name])
        items[f"{name}.n"] = Array(np.array([examples * ROWS[name]], np.int64))
    votes = {"lin.idx": Array(np.sort(rng.choice(20, 3, replace=False)).astype(np.int64)),
             "conv.idx": Array(np.array([0, 7], np.int64))}
    info = {"num-examples": int(rng.integers(0, 100)), "calib-examples": examples}
    big = {"n-huge": (CALIB + 1) * 4, "n-not-multiple": examples * 4 + 1, "n-int64max": 2**63 - 1, "n-zero": 0}
    if kind in big:
        items["lin.n"] = Array(np.array([big[kind]], np.int64))
    elif kind == "n-float":
        items["lin.n"] = Array(np.array([8.0]))
    elif kind == "key-missing":
        items.pop("conv.ss")
    elif kind == "key-extra":
        items["other.ss"] = Array(np.ones(5))
    elif kind == "shape":
        items["conv.ss"] = Array(np.ones(18))
    elif kind == "dtype32":
        items["lin.ss"] = Array(np.ones(5, np.float32))
    elif kind in ("neg", "nan", "huge-ss"):
        v = items["lin.ss"].numpy().copy()
        v[int(rng.integers(5))] = {"neg": -1.0, "nan": np.nan, "huge-ss": 1e300}[kind]
        items["lin.ss"] = Array(v)
    elif kind == "count-huge":
        info["num-examples"] = 10**12
    elif kind == "npz":
        buf = io.BytesIO()
        np.savez(buf, ss=np.ones(5))
        items["lin.ss"] = Array(dtype="float64", shape=(5,), stype="numpy.ndarray", data=buf.getvalue())
    elif kind == "size-lie":
        items["lin.ss"] = Array(dtype="float64", shape=(5,), stype="numpy.ndarray", data=_npy(np.ones(50_000)))
    elif kind.startswith("vote-"):
        bad = {"vote-range": np.array([0, 20]), "vote-dup": np.array([3, 3]), "vote-dtype": np.array([1.0, 2.0]),
               "vote-long": np.arange(21), "vote-2d": np.array([[1, 2]])}
        if kind == "vote-missing":
            votes.pop("conv.idx")
        else:
            votes["lin.idx"] = Array(bad[kind])
    content = RecordDict({"stats": ArrayRecord(items), "votes": ArrayRecord(votes)})
    if kind != "no-info":
        content["info"] = MetricRecord(info)
    return Message(content, reply_to=msg), kind == "good"


@settings(max_examples=4000, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(kinds=st.lists(st.sampled_from(["good", "good"] + BAD_STATS), min_size=3, max_size=3),
       examples=st.lists(st.integers(1, CALIB), min_size=3, max_size=3), seed=st.integers(0, 2**32 - 1))
def test_statistics_and_vote_replies(kinds, examples, seed):
    rng = np.random.default_rng(seed)
    accepted = []
    for kind, ex in zip(kinds, examples):
        msg, is_good = _stats_reply(kind, rng, ex)
        try:
            stats, votes, _ = validate.stats_reply(msg, STAT_SHAPES, ROWS, CALIB, 100, {"lin.idx": 20, "conv.idx": 18})
        except validate.BadReply as exc:
            assert not is_good and str(exc), (kind, exc)
            continue
        assert is_good, kind
        assert set(votes) == {"lin.idx", "conv.idx"}
        accepted.append(stats)
    if accepted:  # pooling what was accepted never overflows or produces non-finite norms
        for pooled in (sum_stats(accepted), median_stats(accepted)):
            for norm in arrays_to_norms(pooled).values():
                assert np.isfinite(norm.numpy()).all()
        hand = sum(a["lin.ss"] for a in accepted)
        np.testing.assert_allclose(sum_stats(accepted)["lin.ss"], hand)


def test_oversized_payload_is_refused_before_decoding(monkeypatch):
    """A payload far larger than its declared shape is refused from its metadata, never decoded."""
    def no_decode(self):
        raise AssertionError("decoded")

    monkeypatch.setattr(Array, "numpy", no_decode)
    big = Array(dtype="float32", shape=(12,), stype="numpy.ndarray", data=_npy(np.zeros(100_000, np.float32)))
    with pytest.raises(validate.BadReply, match="carries 400128 bytes"):
        validate.decode_array(ArrayRecord({"values": big}), "values", (12,), "float32")
    wrong = Array(dtype="float32", shape=(10**8,), stype="numpy.ndarray", data=b"")
    with pytest.raises(validate.BadReply, match=r"shape \(100000000,\)"):
        validate.decode_array(ArrayRecord({"values": wrong}), "values", (12,), "float32")
