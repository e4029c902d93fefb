"""The strategy composes with Flower's own DP wrappers and client mods (what the privacy work builds on).

In-process federations (real ClientApp handlers, real strategy, serialised messages) on a
random-init copy of the embedded ViT; two rounds each.
"""
import numpy as np
import pytest
from flwr.clientapp.mod import fixedclipping_mod
from flwr.serverapp.strategy import (DifferentialPrivacyClientSideFixedClipping,
                                     DifferentialPrivacyServerSideFixedClipping, FedAvg)

from client.client_app import app, create_app, train_only
from common.settings import parse_run_config
from server.inprocess import InProcessGrid
from server.runner import run_federation
from server.strategy import TaskEdgeFedAvg


def _cfg(weights, tmp_path, rounds=2):
    return parse_run_config({"weights-path": weights, "num-partitions": 20, "num-server-rounds": rounds,
                             "server-test-size": 100, "calib-size": 32, "output-dir": str(tmp_path),
                             "min-nodes": 2, "fraction-evaluate": 0.0})


@pytest.mark.parametrize("weights", [[3, 3, 3, 5, 5], list(range(1, 13))])  # grouped / one reused buffer
def test_strategy_is_flowers_fedavg_with_its_one_pass_mean(weights):
    """OnePassFedAvg.aggregate_train gives Flower's FedAvg result on the same
    replies, also after the reply guard swapped in decoded views, and the hand-computed weighted mean."""
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

    from server.strategy import OnePassFedAvg
    from server.validate import DecodedArray

    assert issubclass(OnePassFedAvg, TaskEdgeFedAvg) and issubclass(TaskEdgeFedAvg, FedAvg)
    assert TaskEdgeFedAvg.aggregate_train is FedAvg.aggregate_train  # what Flower's DP accounting requires
    rng = np.random.default_rng(1)
    vals = [{"values": rng.standard_normal(257).astype(np.float32), "head": rng.standard_normal((3, 4)).astype(np.float32)}
            for _ in weights]

    def replies(decoded: bool):
        out = []
        for i, (v, w) in enumerate(zip(vals, weights)):
            rec = ArrayRecord({k: Array(a) for k, a in v.items()})
            if decoded:
                for k in list(rec):
                    rec[k] = DecodedArray.of(rec[k], v[k])
            msg = Message(RecordDict({"arrays": rec, "metrics": MetricRecord({"num-examples": w, "train-loss": 0.1 * i})}),
                          dst_node_id=i + 1, message_type="train")
            out.append(Message(msg.content, reply_to=msg))
        return out

    ref, ref_m = FedAvg().aggregate_train(1, replies(False))
    for decoded in (False, True):
        got, got_m = OnePassFedAvg().aggregate_train(1, replies(decoded))
        assert list(got) == list(ref) and dict(got_m) == dict(ref_m)
        for k in ref:
            hand = sum(w * v[k].astype(np.float64) for v, w in zip(vals, weights)) / sum(weights)
            np.testing.assert_allclose(got[k].numpy(), ref[k].numpy(), rtol=0, atol=2e-6)
            np.testing.assert_allclose(got[k].numpy(), hand, rtol=0, atol=2e-6)
            assert got[k].numpy().dtype == np.float32 and got[k].numpy().shape == vals[0][k].shape


@pytest.mark.parametrize("rounds, atol", [(1, 1e-7), (2, 1e-4)])
def test_server_side_dp_wrapper_with_zero_noise_equals_the_plain_run(weights, tmp_path, rounds, atol):
    """After one round the wrapped run equals the plain one up to float32 rounding (clipping by 1e6
    scales by 1, but p + (q - p) is q only up to rounding); a second round of AdamW amplifies that
    rounding, still far below the values themselves (~1e-1)."""
    cfg = _cfg(weights, tmp_path, rounds)
    plain, _ = run_federation(InProcessGrid(app, 2, cfg.to_dict()), cfg)
    wrapped = []

    def wrap(strategy):
        wrapped.append(DifferentialPrivacyServerSideFixedClipping(strategy, noise_multiplier=0.0,
                                                                  clipping_norm=1e6, num_sampled_clients=2))
        return wrapped[0]

    dp, _ = run_federation(InProcessGrid(app, 2, cfg.to_dict()), cfg, wrap=wrap)
    assert isinstance(wrapped[0].strategy, TaskEdgeFedAvg)
    assert list(dp.arrays) == list(plain.arrays)
    for k in plain.arrays:
        np.testing.assert_allclose(dp.arrays[k], plain.arrays[k], rtol=0, atol=atol)
    assert [r["central_acc"] for r in dp.history] == [r["central_acc"] for r in plain.history]
    assert np.abs(plain.arrays["values"]).max() > 0  # the run did train


def test_client_side_clipping_mod_clips_the_update_and_keeps_its_structure(weights, tmp_path):
    cfg, clip = _cfg(weights, tmp_path), 0.05
    sent, got = {}, {}

    def spy(msg, reply):
        if msg.metadata.message_type == "train":
            sent[msg.metadata.dst_node_id] = {k: v.numpy() for k, v in msg.content["arrays"].items()}
            got[msg.metadata.dst_node_id] = reply

    grid = InProcessGrid(create_app(mods=(train_only(fixedclipping_mod),)), 2, cfg.to_dict(), observe=spy)
    fed, summary = run_federation(grid, cfg, wrap=lambda s: DifferentialPrivacyClientSideFixedClipping(
        s, noise_multiplier=0.0, clipping_norm=clip, num_sampled_clients=2))
    assert summary["rounds"] == 2 and not fed.dropped and len(got) == 2
    for nid, reply in got.items():
        assert not reply.has_error(), reply.error
        assert list(reply.content.array_records) == ["arrays"]
        arrays = {k: v.numpy() for k, v in reply.content["arrays"].items()}
        assert list(arrays) == list(sent[nid])
        assert all(arrays[k].shape == sent[nid][k].shape and arrays[k].dtype == np.float32 for k in arrays)
        norm = np.sqrt(sum(float(((arrays[k] - sent[nid][k]).astype(np.float64) ** 2).sum()) for k in arrays))
        assert norm == pytest.approx(clip, rel=1e-3)  # an AdamW epoch moves far more than 0.05: clipped to it


def test_flowers_clipping_mod_alone_breaks_query_messages(weights, tmp_path):
    """Why `train_only` exists: unwrapped, the mod answers the statistics query with an error."""
    cfg = _cfg(weights, tmp_path)
    grid = InProcessGrid(create_app(mods=(fixedclipping_mod,)), 2, cfg.to_dict())
    with pytest.raises(RuntimeError, match="fixedclipping_mod expects exactly one ArrayRecord"):
        run_federation(grid, cfg)
