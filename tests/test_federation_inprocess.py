"""The real ClientApp handlers and strategy, with an in-process Grid (no Ray): protocol-level checks.

A random-init copy of the embedded ViT is saved as a local weights file, so nothing pre-trains,
and partitions are small (num-partitions=20) so each federation takes seconds.
"""
import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from client.client_app import app as client_app
from client.data import load_local_data
from client.settings import parse_run_config
from common.config import TaskEdgeConfig
from common.models import create_model
from common.stats import collect_stats
from common.tuner import build_mask, target_modules
from server.inprocess import InProcessGrid
from server.runner import run_federation
from server.strategy import TaskEdgeStrategy


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = create_model("taskedge-vit-tiny", num_classes=10)
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return str(path)


def _cfg(weights, tmp_path, **kw):
    base = {"weights-path": weights, "num-partitions": 20, "num-server-rounds": 2, "server-test-size": 100,
            "calib-size": 32, "batch-size": 32, "output-dir": str(tmp_path), "min-nodes": 1}
    base.update({k.replace("_", "-"): v for k, v in kw.items()})
    return parse_run_config(base)


def _run(cfg, nodes=3, **grid_kw):
    grid = InProcessGrid(client_app, nodes, cfg.to_dict(), **grid_kw)
    strategy, summary = run_federation(grid, cfg)
    return grid, strategy, summary


def _train_msgs(grid, rnd):
    return [d for d in grid.delivered if d["type"] == "train" and d["group"] == str(rnd)]


def test_strategy_mask_equals_pooled_client_calibration(weights, tmp_path):
    cfg = _cfg(weights, tmp_path)
    grid = InProcessGrid(client_app, 3, cfg.to_dict())
    strategy = TaskEdgeStrategy(cfg)
    strategy.initialize(grid)
    model = create_model("taskedge-vit-tiny", num_classes=10, weights=weights)
    tcfg = TaskEdgeConfig(budget=cfg.budget)
    batches = []
    for pid in range(3):
        d = load_local_data(cfg.task, pid, 20, partitioner=cfg.partitioner, alpha=cfg.alpha, seed=cfg.seed,
                            test_fraction=cfg.test_fraction, calib_size=cfg.calib_size)
        batches += [d.x_calib[i:i + cfg.batch_size] for i in range(0, len(d.x_calib), cfg.batch_size)]
    pooled = collect_stats(model, target_modules(model, tcfg), batches)
    central = build_mask(model, tcfg, {n: s.norm() for n, s in pooled.items()})
    for n in central.names():
        assert torch.equal(strategy.mask.indices[n], central.indices[n]), n


def test_wire_format_and_results(weights, tmp_path):
    cfg = _cfg(weights, tmp_path)
    grid, strategy, summary = _run(cfg)
    head = sum(v.size for k, v in strategy.global_arrays.items() if k != "values")
    bound = 4 * (strategy.mask.num_entries + head)
    r1, r2 = _train_msgs(grid, 1), _train_msgs(grid, 2)
    assert all("mask" in d["records"] for d in r1)  # indices go down once ...
    assert not any("mask" in d["records"] for d in r2)  # ... and never again
    for d in r1 + r2:  # values only, up and down, within a small framing constant
        assert bound <= d["up"] <= bound + 1024
    for d in r2:
        assert bound <= d["down"] <= bound + 512
    assert all("setup" in d["records"] for d in r1) and not any("setup" in d["records"] for d in r2)
    assert 1.0 <= summary["bound_ratio"] < 1.05
    run = strategy.run_dir
    for f in ("results.json", "rounds.csv", "accuracy.png", "checkpoint.safetensors", "final_model.safetensors",
              "config.json"):
        assert (run / f).is_file(), f
    doc = json.loads((run / "results.json").read_text())
    assert [r["round"] for r in doc["rounds"]] == [0, 1, 2]
    assert doc["summary"]["rounds"] == 2 and doc["rounds"][2]["bytes_up"] == sum(d["up"] for d in r2)
    from safetensors.torch import load_file

    plain = create_model("taskedge-vit-tiny", num_classes=10)
    plain.load_state_dict(load_file(str(run / "final_model.safetensors")))  # a plain, merged model


def test_rereconciliation_resends_mask(weights, tmp_path):
    cfg = _cfg(weights, tmp_path, reconcile_every=1, num_server_rounds=2, server_test_size=0, fraction_evaluate=0.0)
    grid, strategy, _ = _run(cfg)
    assert [d["type"] for d in grid.delivered].count("query.stats") == 3 * 2
    assert all("mask" in d["records"] for d in _train_msgs(grid, 2))
    assert strategy.mask_version == 2


def test_lost_client_state_is_dropped_then_healed(weights, tmp_path):
    cfg = _cfg(weights, tmp_path, num_server_rounds=3, server_test_size=0, fraction_evaluate=0.0)
    grid = InProcessGrid(client_app, 2, cfg.to_dict())
    node = sorted(grid.contexts)[1]

    def forget(nid, reply):
        if nid == node and reply.metadata.group_id == "1":
            grid.contexts[nid].state = RecordDict()  # e.g. the device restarted after round 1
        return reply

    grid.tamper = forget
    strategy, _ = run_federation(grid, cfg)
    reasons = [d["reason"] for d in strategy.dropped]
    assert len(reasons) == 1 and "must resend" in reasons[0]
    assert all("mask" in d["records"] for d in _train_msgs(grid, 3) if d["node"] == node)


def _tamper_factory(kinds):
    def tamper(nid, reply):
        kind = kinds.get(nid)
        if kind is None or reply.metadata.message_type != "train" or reply.has_error():
            return reply
        arrays = {k: v.numpy() for k, v in reply.content["arrays"].items()}
        n = reply.content["metrics"]["num-examples"]
        if kind == "length":
            arrays["values"] = arrays["values"][:-1]
        elif kind == "nan":
            arrays["values"][3] = np.nan
        elif kind == "dtype":
            arrays["values"] = arrays["values"].astype(np.float64)
        elif kind == "key":
            arrays["extra"] = np.zeros(3, np.float32)
        elif kind == "examples":
            n = -5
        content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                              "metrics": MetricRecord({"num-examples": n})})
        return Message(content, metadata=reply.metadata)
    return tamper


def test_bad_replies_are_dropped_with_a_reason(weights, tmp_path):
    cfg = _cfg(weights, tmp_path, num_server_rounds=1, fraction_evaluate=0.0, server_test_size=0)
    grid = InProcessGrid(client_app, 6, cfg.to_dict())
    ids = sorted(grid.contexts)
    grid.tamper = _tamper_factory(dict(zip(ids, ["length", "nan", "dtype", "key", "examples"])))
    strategy, summary = run_federation(grid, cfg)
    reasons = sorted(d["reason"] for d in strategy.dropped)
    assert len(reasons) == 5
    for needle in ("length", "NaN/Inf", "dtype float64", "unknown key 'extra'", "non-negative integer"):
        assert any(needle in r for r in reasons), (needle, reasons)
    rec = strategy.history[-1]
    assert rec["replies"] == 1 and not rec["skipped"] and summary["rounds"] == 1


def test_too_few_valid_replies_skip_the_round(weights, tmp_path):
    cfg = _cfg(weights, tmp_path, num_server_rounds=1, fraction_evaluate=0.0, server_test_size=0, min_replies=2)
    grid = InProcessGrid(client_app, 2, cfg.to_dict())
    grid.tamper = _tamper_factory({sorted(grid.contexts)[0]: "nan"})
    strategy = TaskEdgeStrategy(cfg)
    initial = strategy.initialize(grid)
    before = {k: v.copy() for k, v in strategy.global_arrays.items()}
    strategy.start(grid=grid, initial_arrays=initial, num_rounds=1, evaluate_fn=strategy.central_evaluate)
    assert strategy.history[-1]["skipped"] and strategy.history[-1]["replies"] == 1
    for k, v in before.items():
        np.testing.assert_array_equal(strategy.global_arrays[k], v)


def test_heterogeneous_budgets_train_nested_subsets(weights, tmp_path):
    # node 0: full mask; node 1: rank-0 entries only (budget-rank 1)
    cfg = _cfg(weights, tmp_path, num_server_rounds=1, budget_ranks="0,1", fraction_evaluate=0.0,
               server_test_size=0, budget=0.02)
    grid = InProcessGrid(client_app, 2, cfg.to_dict())
    strategy = TaskEdgeStrategy(cfg)
    strategy.initialize(grid)
    full, small = sorted(grid.contexts)
    assert strategy.node_rank == {full: 0, small: 1}
    before = strategy.global_arrays["values"].copy()
    msgs = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, None, None, grid)}
    v_small = strategy._view(small)
    assert len(msgs[small].content["arrays"]["values"].numpy()) == strategy.mask.subset(1).num_entries
    assert len(msgs[full].content["arrays"]["values"].numpy()) == strategy.mask.num_entries
    assert msgs[small].content["mask"]["blocks.0.mlp.fc1.idx"].numpy().size < \
        msgs[full].content["mask"]["blocks.0.mlp.fc1.idx"].numpy().size

    def reply(m, values, n):
        arrays = {k: v.numpy() for k, v in m.content["arrays"].items()}
        arrays["values"] = np.full_like(arrays["values"], values)
        return Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                                   "metrics": MetricRecord({"num-examples": n})}), reply_to=m)

    strategy.aggregate_train(1, [reply(msgs[full], 1.0, 10), reply(msgs[small], 4.0, 30)])
    after = strategy.global_arrays["values"]
    shared = np.zeros(len(before), bool)
    shared[v_small.positions] = True
    np.testing.assert_allclose(after[shared], (1.0 * 10 + 4.0 * 30) / 40)  # both trained these
    np.testing.assert_allclose(after[~shared], 1.0)  # only the full-budget node trained these
    assert (~shared).any()


@pytest.mark.parametrize("method", ["fedavg-full", "fedlora"])
def test_baselines_run_and_count_bytes(weights, tmp_path, method):
    cfg = _cfg(weights, tmp_path, method=method, num_server_rounds=1, fraction_evaluate=0.0)
    grid, strategy, summary = _run(cfg, nodes=2)
    entries = sum(v.size for v in strategy.global_arrays.values())
    assert not any(d["type"] == "query.stats" for d in grid.delivered)
    assert 4 * entries <= summary["upload_bytes_per_client_round"] <= 4 * entries + 256 * len(strategy.global_arrays) + 256
    if method == "fedavg-full":
        assert entries == sum(p.numel() for p in create_model("taskedge-vit-tiny", num_classes=10).parameters())
    else:
        assert all("lora_" in k or "head" in k for k in strategy.global_arrays)


def test_vote_mode_and_resume(weights, tmp_path):
    cfg = _cfg(weights, tmp_path, reconcile="vote", num_server_rounds=1, fraction_evaluate=0.0)
    _, first, _ = _run(cfg)
    assert first.mask.num_entries > 0
    cfg2 = _cfg(weights, tmp_path, reconcile="vote", num_server_rounds=2, fraction_evaluate=0.0,
                resume=str(first.run_dir))
    _, second, summary = _run(cfg2)
    assert [r["round"] for r in second.history] == [1, 2] and summary["rounds"] == 1
    for n in first.mask.names():
        assert torch.equal(first.mask.indices[n], second.mask.indices[n])
    assert second.history[0]["central_acc"] == first.history[-1]["central_acc"]
