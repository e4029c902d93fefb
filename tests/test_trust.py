"""The review's findings on privacy and trust, one test each (they fail on main at 79e37b1).

In-process federations of the real apps on a random-init copy of the embedded ViT (tiny settings).
"""
import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from client.client_app import app as client_app
from common.settings import parse_run_config
from common.taskedge.stats import sum_stats
from common.wire import nested
from server.inprocess import InProcessGrid
from server.phases import statistics_phase
from server.recorder import RoundLog
from server.robust import UpdateClipping
from server.runner import run_federation


def _cfg(weights, tmp_path, **kw):
    base = {"weights-path": weights, "num-partitions": 20, "num-server-rounds": 1, "server-test-size": 50,
            "calib-size": 16, "output-dir": str(tmp_path), "min-nodes": 1, "local-epochs": 1}
    return parse_run_config(base, **kw)


# ------------------------------------------------------------------ 1. DP: one fixed clip, nothing un-noised
def test_dp_run_clips_at_dp_clip_norm_only_and_records_no_single_client_quantity(weights, tmp_path):
    """With dp and the defaults (clip-norm 0, clip-factor 3) the bound was 3 x the round's median norm, which
    moves when one client is removed; now it is dp-clip-norm, and no norm, clip count or metric is kept."""
    cfg = _cfg(weights, tmp_path, dp="client", dp_clip_norm=7.5, dp_noise_multiplier=0.5, fraction_evaluate=1.0)
    grid = InProcessGrid(client_app, 3, cfg.to_dict())
    fed, summary = run_federation(grid, cfg)
    rec = fed.history[-1]
    assert rec["clip_bound"] == 7.5 and rec["replies"] == 3
    doc = json.loads((Path(summary["run_dir"]) / "results.json").read_text())
    for key in ("update_norm_max", "clipped", "train_loss", "train_acc", "fed_acc", "fed_loss", "stats_clipped"):
        assert all(r.get(key) is None for r in doc["rounds"]), key
    assert not [d for d in grid.delivered if d["type"] == "evaluate"]  # federated evaluation is off


def test_update_clipping_in_a_private_run_is_data_independent():
    """The reviewer's numbers: norms [1, 1, 1, 10, 10] — the bound must not move when a client leaves."""
    with pytest.raises(ValueError, match="fixed bound"):
        UpdateClipping(None, RoundLog(), 0.0, 3.0, private=True)
    assert UpdateClipping(None, RoundLog(), 10.0, 3.0, private=True).clip_norm == 10.0


def test_dp_refuses_a_second_clip_norm():
    with pytest.raises(ValueError, match="run config 'clip-norm'.*dp-clip-norm"):
        parse_run_config(dp="client", clip_norm=3.0, dp_clip_norm=10.0)
    assert parse_run_config(dp="client", clip_norm=10.0, dp_clip_norm=10.0).clip_norm == 10.0


# ------------------------------------------------------------------ 3. secure mode: no per-node metrics
def test_secure_mode_sends_no_federated_evaluation(weights, tmp_path):
    cfg = _cfg(weights, tmp_path, secure_aggregation=True, clip_norm=50.0, fraction_evaluate=1.0)
    grid = InProcessGrid(client_app, 3, cfg.to_dict())
    fed, summary = run_federation(grid, cfg)
    assert summary["rounds"] == 1 and fed.history[-1]["secagg_active"] == 3
    assert not [d for d in grid.delivered if d["type"] == "evaluate"]
    assert fed.history[-1].get("fed_acc") is None


# ------------------------------------------------------------------ 5. statistics one node cannot steer
def test_one_node_claiming_huge_sums_of_squares_does_not_decide_the_mask(weights, tmp_path):
    cfg = _cfg(weights, tmp_path)
    honest_grid = InProcessGrid(client_app, 4, cfg.to_dict())
    nodes = sorted(honest_grid.get_node_ids())
    raw = {}
    honest_grid.observe = lambda m, r: raw.__setitem__(m.metadata.dst_node_id, {
        k: v.numpy() for k, v in r.content["stats"].items()}) if m.metadata.message_type == "query.stats" else None
    honest = statistics_phase(honest_grid, cfg, nodes, RoundLog())
    liar = nodes[0]
    rng = np.random.default_rng(0)
    boosted = {}  # valid-looking sums of squares: random columns x 1e10 (well inside the 1e24 x rows limit)

    def tamper(nid, reply):
        if nid == liar and reply.metadata.message_type == "query.stats":
            rec = reply.content["stats"]
            for k in list(rec.keys()):
                if k.endswith(".ss"):
                    v = rec[k].numpy() * rng.uniform(0, 1e10, rec[k].numpy().shape)
                    boosted[k] = v
                    rec[k] = Array(v)
        return reply

    grid = InProcessGrid(client_app, 4, cfg.to_dict(), tamper=tamper)
    log = RoundLog()
    attacked = statistics_phase(grid, cfg, sorted(grid.get_node_ids()), log)
    assert boosted
    kept = sum(int(np.intersect1d(attacked.indices[n].numpy(), honest.indices[n].numpy()).size)
               for n in honest.names())
    # without the clip the liar's random columns pull the mask to 59 % overlap with the honest one (measured on
    # 79e37b1); clipped to stats-clip-norm=100 (honest nodes: norm ~33 here) it pulls like ~3 honest nodes: 76 %
    assert kept >= 0.7 * honest.num_entries, kept / honest.num_entries
    assert log.rec["stats_clipped"] == 1
    # honest nodes are under the bound, so their pooling stays exact: the honest mask is the mask of the sum
    from common.taskedge.tuner import build_mask
    from common.taskedge.stats import arrays_to_norms
    from server.phases import server_model

    log2 = RoundLog()
    again = statistics_phase(honest_grid, cfg, nodes, log2)
    exact = build_mask(server_model(cfg), cfg.taskedge_config(), arrays_to_norms(sum_stats(list(raw.values()))))
    assert log2.rec["stats_clipped"] == 0
    for n in exact.names():
        assert np.array_equal(again.indices[n].numpy(), exact.indices[n].numpy())


# ------------------------------------------------------------------ 7. sub-masks enforced
def test_a_nested_node_writing_outside_its_sub_mask_is_refused_before_clipping(weights, tmp_path):
    cfg = _cfg(weights, tmp_path, budget_ranks="0,0,1", fraction_evaluate=0.0, server_test_size=0,
               clip_factor=3.0)
    state = {}

    def tamper(nid, reply):
        if reply.metadata.message_type == "train" and nid == state["small"]:
            values = reply.content["arrays"]["values"].numpy().copy()
            pos = nested(state["mask"], 1)[1]
            outside = np.setdiff1d(np.arange(values.size), pos)
            values[outside] += 0.5  # the reviewer's attack: 1,901 entries of 0.5 outside its sub-mask
            rec = dict(reply.content["arrays"].items())
            rec["values"] = Array(values)
            reply.content["arrays"] = ArrayRecord(rec)
        return reply

    grid = InProcessGrid(client_app, 3, cfg.to_dict(), tamper=tamper)
    state["small"] = sorted(grid.contexts)[2]
    real_install = grid.client_app

    def capture(msg, ctx):  # the mask the nodes get, for the attacker's positions
        if msg.metadata.message_type == "query.mask" and "mask" not in state:
            from common.taskedge.allocation import Mask
            state["mask"] = Mask.from_arrays({k: v.numpy() for k, v in msg.content["mask"].items()})
        return real_install(msg, ctx)

    grid.client_app = capture
    fed, summary = run_federation(grid, cfg)
    reasons = [d["reason"] for d in fed.dropped if d["node"] == state["small"]]
    assert reasons and "outside the node's budget-rank sub-mask" in reasons[0]
    assert fed.history[-1]["replies"] == 2 and summary["rounds"] == 1
    # the attacker failed every round: the run says so instead of 'complete'
    status = json.loads((Path(summary["run_dir"]) / "results.json").read_text())["status"]
    assert status.startswith("degraded: 1 node(s) failed every round") and "sub-mask" in status
