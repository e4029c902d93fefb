"""Privacy: Flower's SecAgg+ for both phases, Flower's DP wrappers + accountant, the statistics mechanism.

Two kinds of tests: the secure sum alone, on a toy ClientApp behind the project's SecAgg+ mod
(4 nodes, known updates and weights: exact expectations, dropouts at chosen stages), and
in-process federations of the real apps on a random-init copy of the embedded ViT (2 nodes,
1-2 rounds). One `run_simulation` smoke (slow) runs the secure + DP configuration on Flower's runtime.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import FedAvg

import client.privacy as client_privacy
from client.client_app import create_app
from client.privacy import SecureAggregationMod
from common.privacy import quantization_bound
from common.settings import parse_run_config
from common.taskedge.stats import sum_stats
from server.inprocess import InProcessGrid
from server.messages import stamp
from server.messages import array_record
from server.phases import statistics_phase
from server.privacy import Privacy, projected_epsilon
from server.recorder import RoundLog
from server.runner import run_federation
from server.secure import SecAggSettings, SecureTraining
from server.strategy import OnePassFedAvg, TaskEdgeFedAvg, make_strategy

T = 2**22


# ------------------------------------------------------------------ the secure sum on a toy app
def _toy(deltas: dict, weights: dict, fail_at: dict | None = None, tamper=None) -> ClientApp:
    """Train replies = received + a fixed delta per node; `fail_at[node]` = SecAgg+ stage at which it drops;
    `tamper`: an outermost mod that rewrites replies."""
    fail_at = fail_at or {}

    def dropper(msg, ctx, call_next):
        conf = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if conf is not None and fail_at.get(ctx.node_id) == conf.get("stage"):
            raise ConnectionError(f"node {ctx.node_id} lost at stage {conf.get('stage')}")
        return call_next(msg, ctx)

    app = ClientApp(mods=[*([tamper] if tamper else []), dropper, SecureAggregationMod(lambda m, c: app(m, c))])

    @app.train()
    def train(msg, ctx):
        got = {k: v.numpy() for k, v in msg.content["arrays"].items()}
        out = {k: (got[k] + deltas[ctx.node_id][k]).astype(np.float32) for k in got}
        return Message(RecordDict({"arrays": array_record(out), "metrics": MetricRecord(
            {"num-examples": weights[ctx.node_id], "train-loss": 1.0 + ctx.node_id % 3, "train-acc": 0.5})}),
            reply_to=msg)

    return app


class _Ranks:
    """A MaskDelivery stand-in: each node's budget rank and the packed positions a rank trains."""

    def __init__(self, ranks: dict, positions: dict):
        self.ranks, self._pos = ranks, positions

    def positions(self, node):
        return self._pos[self.ranks.get(node, 0)]

    def rank_positions(self, rank):
        return self._pos[rank]


def _secure_round(deltas, weights, fail_at=None, delivery=None, bound=1.0, shares=4, threshold=3, max_weight=100,
                  tamper=None):
    cfg = parse_run_config()
    nodes = sorted(deltas)
    grid = InProcessGrid(_toy(deltas, weights, fail_at, tamper), len(nodes))
    assert sorted(grid.get_node_ids()) == nodes
    current = {"values": np.linspace(-1, 1, 50, dtype=np.float32), "head.weight": np.ones((3, 4), np.float32)}
    log = RoundLog()
    training = SecureTraining(cfg, log, SecAggSettings(shares, threshold, bound), bound, max_weight, delivery)
    msgs = [Message(RecordDict({"arrays": array_record(current), "config": ConfigRecord({"server-round": 1})}),
                    dst_node_id=n, message_type="train", group_id="1") for n in nodes]
    replies = training.round(grid, msgs, None)
    return current, replies, training.last, log.rec


def _deltas(seed=0, nodes=range(1000, 1004), scale=0.1):
    rng = np.random.default_rng(seed)
    return {n: {"values": rng.normal(0, scale, 50), "head.weight": rng.normal(0, scale, (3, 4))} for n in nodes}


def test_secure_sum_equals_the_weighted_mean_within_the_quantization_bound():
    deltas, weights = _deltas(), {1000: 10, 1001: 20, 1002: 30, 1003: 40}
    current, replies, res, rec = _secure_round(deltas, weights)
    assert res.active == [1000, 1001, 1002, 1003] and not res.dropped
    w = {n: weights[n] / 100 for n in deltas}
    bound = quantization_bound(1.0, T, 4, sum(w.values()))
    assert rec["secagg_quant_bound"] == pytest.approx(bound)
    for reply in replies:  # every node's reply carries the same aggregate
        got = {k: v.numpy() for k, v in reply.content["arrays"].items()}
        for k in current:
            want = current[k] + sum(w[n] * deltas[n][k] for n in deltas) / sum(w.values())
            err = np.abs(got[k] - want).max()
            assert err <= bound + 1e-6, (k, err, bound)  # + float32 rounding of the result
        m = reply.content["metrics"]
        assert m["num-examples"] == 1
        assert m["train-loss"] == pytest.approx(sum(w[n] * (1 + n % 3) for n in w) / sum(w.values()), abs=1e-4)


def test_secure_sum_tolerates_a_dropout_up_to_the_threshold():
    deltas, weights = _deltas(1), {n: 10 for n in range(1000, 1004)}
    # lost before sending its masked vector: its pairwise masks are removed, the sum is over the other three
    current, replies, res, _ = _secure_round(deltas, weights, fail_at={1002: "collect_masked_vectors"})
    assert res.active == [1000, 1001, 1003] and "collect_masked_vectors" in res.dropped[1002]
    assert [r.has_error() for r in replies] == [False, False, True, False]
    got = replies[0].content["arrays"]["values"].numpy()
    want = current["values"] + np.mean([deltas[n]["values"] for n in (1000, 1001, 1003)], axis=0)
    assert np.abs(got - want).max() <= quantization_bound(1.0, T, 3, 3 * 0.1) + 1e-6
    # lost after its masked vector went in: its private mask is reconstructed from the others' shares
    current, replies, res, _ = _secure_round(deltas, weights, fail_at={1001: "unmask"})
    assert res.active == [1000, 1001, 1002, 1003]
    got = replies[0].content["arrays"]["values"].numpy()
    want = current["values"] + np.mean([deltas[n]["values"] for n in deltas], axis=0)
    assert np.abs(got - want).max() <= quantization_bound(1.0, T, 4, 4 * 0.1) + 1e-6
    # two of four lost with threshold 3: the protocol halts, every node's reply is an error with the reason
    _, replies, res, _ = _secure_round(deltas, weights, fail_at={1001: "collect_masked_vectors",
                                                                 1002: "collect_masked_vectors"})
    assert res.sums is None and all(r.has_error() for r in replies)
    assert "threshold" in replies[0].error.reason


def test_secure_nested_budgets_get_exact_per_entry_denominators():
    nodes = range(1000, 1006)
    deltas, weights = _deltas(2, nodes), {1000: 10, 1001: 20, 1002: 30, 1003: 40, 1004: 15, 1005: 25}
    half = np.arange(25)
    for n in (1003, 1004, 1005):  # rank-1 nodes train only the first half: the rest of their reply is unchanged
        deltas[n]["values"][25:] = 0.0
    delivery = _Ranks({1000: 0, 1001: 0, 1002: 0, 1003: 1, 1004: 1, 1005: 1}, {0: None, 1: half})
    current, replies, res, rec = _secure_round(deltas, weights, delivery=delivery, shares=6, threshold=4)
    got = replies[0].content["arrays"]["values"].numpy()
    w = {n: weights[n] / 100 for n in nodes}
    full = (1000, 1001, 1002)
    want = current["values"].astype(np.float64).copy()
    want[:25] += sum(w[n] * deltas[n]["values"][:25] for n in nodes) / sum(w.values())
    want[25:] += sum(w[n] * deltas[n]["values"][25:] for n in full) / sum(w[n] for n in full)
    assert np.abs(got - want).max() <= rec["secagg_quant_bound"] + 1e-6
    assert rec["secagg_quant_bound"] == pytest.approx(quantization_bound(1.0, T, 6, sum(w[n] for n in full)))


def test_secure_lone_budget_rank_node_is_merged_into_a_group_of_three():
    """The review's leak: 4 nodes, one alone at rank 0 — its slot held its num-examples and the entries
    only it trained carried its values into the next global model. Now it trains rank 1 with the others."""
    nodes = range(1000, 1004)
    deltas, weights = _deltas(3, nodes), {1000: 37, 1001: 20, 1002: 30, 1003: 40}
    half = np.arange(25)
    delivery = _Ranks({1000: 0, 1001: 1, 1002: 1, 1003: 1}, {0: None, 1: half})
    current, replies, res, rec = _secure_round(deltas, weights, delivery=delivery)
    assert res.active == list(nodes) and len(res.sums[-2]) == 1  # one weight slot: only the sum of 4 weights
    assert res.sums[-2][0] / 1.0 == pytest.approx(sum(weights.values()) / 100, abs=1e-4)
    got = replies[0].content["arrays"]["values"].numpy()
    np.testing.assert_array_equal(got[25:], current["values"][25:])  # node 1000's own entries: not released
    w = {n: weights[n] / 100 for n in nodes}
    want = current["values"][:25] + sum(w[n] * deltas[n]["values"][:25] for n in nodes) / sum(w.values())
    assert np.abs(got[:25] - want).max() <= rec["secagg_quant_bound"] + 1e-6


def test_merge_ranks_gives_every_rank_group_three_nodes_and_never_a_larger_sub_mask():
    from common.privacy import merge_ranks

    assert merge_ranks({1: 0, 2: 1, 3: 1, 4: 1}) == {1: 1, 2: 1, 3: 1, 4: 1}
    assert merge_ranks({1: 0, 2: 0, 3: 0, 4: 1}) == {1: 1, 2: 1, 3: 1, 4: 1}
    assert merge_ranks({1: 0, 2: 0, 3: 0, 4: 1, 5: 1, 6: 2}) == {1: 0, 2: 0, 3: 0, 4: 2, 5: 2, 6: 2}
    assert merge_ranks({n: n % 3 for n in range(9)}) == {n: n % 3 for n in range(9)}
    rng = np.random.default_rng(0)
    for _ in range(200):
        own = {n: int(r) for n, r in enumerate(rng.integers(0, 4, rng.integers(3, 12)))}
        got = merge_ranks(own)
        assert all(got[n] >= own[n] for n in own)  # a node never trains more than its budget
        assert all(list(got.values()).count(r) >= 3 for r in set(got.values()))


def test_a_dropout_that_leaves_a_rank_slot_with_two_nodes_discards_the_sum():
    nodes = range(1000, 1006)
    deltas, weights = _deltas(4, nodes), {n: 10 for n in nodes}
    delivery = _Ranks({1000: 0, 1001: 0, 1002: 0, 1003: 1, 1004: 1, 1005: 1}, {0: None, 1: np.arange(25)})
    _, replies, res, rec = _secure_round(deltas, weights, delivery=delivery, shares=6, threshold=4,
                                         fail_at={1000: "collect_masked_vectors"})
    assert res.sums is None and all(r.has_error() for r in replies)
    assert "fewer than 3" in rec["secagg_error"]


def test_secure_aggregation_needs_three_nodes():
    deltas, weights = _deltas(5, range(1000, 1002)), {1000: 10, 1001: 10}
    _, replies, res, rec = _secure_round(deltas, weights, shares=2, threshold=2)
    assert res.sums is None and all(r.has_error() for r in replies)
    assert "at least 3 nodes" in replies[0].error.reason and "at least 3 nodes" in rec["secagg_error"]


# ------------------------------------------------------------------ federations of the real apps
def _cfg(weights, tmp_path, **kw):
    base = {"weights-path": weights, "num-partitions": 20, "num-server-rounds": 1, "server-test-size": 100,
            "calib-size": 32, "output-dir": str(tmp_path), "min-nodes": 2, "fraction-evaluate": 0.0}
    return parse_run_config(base, **kw)


def test_secure_training_round_equals_the_plain_round_and_the_strategy_sees_only_the_aggregate(
        weights, tmp_path, monkeypatch):
    plain_cfg = _cfg(weights, tmp_path, clip_norm=50.0)
    plain, _ = run_federation(InProcessGrid(create_app(), 3, plain_cfg.to_dict()), plain_cfg)

    individual, seen, server_got = {}, [], []

    def spy_mod(msg, ctx, call_next):  # inside the SecAgg+ mod: sees the node's own trained arrays
        reply = call_next(msg, ctx)
        if msg.metadata.message_type == "train":
            individual[ctx.node_id] = reply.content["arrays"]["values"].numpy().copy()
        return reply

    def spy_aggregate(self, server_round, replies):
        replies = list(replies)
        seen.extend(r.content["arrays"]["values"].numpy().copy() for r in replies)
        return FedAvg.aggregate_train(self, server_round, replies)

    monkeypatch.setattr(OnePassFedAvg, "aggregate_train", spy_aggregate)  # the class a run without DP uses
    cfg = _cfg(weights, tmp_path, secure_aggregation=True, clip_norm=50.0)
    grid = InProcessGrid(create_app(mods=(spy_mod,)), 3, cfg.to_dict(),
                         observe=lambda m, r: server_got.append((m.metadata.message_type, r)))
    fed, summary = run_federation(grid, cfg)
    rec = fed.history[-1]
    assert summary["secure_aggregation"] and rec["secagg_active"] == 3 and not fed.dropped
    # the aggregate equals the plain FedAvg round within the stated quantization bound — on the same mask:
    # Flower quantizes with stochastic rounding, so now and then a near-tie in the securely summed
    # statistics flips one mask entry and the two runs train different entries (seen 1 in ~3 runs)
    if any(not torch.equal(fed.mask.indices[n], plain.mask.indices[n]) for n in plain.mask.names()):
        pytest.skip("a near-tie in the secure statistics changed the mask (stochastic rounding); not comparable")
    err = np.abs(fed.arrays["values"] - plain.arrays["values"]).max()
    assert 0 < err <= rec["secagg_quant_bound"] + 1e-6, (err, rec["secagg_quant_bound"])
    np.testing.assert_allclose(fed.arrays["head.weight"], plain.arrays["head.weight"],
                               atol=rec["secagg_quant_bound"] + 1e-6)
    # the strategy's aggregate function got the aggregate (once per node), never a node's own vector
    assert len(seen) == 3 and len(individual) == 3
    for vec in seen:
        np.testing.assert_allclose(vec, fed.arrays["values"], atol=1e-6)
        assert all(np.abs(vec - own).max() > 10 * rec["secagg_quant_bound"] for own in individual.values())
    # and no training reply that reached the server carried arrays in the clear
    train_replies = [r for t, r in server_got if t == "train" and not r.has_error()]
    assert train_replies and all(len(rec_) == 0 for r in train_replies for rec_ in r.content.array_records.values())
    # bytes: what SecAgg+ really moved (masked int64 vectors + key exchange) replaced the guard's count
    assert rec["bytes_up"] == rec["secagg_bytes_up"] > plain.history[-1]["bytes_up"]


def test_secure_statistics_equal_the_plain_pooled_statistics(weights, tmp_path):
    cfg = _cfg(weights, tmp_path)
    raw = []
    grid = InProcessGrid(create_app(), 3, cfg.to_dict(), observe=lambda m, r: raw.append(
        {k: v.numpy() for k, v in r.content["stats"].items()}) if m.metadata.message_type == "query.stats" else None)
    nodes = sorted(grid.get_node_ids())
    plain_mask = statistics_phase(grid, cfg, nodes, RoundLog())
    pooled_plain = sum_stats(raw)

    scfg = _cfg(weights, tmp_path, secure_aggregation=True, clip_norm=1.0)
    log = RoundLog()
    sgrid = InProcessGrid(create_app(), 3, scfg.to_dict())
    privacy = Privacy(scfg, log, None, nodes)
    mask = privacy.statistics_phase(sgrid, nodes)
    assert log.rec["stats_secagg_active"] == 3 and log.rec["stats_clipped"] == 0
    step = 2 * scfg.stats_clip_norm / T
    for key in pooled_plain:
        if key.endswith(".ss"):
            n_key = key[:-3] + ".n"
            assert int(privacy.pooled[n_key][0]) == int(pooled_plain[n_key][0])
            ms_secure = privacy.pooled[key] / privacy.pooled[n_key][0]
            ms_plain = pooled_plain[key] / pooled_plain[n_key][0]
            # sums of w*ms and of w (w = rows / max rows = 1 here) are each off by < n steps
            tol = 2 * step * (1 + ms_plain / scfg.stats_clip_norm) / 2 * 2
            assert (np.abs(ms_secure - ms_plain) <= tol + 1e-12).all(), key
    same = sum(int(np.intersect1d(mask.indices[n].numpy(), plain_mask.indices[n].numpy()).size)
               for n in mask.names())
    assert same >= 0.99 * plain_mask.num_entries  # a near-tie may flip; the statistics themselves agree


def test_dp_server_side_clips_every_update_and_reports_the_accountants_epsilon(weights, tmp_path, monkeypatch):
    from dp_accounting import dp_event, rdp

    clip, sigma = 0.05, 0.8
    got = []

    def spy_aggregate(self, server_round, replies):  # what enters the sum: after Flower's server-side clipping
        replies = list(replies)
        cur = {k: v.numpy() for k, v in self.current_global.items()}
        for r in replies:
            arr = {k: v.numpy() for k, v in r.content["arrays"].items()}
            got.append(np.sqrt(sum(((arr[k].astype(np.float64) - cur[k]) ** 2).sum() for k in arr)))
            assert r.content["metrics"]["num-examples"] == 1  # uniform weights for the accountant
        return FedAvg.aggregate_train(self, server_round, replies)

    cfg = _cfg(weights, tmp_path, dp="server", dp_clip_norm=clip, dp_noise_multiplier=sigma, num_server_rounds=2)
    fed, summary = run_federation(InProcessGrid(create_app(), 2, cfg.to_dict()), cfg)
    ref = rdp.RdpAccountant()
    ref.compose(dp_event.GaussianDpEvent(sigma))  # the statistics release (dp-stats-noise-multiplier = sigma)
    eps = [r["dp_epsilon"] for r in fed.history]
    for rnd, e in enumerate(eps):
        if rnd:
            ref.compose(dp_event.GaussianDpEvent(sigma))
        assert e == pytest.approx(ref.get_epsilon(cfg.dp_delta), rel=1e-9)
        assert e == pytest.approx(projected_epsilon(sigma, rnd, cfg.dp_delta, sigma), rel=1e-9)
    assert eps[0] < eps[1] < eps[2] and summary["dp_epsilon"] == eps[-1] and fed.history[-1]["dp_releases"] == 3
    assert fed.history[1]["dp_noise_std"] == pytest.approx(sigma * clip / 2)
    assert (Path(summary["run_dir"]) / "privacy.json").is_file()
    # the clipping check needs the spied aggregate, which Flower's accountant refuses: a separate short run
    monkeypatch.setattr(TaskEdgeFedAvg, "aggregate_train", spy_aggregate)
    cfg = _cfg(weights, tmp_path, dp="server", dp_clip_norm=clip, dp_noise_multiplier=0.0)
    run_federation(InProcessGrid(create_app(), 2, cfg.to_dict()), cfg)
    assert len(got) == 2 and max(got) <= clip * (1 + 1e-5)
    assert max(got) == pytest.approx(clip, rel=1e-3)  # an AdamW epoch moves far more than 0.05


@pytest.mark.parametrize("secure", [False, True])
def test_dp_client_side_every_update_entering_the_sum_is_clipped(weights, tmp_path, monkeypatch, secure):
    clip = 0.05
    norms = []

    def observe(msg, reply):
        if msg.metadata.message_type == "train" and "arrays" in msg.content and not secure:
            sent = {k: v.numpy() for k, v in msg.content["arrays"].items()}
            back = {k: v.numpy() for k, v in reply.content["arrays"].items()}
            norms.append(np.sqrt(sum(((back[k].astype(np.float64) - sent[k]) ** 2).sum() for k in sent)))

    real = client_privacy.train_contribution

    def spy(received, trained, weight, bound, *args, **kwargs):  # the vectors SecAgg+ quantizes and masks
        out = real(received, trained, weight, bound, *args, **kwargs)
        norms.append(np.sqrt(sum((v ** 2).sum() for v in out[:len(received)])) / weight)
        return out

    monkeypatch.setattr(client_privacy, "train_contribution", spy)
    cfg = _cfg(weights, tmp_path, dp="client", dp_clip_norm=clip, dp_noise_multiplier=0.5,
               secure_aggregation=secure)
    nodes = 3 if secure else 2
    fed, summary = run_federation(InProcessGrid(create_app(), nodes, cfg.to_dict(), observe=observe), cfg)
    assert summary["rounds"] == 1 and not fed.dropped and len(norms) == nodes
    assert max(norms) <= clip * (1 + 1e-5) and max(norms) == pytest.approx(clip, rel=1e-3)
    assert fed.history[-1]["dp_epsilon"] == pytest.approx(projected_epsilon(0.5, 1, cfg.dp_delta, 0.5))


def test_dp_noise_sd_on_the_aggregate_is_noise_multiplier_times_clip_over_n(weights, tmp_path):
    """Statistical: 20,000 entries of pure noise (every node returns the global arrays unchanged)."""
    sigma, clip, n = 2.0, 0.5, 4
    cfg = parse_run_config(method="head-only", dp="client", dp_clip_norm=clip, dp_noise_multiplier=sigma)
    grid = InProcessGrid(create_app(), n)
    privacy = Privacy(cfg, RoundLog(), None, sorted(grid.get_node_ids()))
    strategy = privacy.wrap(make_strategy(cfg, None, False, wrapped=True))
    arrays = array_record({"w": np.zeros(20_000, np.float32)})
    msgs = [stamp(m) for m in strategy.configure_train(1, arrays, ConfigRecord(), grid)]
    assert len(msgs) == n
    replies = [Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 1})}), reply_to=m)
               for m in msgs]
    np.random.seed(0)
    out, _ = strategy.aggregate_train(1, replies)
    noise = out["w"].numpy().astype(np.float64)
    want = sigma * clip / n
    assert abs(noise.mean()) < 4 * want / np.sqrt(noise.size)
    assert noise.std() == pytest.approx(want, rel=0.03)  # sd of the estimate ~0.5 %
    assert privacy.spent()["dp_epsilon"] == pytest.approx(projected_epsilon(sigma, 1, cfg.dp_delta))


def test_dp_statistics_are_clipped_and_noised_with_the_stated_sd(weights, tmp_path):
    sigma_s, bound = 0.05, 100.0
    cfg = _cfg(weights, tmp_path, dp="server", dp_stats_noise_multiplier=sigma_s, stats_clip_norm=bound)
    raw = []
    grid = InProcessGrid(create_app(), 2, cfg.to_dict(), observe=lambda m, r: raw.append(
        {k: v.numpy() for k, v in r.content["stats"].items()}) if m.metadata.message_type == "query.stats" else None)
    log = RoundLog()
    privacy = Privacy(cfg, log, None, sorted(grid.get_node_ids()))
    np.random.seed(1)
    mask = privacy.statistics_phase(grid, sorted(grid.get_node_ids()))
    assert mask is not None and log.rec["dp_stats_noise_std"] == pytest.approx(sigma_s * bound)
    names = sorted(k[:-3] for k in raw[0] if k.endswith(".ss"))
    exact = np.concatenate([sum(r[f"{m}.ss"] / r[f"{m}.n"][0] for r in raw).ravel() for m in names])
    released = np.concatenate([privacy.released[m].ravel() for m in names])
    # every node's mean-square vector is inside the bound, so the clipped sum is the plain sum of mean squares
    assert all(np.sqrt(sum(((r[f"{m}.ss"] / r[f"{m}.n"][0]) ** 2).sum() for m in names)) < bound for r in raw)
    assert "stats_clipped" not in log.rec  # DP: no un-noised count of clipped nodes is released
    noise = released - exact
    assert abs(noise.mean()) < 4 * sigma_s * bound / np.sqrt(noise.size)
    assert noise.std() == pytest.approx(sigma_s * bound, rel=0.05)  # 1,984 entries: sd of the estimate ~1.6 %
    assert log.rec["dp_epsilon"] == pytest.approx(projected_epsilon(cfg.dp_noise_multiplier, 0, cfg.dp_delta, sigma_s))
    # a node whose mean squares exceed the bound is scaled down to it: two unit vectors of positive entries
    cfg = _cfg(weights, tmp_path, dp="server", stats_clip_norm=1.0, dp_stats_noise_multiplier=1e-12)
    privacy = Privacy(cfg, RoundLog(), None, sorted(grid.get_node_ids()))
    privacy.statistics_phase(grid, sorted(grid.get_node_ids()))
    total = np.sqrt(sum((privacy.released[m] ** 2).sum() for m in names))
    assert np.sqrt(2) - 1e-6 <= total <= 2 + 1e-6


def test_max_epsilon_stops_the_run_before_the_release_that_would_pass_it(weights, tmp_path):
    sigma = 2.0
    limit = (projected_epsilon(sigma, 1, 1e-5, sigma) + projected_epsilon(sigma, 2, 1e-5, sigma)) / 2
    cfg = _cfg(weights, tmp_path, dp="client", dp_noise_multiplier=sigma, max_epsilon=limit, num_server_rounds=3)
    fed, summary = run_federation(InProcessGrid(create_app(), 2, cfg.to_dict()), cfg)
    assert summary["rounds"] == 1 and "max_epsilon" in summary["stopped"] and summary["dp_epsilon"] <= limit
    assert (Path(summary["run_dir"]) / "final_model.safetensors").is_file()
    # not even the statistics release fits: nothing is released, the run still ends with a model and a status
    cfg = _cfg(weights, tmp_path, dp="client", dp_noise_multiplier=sigma, max_epsilon=0.01)
    fed, summary = run_federation(InProcessGrid(create_app(), 2, cfg.to_dict()), cfg)
    assert summary["rounds"] == 0 and "statistics release" in summary["stopped"] and fed.mask is None
    doc = json.loads((Path(summary["run_dir"]) / "results.json").read_text())
    assert doc["status"].startswith("stopped: stopped before training")
    assert (Path(summary["run_dir"]) / "final_model.safetensors").is_file()


def test_max_epsilon_met_by_a_re_reconciliation_ends_the_run_cleanly(weights, tmp_path):
    """The review's finding: PrivacyBudgetExhausted from re-reconciliation escaped the runner's `try`
    (no final model, status 'running'). Budget: statistics + 2 training releases, not a 2nd statistics one."""
    sigma = 2.0
    limit = (projected_epsilon(sigma, 2, 1e-5, sigma) + projected_epsilon(sigma, 2, 1e-5, sigma, 2)) / 2
    cfg = _cfg(weights, tmp_path, dp="client", dp_noise_multiplier=sigma, max_epsilon=limit, num_server_rounds=4,
               reconcile_every=2)
    fed, summary = run_federation(InProcessGrid(create_app(), 2, cfg.to_dict()), cfg)
    assert summary["rounds"] == 2 and "statistics release" in summary["stopped"] and summary["dp_epsilon"] <= limit
    doc = json.loads((Path(summary["run_dir"]) / "results.json").read_text())
    assert doc["status"].startswith("stopped:") and (Path(summary["run_dir"]) / "final_model.safetensors").is_file()


def test_a_resumed_dp_run_continues_the_privacy_account(weights, tmp_path):
    sigma = 2.0
    cfg = _cfg(weights, tmp_path, dp="client", dp_noise_multiplier=sigma)
    fed, summary = run_federation(InProcessGrid(create_app(), 2, cfg.to_dict()), cfg)
    cfg2 = _cfg(weights, tmp_path, dp="client", dp_noise_multiplier=sigma, num_server_rounds=2,
                resume=summary["run_dir"])
    fed2, summary2 = run_federation(InProcessGrid(create_app(), 2, cfg2.to_dict()), cfg2)
    assert summary2["dp_epsilon"] == pytest.approx(projected_epsilon(sigma, 2, cfg.dp_delta, sigma))
    (Path(summary["run_dir"]) / "privacy.json").unlink()
    with pytest.raises(ValueError, match="privacy spent before the checkpoint is unknown"):
        run_federation(InProcessGrid(create_app(), 2, cfg2.to_dict()), cfg2)


def test_privacy_settings_refuse_what_cannot_be_protected(weights, tmp_path):
    for kw, match in [(dict(secure_aggregation=True, dp="server", dp_clip_norm=1.0), "dp=client"),
                      (dict(secure_aggregation=True, clip_norm=1.0, aggregation="median"), "only the sum"),
                      (dict(secure_aggregation=True), "fixed bound"),
                      (dict(dp="client", reconcile="vote"), "pooled statistics"),
                      (dict(dp="client", dp_clipping="adaptive"), "dp=server only"),
                      (dict(max_epsilon=1.0), "needs dp")]:
        with pytest.raises(ValueError, match=match):
            parse_run_config(**kw)
    cfg = _cfg(weights, tmp_path, dp="client", budget_ranks="0,1")
    with pytest.raises(ValueError, match="nested budgets"):
        run_federation(InProcessGrid(create_app(), 2, cfg.to_dict()), cfg)


@pytest.mark.slow
def test_secure_and_dp_run_on_flowers_simulation_runtime(weights, tmp_path, simulate):
    last = simulate({"num-server-rounds": 2, "output-dir": str(tmp_path / "runs"), "server-test-size": 100,
                       "min-nodes": 3, "local-epochs": 1, "weights-path": weights, "calib-size": 16,
                       "secure-aggregation": True, "dp": "client", "dp-clip-norm": 1.0,
                       "dp-noise-multiplier": 0.5})
    summary, history = last["summary"], last["history"]
    assert summary["rounds"] == 2 and summary["secure_aggregation"] and summary["skipped_rounds"] == 0
    assert all(r["secagg_active"] == 3 for r in history[1:])
    assert summary["dp_epsilon"] == pytest.approx(projected_epsilon(0.5, 2, 1e-5, 0.5))


@pytest.mark.slow
def test_bench_privacy_quick(weights, tmp_path):
    from benchmarks.bench_privacy import main

    doc = main(["--quick", "--weights", weights, "--out", str(tmp_path)])
    by = {a["config"]: a for a in doc["summary"]}
    assert set(by) == {"plain", "secagg", "dp eps=8"}
    assert by["secagg"]["acc_mean"] == pytest.approx(by["plain"]["acc_mean"], abs=0.02)
    assert by["dp eps=8"]["epsilon"] == pytest.approx(8.0)
    assert (tmp_path / "bench_privacy_quick.png").read_bytes()[:4] == b"\x89PNG"
    assert "| secagg |" in (tmp_path / "bench_privacy_quick.md").read_text()


# ------------------------------------------------------------------ one node cannot stop a secure round
def _tampering(stage: str, kind: str, node: int = 1001):
    """A mod that rewrites `node`'s reply at one SecAgg+ stage (the reviewer's crafted replies, every stage)."""
    from flwr.common.secure_aggregation.secaggplus_constants import Key

    lists = {"setup": (Key.PUBLIC_KEY_1, None), "share_keys": (Key.DESTINATION_LIST, Key.CIPHERTEXT_LIST),
             "collect_masked_vectors": (Key.MASKED_PARAMETERS, None), "unmask": (Key.NODE_ID_LIST, Key.SHARE_LIST)}

    def mod(msg, ctx, call_next):
        conf = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        now = conf.get("stage") if conf is not None else None  # read before Flower's mod consumes it
        reply = call_next(msg, ctx)
        if ctx.node_id != node or now != stage or reply.has_error():
            return reply
        out = reply.content.config_records[RECORD_KEY_CONFIGS]
        ids, values = lists[stage]
        if kind == "missing":
            del out[ids]
        elif kind == "outside-id" and values is not None:
            out[ids] = [999_999] + list(out[ids])[1:]
        elif kind == "repeated-id" and values is not None and len(out[ids]) > 1:
            out[ids] = [out[ids][0]] * len(out[ids])
        elif kind == "wrong-type":
            out[ids] = [1.5] * 2 if values is not None else "x"
        elif kind == "short":
            out[ids] = list(out[ids])[:-1] if isinstance(out[ids], list) and out[ids] else []
        elif kind == "garbage-bytes":
            target = values or ids
            if isinstance(out[target], list):
                out[target] = [b"\x00" * 7 for _ in out[target]]
            else:
                out[target] = b"\x00" * 7
        return reply

    return mod


@pytest.mark.parametrize("stage", ["setup", "share_keys", "collect_masked_vectors", "unmask"])
@pytest.mark.parametrize("kind", ["missing", "outside-id", "repeated-id", "wrong-type", "short", "garbage-bytes"])
def test_a_crafted_secagg_reply_at_any_stage_is_that_nodes_dropout_never_the_runs_end(stage, kind):
    deltas, weights = _deltas(6), {n: 10 for n in range(1000, 1004)}
    # 4 nodes, threshold 3: one loss is tolerated
    current, replies, res, rec = _secure_round(deltas, weights, tamper=_tampering(stage, kind))
    if res.sums is None:  # the protocol could not finish: the round is skipped with its reason, nothing raised
        assert all(r.has_error() for r in replies) and rec["secagg_error"]
        return
    got = replies[0].content["arrays"]["values"].numpy()
    summed = res.active
    want = current["values"] + np.mean([deltas[n]["values"] for n in summed], axis=0)
    assert np.abs(got - want).max() <= quantization_bound(1.0, T, len(summed), 0.1 * len(summed)) + 1e-6
