"""Robust aggregation by hand: per-entry median / trimmed mean over trainers, update-norm clipping,
robust pooling of statistics."""
import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from common.settings import parse_run_config
from common.taskedge.stats import median_stats, sum_stats
from server.aggregate import Update, masked_robust
from server.inprocess import InProcessGrid
from server.messages import stamp
from server.recorder import RoundLog
from server.robust import UpdateClipping
from server.strategy import NESTED, TaskEdgeFedMedian, TaskEdgeFedTrimmedAvg, make_strategy


def test_masked_median_and_trimmed_mean_by_hand():
    cur = {"v": np.array([9.0, 9.0, 9.0], np.float32)}
    ups = [Update({"v": np.array([1.0, 2.0, 3.0], np.float32)}, 1.0),
           Update({"v": np.array([5.0, 6.0, 7.0], np.float32)}, 5.0),
           Update({"v": np.array([100.0, 40.0], np.float32)}, 1.0, {"v": np.array([0, 2])}),  # nested: entries 0, 2
           Update({"v": np.array([-50.0], np.float32)}, 1.0, {"v": np.array([0])}),
           Update({"v": np.full(3, 1e6, np.float32)}, 0.0)]  # no examples: not counted
    med = masked_robust(cur, ups, "median")["v"]
    # entry 0: {1, 5, 100, -50} -> 3; entry 1: {2, 6} -> 4; entry 2: {3, 7, 40} -> 7
    np.testing.assert_allclose(med, [3.0, 4.0, 7.0])
    trim = masked_robust(cur, ups, "trimmed", beta=0.25)["v"]
    # entry 0: k=4, cut 1 each end -> mean(1, 5) = 3; entry 1: k=2, cut 0 -> 4; entry 2: k=3, cut 0 -> 50/3
    np.testing.assert_allclose(trim, [3.0, 4.0, 50.0 / 3], rtol=1e-6)
    untouched = masked_robust({"v": np.array([1.0, 2.0], np.float32)}, [Update({"v": np.array([5.0], np.float32)},
                                                                                1.0, {"v": np.array([1])})])
    np.testing.assert_allclose(untouched["v"], [1.0, 5.0])  # nobody trained entry 0


def test_robust_strategies_are_flowers():
    cfg = parse_run_config({"aggregation": "trimmed", "trim-beta": 0.1})
    s = make_strategy(cfg, None, nested=False)
    assert isinstance(s, TaskEdgeFedTrimmedAvg) and s.beta == 0.1
    assert type(make_strategy(parse_run_config({"aggregation": "median"}), None, nested=True)) is NESTED[TaskEdgeFedMedian]
    with pytest.raises(ValueError, match="'server-opt'.*aggregation='mean'"):
        parse_run_config({"aggregation": "median", "server-opt": "fedavgm"})


class _Inner:
    """Records what reaches the wrapped strategy."""

    def configure_train(self, server_round, arrays, config, grid):
        return [stamp(Message(RecordDict(), dst_node_id=n, message_type=MessageType.TRAIN)) for n in (1, 2, 3, 4)]

    def aggregate_train(self, server_round, replies):
        self.seen = [r.content["arrays"].to_numpy_ndarrays() for r in replies]
        return None, None


def _clip_round(clip_norm, clip_factor, deltas):
    current = [np.zeros(3, np.float32), np.ones(2, np.float32)]
    inner, log = _Inner(), RoundLog()
    wrapper = UpdateClipping(inner, log, clip_norm, clip_factor)
    msgs = list(wrapper.configure_train(1, ArrayRecord({"a": Array(current[0]), "b": Array(current[1])}),
                                        ConfigRecord({}), InProcessGrid(None, 1)))
    replies = [Message(RecordDict({"arrays": ArrayRecord({"a": Array(current[0] + d[:3]), "b": Array(current[1] + d[3:])}),
                                   "metrics": MetricRecord({"num-examples": 1})}), reply_to=m)
               for m, d in zip(msgs, deltas)]
    wrapper.aggregate_train(1, replies)
    norms = [np.sqrt(sum(float(((x - c) ** 2).sum()) for x, c in zip(seen, current))) for seen in inner.seen]
    return norms, log.rec


def test_update_clipping_fixed_and_adaptive():
    deltas = [np.full(5, v, np.float32) for v in (0.1, 0.2, 0.3, 1e4)]  # norms 0.224, 0.447, 0.671, 22361
    norms, rec = _clip_round(0.5, 3.0, deltas)
    np.testing.assert_allclose(norms, [np.sqrt(5) * 0.1, np.sqrt(5) * 0.2, 0.5, 0.5], rtol=1e-5)
    assert rec["clip_bound"] == 0.5 and rec["clipped"] == 2
    norms, rec = _clip_round(0.0, 3.0, deltas)  # adaptive: 3 x median(0.447, 0.671) = 1.677
    bound = 3 * np.median([np.sqrt(5) * v for v in (0.1, 0.2, 0.3, 1e4)])
    assert rec["clip_bound"] == pytest.approx(bound, rel=1e-5) and rec["clipped"] == 1
    np.testing.assert_allclose(norms[3], bound, rtol=1e-5)  # the attacker is cut to the bound
    np.testing.assert_allclose(norms[:3], [np.sqrt(5) * v for v in (0.1, 0.2, 0.3)], rtol=1e-5)  # honest untouched


def test_median_statistics_bound_one_clients_pull():
    rng = np.random.default_rng(0)
    honest = [{"m.ss": rng.uniform(1, 2, 6) * 10, "m.n": np.array([10])} for _ in range(3)]
    attacker = {"m.ss": np.array([0, 0, 0, 0, 0, 1e20]), "m.n": np.array([10])}
    pooled_sum = sum_stats(honest + [attacker])["m.ss"] / 40
    pooled_med = median_stats(honest + [attacker])["m.ss"] / 40
    ms = np.stack([h["m.ss"] / 10 for h in honest])
    assert pooled_sum[5] > 1e18  # the plain sum follows the attacker
    assert (pooled_med >= ms.min(0) * 0.5).all() and (pooled_med <= ms.max(0)).all()  # median stays in the honest range
    np.testing.assert_allclose(median_stats(honest)["m.ss"], np.median(ms, 0) * 30)
