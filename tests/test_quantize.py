"""value-dtype (common/quantize.py, server/codec.py, client/codec.py): round-trip and aggregation error bounds,
unbiased stochastic rounding, refusal of malformed encodings, and one in-process federation per encoding."""
from collections import OrderedDict

import numpy as np
import pytest

from common import quantize as Q


def _vec(n=4096, seed=0, scale=1e-2):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(n) * scale).astype(np.float32)


def test_dtypes_are_the_run_config_choices():
    from common.options import BY_KEY

    assert BY_KEY["value-dtype"].choices == Q.DTYPES and BY_KEY["value-dtype"].default == "float32"


def test_float16_relative_error_at_most_2_pow_minus_11():
    x = {"values": _vec(scale=1.0), "head.weight": _vec(300, 1, 0.1).reshape(30, 10)}
    enc = Q.encode(x, "float16")
    assert all(v.dtype == np.float16 for v in enc.values()) and set(enc) == set(x)
    dec = Q.decode(enc, "float16", {k: v.shape for k, v in x.items()})
    for k, v in x.items():
        normal = np.abs(v) >= np.finfo(np.float16).tiny
        rel = np.abs(dec[k] - v)[normal] / np.abs(v)[normal]
        assert rel.max() <= 2.0 ** -11, k
        assert np.abs(dec[k] - v)[~normal].max(initial=0) <= 2.0 ** -25  # subnormal range: absolute step
        assert dec[k].dtype == np.float32 and dec[k].shape == v.shape


def test_int8_error_below_the_scale_and_codes_in_range():
    x = {"values": _vec(), "zeros": np.zeros(7, np.float32), "empty": np.zeros(0, np.float32),
         "head.bias": np.array([3.0, -3.0, 0.5], np.float32)}
    enc = Q.encode(x, "int8", np.random.default_rng(0))
    assert set(enc) == set(x) | {k + Q.SCALE_SUFFIX for k in x}
    dec = Q.decode(enc, "int8", {k: v.shape for k, v in x.items()})
    for k, v in x.items():
        s = float(enc[k + Q.SCALE_SUFFIX][0])
        assert enc[k].dtype == np.int8 and enc[k + Q.SCALE_SUFFIX].dtype == np.float32
        assert s == pytest.approx(float(np.abs(v).max(initial=0)) / 127, rel=1e-6)
        assert np.abs(enc[k].astype(int)).max(initial=0) <= 127
        assert np.all(np.abs(dec[k] - v) <= s * (1 + 1e-6)), k
    assert np.array_equal(dec["zeros"], x["zeros"])  # 0 encodes exactly (a nested node's untrained entries)
    assert np.array_equal(dec["head.bias"][:2], x["head.bias"][:2])  # +-max|x| is a code exactly


def test_int8_stochastic_rounding_is_unbiased_and_seeded():
    x = {"v": _vec(256, 3)}
    s = float(np.abs(x["v"]).max()) / 127
    reps = 2000
    rng = np.random.default_rng(1)
    dec = np.stack([Q.decode(Q.encode(x, "int8", rng), "int8")["v"] for _ in range(reps)])
    # each entry's rounding error has sd <= s/2: the mean of `reps` encodings is within a few standard errors
    se = s / 2 / np.sqrt(reps)
    assert np.abs(dec.mean(0) - x["v"]).max() < 5 * se
    # and it is stochastic (round-to-nearest would be biased by up to s/2 on every entry)
    assert dec.std(0).max() > 0.1 * s
    a = Q.encode(x, "int8", np.random.default_rng(7))["v"]
    assert np.array_equal(a, Q.encode(x, "int8", np.random.default_rng(7))["v"])


@pytest.mark.parametrize("n", [4, 16, 64])
def test_mean_of_int8_updates_is_within_the_max_scale_of_the_float32_mean(n):
    rng = np.random.default_rng(n)
    ups = [{"values": _vec(2048, 100 + i, 1e-3 * (1 + i % 3))} for i in range(n)]
    encs = [Q.encode(u, "int8", rng) for u in ups]
    scales = np.array([e["values" + Q.SCALE_SUFFIX][0] for e in encs])
    mean_q = np.mean([Q.decode(e, "int8")["values"] for e in encs], axis=0)
    mean_f = np.mean([u["values"] for u in ups], axis=0)
    err = np.abs(mean_q - mean_f)
    assert err.max() <= scales.max() * (1 + 1e-6)  # the bound, per entry
    # empirically: independent roundings average out, RMS error <= sqrt(mean s_i^2 / 4 / n)
    assert np.sqrt(np.mean(err ** 2)) <= 1.1 * np.sqrt(np.mean(scales ** 2) / 4 / n)


def test_update_round_trip_adds_to_the_reference():
    ref = OrderedDict(values=_vec(512, 5, 1.0), head=_vec(40, 6, 1.0).reshape(4, 10))
    trained = OrderedDict((k, v + _vec(v.size, 9, 1e-3).reshape(v.shape)) for k, v in ref.items())
    enc = Q.encode_update(trained, ref, "int8", np.random.default_rng(0))
    dec = Q.decode_update(enc, ref, "int8")
    for k in ref:
        s = float(enc[k + Q.SCALE_SUFFIX][0])
        assert s < 1e-4  # the scale follows the small update, not the weights (max |w| / 127 ~ 3e-2)
        assert np.abs(dec[k] - trained[k]).max() <= s * 1.01 + 1e-6


FINITE, F32 = "field 'values#scale': scale must be finite", "field 'values#scale': expected a float32"


@pytest.mark.parametrize("bad, why", [
    (lambda e: e.pop("values#scale"), "field 'values': no per-tensor scale 'values#scale'"),
    (lambda e: e.__setitem__("values", e["values"].astype(np.float32)), "field 'values': expected int8"),
    (lambda e: e.__setitem__("values#scale", np.array([np.nan], np.float32)), FINITE),
    (lambda e: e.__setitem__("values#scale", np.array([np.inf], np.float32)), FINITE),
    (lambda e: e.__setitem__("values#scale", np.array([-1.0], np.float32)), FINITE),
    (lambda e: e.__setitem__("values#scale", np.array([1.0, 2.0], np.float32)), F32),
    (lambda e: e.__setitem__("values", e["values"][:-1]), "field 'values': shape"),
    (lambda e: e.pop("head"), "field 'head': missing"),
    (lambda e: e.__setitem__("extra", np.zeros(1, np.int8)), "field 'extra': not expected"),
])
def test_malformed_int8_records_are_refused_naming_the_field(bad, why):
    x = OrderedDict(values=_vec(64), head=_vec(8, 1))
    enc = Q.encode(x, "int8", np.random.default_rng(0))
    bad(enc)
    with pytest.raises(Q.QuantizeError, match=why.replace("(", r"\(").replace(")", r"\)")):
        Q.decode(enc, "int8", {k: v.shape for k, v in x.items()})


def test_encode_refuses_what_it_cannot_carry():
    with pytest.raises(Q.QuantizeError, match="field 'w': .*float16's range"):
        Q.encode({"w": np.array([1e5], np.float32)}, "float16")
    with pytest.raises(Q.QuantizeError, match="field 'w': contains NaN"):
        Q.encode({"w": np.array([np.nan], np.float32)}, "int8")
    with pytest.raises(Q.QuantizeError, match="field 'w': expected a float"):
        Q.encode({"w": np.array([1], np.int64)}, "int8")
    with pytest.raises(Q.QuantizeError, match="field 'w': contains NaN/Inf"):
        Q.decode({"w": np.array([np.inf], np.float16)}, "float16")
    with pytest.raises(Q.QuantizeError, match="value-dtype must be one of"):
        Q.encode({}, "bf16")
    assert Q.encoded_nbytes({"v": (100,), "h": (3, 4)}, "int8") == 112 + 8
    assert Q.encoded_nbytes({"v": (100,), "h": (3, 4)}, "float32") == 448


def test_secure_aggregation_refuses_a_narrow_value_dtype():
    from common.settings import parse_run_config

    for dt in ("float16", "int8"):
        with pytest.raises(ValueError, match=r"run config 'value-dtype'.*secure-aggregation=true"):
            parse_run_config({"value-dtype": dt, "secure-aggregation": True, "clip-norm": 1.0})
    assert parse_run_config({"value-dtype": "int8", "dp": "client"}).value_dtype == "int8"  # DP composes
    with pytest.raises(ValueError, match="run config 'value-dtype'"):
        parse_run_config({"value-dtype": "int4"})


def _reply(arrays: dict):
    from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict

    rec = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    return Message(RecordDict({"arrays": rec, "metrics": MetricRecord({"num-examples": 10})}), dst_node_id=1,
                   message_type=MessageType.TRAIN)


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_server_codec_decodes_an_update_onto_its_float32_global(dtype):
    from server.codec import ValueCodec
    from server.validate import train_reply

    glob = OrderedDict(values=_vec(300, 1, 0.05), **{"head.weight": _vec(40, 2, 0.1).reshape(4, 10)})
    trained = OrderedDict((k, v + _vec(v.size, 3, 1e-3).reshape(v.shape)) for k, v in glob.items())
    specs = {k: (v.shape, "float32") for k, v in glob.items()}
    reply = _reply(Q.encode_update(trained, glob, dtype, np.random.default_rng(0)))
    ValueCodec(dtype).decode_reply(reply, specs, glob)
    arrays, n, _ = train_reply(reply, specs, 100)  # what the guard checks next: plain float32, finite, bounded
    tol = 1e-3 / 127 * 4 if dtype == "int8" else 1e-6
    for k in glob:
        assert arrays[k].dtype == np.float32 and np.abs(arrays[k] - trained[k]).max() <= tol
    assert ValueCodec(dtype).bound_bytes(specs) == Q.encoded_nbytes({k: s for k, (s, _) in specs.items()}, dtype)


@pytest.mark.parametrize("tamper, why", [
    (lambda e: e.pop("values#scale"), "value-dtype=int8: no per-tensor scale 'values#scale'"),
    (lambda e: e.__setitem__("values", e["values"].astype(np.float32)), "'values' has dtype float32, expected int8"),
    (lambda e: e.__setitem__("values#scale", np.array([np.nan], np.float32)), "'values#scale' contains NaN/Inf"),
    (lambda e: e.__setitem__("values#scale", np.array([-2.0], np.float32)), "scale must be finite and >= 0"),
    (lambda e: e.__setitem__("values", e["values"][:5]), "'values' has shape (5,)"),
    (lambda e: e.__setitem__("values.scale", e["values#scale"]), "unknown field 'values.scale'"),
])
def test_server_codec_refuses_malformed_replies_with_a_reason(tamper, why):
    from server.codec import ValueCodec
    from server.validate import BadReply

    glob = OrderedDict(values=_vec(30, 1, 0.05))
    enc = Q.encode_update(glob, glob, "int8", np.random.default_rng(0))
    tamper(enc)
    with pytest.raises(BadReply) as info:
        ValueCodec("int8").decode_reply(_reply(enc), {"values": ((30,), "float32")}, glob)
    assert why in str(info.value)


# ---- the federation (real ClientApp and strategy over the in-process grid; messages serialised)
def _fed(weights, tmp_path, nodes=3, tamper=None, **kw):
    from client.client_app import app
    from common.settings import parse_run_config
    from server.inprocess import InProcessGrid
    from server.runner import run_federation

    base = {"weights-path": weights or "", "num-partitions": 20, "num-server-rounds": 2, "server-test-size": 200,
            "calib-size": 32, "batch-size": 32, "output-dir": str(tmp_path), "min-nodes": 1, "fraction-evaluate": 0.0}
    cfg = parse_run_config({**base, **{k.replace("_", "-"): v for k, v in kw.items()}})
    grid = InProcessGrid(app, nodes, cfg.to_dict(), tamper=tamper)
    fed, summary = run_federation(grid, cfg, run_dir=None)
    return grid, fed, summary


def _train_msgs(grid):
    return [d for d in grid.delivered if d["type"] == "train"]


def test_int8_federation_matches_float32_at_a_quarter_of_the_bytes(tmp_path):
    """On the embedded pre-trained ViT (it learns in 2 rounds), int8 both ways vs float32, same seed."""
    kw = {"num_partitions": 5, "num_server_rounds": 3}
    _, fed32, s32 = _fed(None, tmp_path, value_dtype="float32", **kw)
    g8, fed8, s8 = _fed(None, tmp_path, value_dtype="int8", fraction_evaluate=1.0, **kw)
    assert not fed8.dropped and s8["rounds"] == 3
    assert abs(s8["final_acc"] - s32["final_acc"]) <= 0.03, (s8["final_acc"], s32["final_acc"])
    assert s8["final_acc"] > s8["initial_acc"] + 0.1, (s8["initial_acc"], s8["final_acc"])  # it learns
    # the bytes booked are the encoded bytes: 1 byte per entry + one 4-byte scale per tensor (the payload is
    # ~4x smaller: the bound), plus each array's key and .npy header (6 arrays instead of 3)
    entries, n = sum(v.size for v in fed8.arrays.values()), len(fed8.arrays)
    bound8 = entries + 4 * n
    assert fed8.history[-1]["bound_bytes_per_client"] == bound8 and 4 * entries / bound8 > 3.95
    assert bound8 <= s8["upload_bytes_per_client_round"] <= bound8 + 2 * n * 160
    assert 3.3 <= s32["upload_bytes_per_client_round"] / s8["upload_bytes_per_client_round"] <= 4.0
    assert 2.5 <= s32["download_bytes_per_client_round"] / s8["download_bytes_per_client_round"] <= 4.0
    assert all(d["up"] == s8["upload_bytes_per_client_round"] for d in _train_msgs(g8))  # what crossed the grid
    # the global state stays float32 and close to the float32 run's (same seed, same data)
    for k, v in fed8.arrays.items():
        assert v.dtype == np.float32 and v.shape == fed32.arrays[k].shape
    assert fed8.history[-1].get("fed_acc") is not None  # evaluation messages decode on the nodes too


@pytest.mark.parametrize("method, dtype", [("fedlora", "int8"), ("taskedge-lora", "int8"), ("fedavg-full", "float16"),
                                           ("head-only", "int8")])
def test_every_travelling_method_encodes_both_ways(weights, tmp_path, method, dtype):
    kw = {"method": method, "num_server_rounds": 1, "server_test_size": 100}
    _, fed32, s32 = _fed(weights, tmp_path, nodes=2, **kw)
    _, fed, s = _fed(weights, tmp_path, nodes=2, value_dtype=dtype, **kw)
    assert not fed.dropped and s["rounds"] == 1 and abs(s["final_acc"] - s32["final_acc"]) <= 0.06
    entries, n = sum(v.size for v in fed.arrays.values()), len(fed.arrays)
    bound = entries + 4 * n if dtype == "int8" else 2 * entries  # the payload: 1 B + a scale per array, or 2 B
    assert fed.history[-1]["bound_bytes_per_client"] == bound
    assert bound <= s["upload_bytes_per_client_round"] <= bound + 2 * n * 256  # + keys (peft: long) and .npy headers
    ratio = s32["upload_bytes_per_client_round"] / s["upload_bytes_per_client_round"]
    assert ratio >= (2.0 if dtype == "int8" else 1.5), ratio  # head-only's small arrays: headers weigh in
    assert s32["download_bytes_per_client_round"] > s["download_bytes_per_client_round"]


def test_nested_budgets_send_exact_zero_updates_outside_their_submask(weights, tmp_path):
    """A rank-1 node's untrained entries come back exactly as sent (an update of 0 is code 0): the guard's
    sub-mask check passes on the decoded arrays, and no reply is dropped."""
    _, fed, s = _fed(weights, tmp_path, nodes=2, value_dtype="int8", budget_ranks="0,1", budget=0.02,
                     num_server_rounds=1, server_test_size=0)
    assert fed.node_rank and sorted(fed.node_rank.values()) == [0, 1]
    assert not fed.dropped and fed.history[-1]["replies"] == 2


def test_malformed_encoded_replies_are_dropped_with_a_reason(weights, tmp_path):
    from flwr.app import Array, ArrayRecord, Message, RecordDict

    def tamper(nid, reply):
        if reply.metadata.message_type != "train" or reply.has_error() or nid == 1000:
            return reply
        arrays = {k: v.numpy() for k, v in reply.content["arrays"].items()}
        if nid == 1001:
            arrays.pop("values#scale")
        else:
            arrays["values"] = arrays["values"].astype(np.float32)
        content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                              "metrics": reply.content["metrics"]})
        return Message(content, metadata=reply.metadata)

    _, fed, s = _fed(weights, tmp_path, nodes=3, tamper=tamper, value_dtype="int8", num_server_rounds=1,
                     server_test_size=0)
    reasons = {d["node"]: d["reason"] for d in fed.dropped}
    assert set(reasons) == {1001, 1002}
    assert "value-dtype=int8: no per-tensor scale 'values#scale'" in reasons[1001]
    assert "value-dtype=int8: 'values' has dtype float32, expected int8" in reasons[1002]
    assert all("unreadable" not in r and "Traceback" not in r for r in reasons.values())
    assert fed.history[-1]["replies"] == 1 and not fed.history[-1]["skipped"]


def test_client_mod_decodes_the_broadcast_and_sends_its_update():
    """value_codec_mod: the handler sees float32 arrays (the broadcast decoded); the reply carries the encoded
    update, so the server's global + update is what the node trained (to within the two roundings)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

    from client.codec import value_codec_mod
    from server.codec import ValueCodec

    glob = OrderedDict(values=_vec(500, 1, 0.5), head=_vec(30, 2, 0.5).reshape(3, 10))
    enc = Q.encode(glob, "int8", np.random.default_rng(0))
    msg = Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in enc.items()}),
                              "config": ConfigRecord({"value-dtype": "int8", "server-round": 1, "seed": 0})}),
                  dst_node_id=5, message_type=MessageType.TRAIN)
    seen, step = {}, 0.01

    def handler(m, ctx):
        got = {k: v.numpy() for k, v in m.content["arrays"].items()}
        seen.update(got)
        trained = {k: v + step for k, v in got.items()}
        return Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in trained.items()}),
                                   "metrics": MetricRecord({"num-examples": 4})}), reply_to=m)

    ctx = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    reply = value_codec_mod(msg, ctx, handler)
    assert set(seen) == set(glob) and all(v.dtype == np.float32 for v in seen.values())
    down = {k: float(enc[k + Q.SCALE_SUFFIX][0]) for k in glob}
    for k in glob:
        assert np.abs(seen[k] - glob[k]).max() <= down[k] * 1.001  # the handler got the decoded broadcast
    up = {k: v.numpy() for k, v in reply.content["arrays"].items()}
    assert up["values"].dtype == np.int8 and float(up["values#scale"][0]) <= step / 127 * 1.001  # the update
    ValueCodec("int8").decode_reply(reply, {k: (v.shape, "float32") for k, v in glob.items()}, glob)
    for k, v in reply.content["arrays"].items():  # the server's global + update = global + step, +- the roundings
        assert np.abs(v.numpy() - (glob[k] + step)).max() <= down[k] * 1.001 + step / 127 * 1.001
    plain = Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in glob.items()}),
                                "config": ConfigRecord({"value-dtype": "float32"})}), dst_node_id=5,
                    message_type=MessageType.TRAIN)
    out = value_codec_mod(plain, ctx, handler)  # float32: untouched both ways
    assert out.content["arrays"]["values"].numpy().dtype == np.float32
    np.testing.assert_array_equal(out.content["arrays"]["values"].numpy(), glob["values"] + step)
