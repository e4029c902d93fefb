"""The real ClientApp handlers and strategy, with an in-process Grid (no Ray): protocol-level checks.

A random-init copy of the embedded ViT is saved as a local weights file, so nothing pre-trains,
and partitions are small (num-partitions=20) so each federation takes seconds.
"""
import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from client.client_app import app as client_app
from common.taskedge.config import TaskEdgeConfig
from common.methods import get_arrays, method_model
from common.models import create_model
from common.partition import load_local_data
from common.settings import parse_run_config
from common.taskedge.stats import collect_stats
from common.taskedge.tuner import build_mask, target_modules
from common.wire import nested
from server.inprocess import InProcessGrid
from server.phases import statistics_phase
from server.recorder import RoundLog
from server.runner import run_federation


def _cfg(weights, tmp_path, **kw):
    base = {"weights-path": weights, "num-partitions": 20, "num-server-rounds": 2, "server-test-size": 100,
            "calib-size": 32, "batch-size": 32, "output-dir": str(tmp_path), "min-nodes": 1}
    base.update({k.replace("_", "-"): v for k, v in kw.items()})
    return parse_run_config(base)


def _run(cfg, nodes=3, **grid_kw):
    grid = InProcessGrid(client_app, nodes, cfg.to_dict(), **grid_kw)
    fed, summary = run_federation(grid, cfg)
    return grid, fed, summary


def _sent(grid, kind, rnd=None):
    return [d for d in grid.delivered if d["type"] == kind and (rnd is None or d["round"] == rnd)]


def test_statistics_phase_mask_equals_pooled_client_calibration(weights, tmp_path):
    cfg = _cfg(weights, tmp_path)
    grid = InProcessGrid(client_app, 3, cfg.to_dict())
    mask = statistics_phase(grid, cfg, sorted(grid.get_node_ids()), RoundLog())
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
        assert torch.equal(mask.indices[n], central.indices[n]), n


def test_wire_format_and_results(weights, tmp_path):
    cfg = _cfg(weights, tmp_path)
    grid, fed, summary = _run(cfg)
    head = sum(v.size for k, v in fed.arrays.items() if k != "values")
    bound = 4 * (fed.mask.num_entries + head)
    masks = _sent(grid, "query.mask")
    assert sorted(d["node"] for d in masks) == sorted(grid.contexts)  # indices go down once per node ...
    r1, r2 = _sent(grid, "train", 1), _sent(grid, "train", 2)
    assert len(r1) == len(r2) == 3
    for d in r1 + r2:  # ... and never with the values: one ArrayRecord, one ConfigRecord, fixed length
        assert d["records"] == ["arrays", "config"]
        assert bound <= d["up"] <= bound + 1024
        assert bound <= d["down"] <= bound + 1024 + 512  # the run config's client keys travel down (~1 kB)
    assert len({d["up"] for d in r1 + r2}) == 1  # the same payload size from every node
    assert 1.0 <= summary["bound_ratio"] < 1.05
    run = fed.run_dir
    for f in ("results.json", "rounds.csv", "accuracy.png", "checkpoint.safetensors", "final_model.safetensors",
              "config.json"):
        assert (run / f).is_file(), f
    doc = json.loads((run / "results.json").read_text())
    assert doc["status"] == "complete"
    assert [r["round"] for r in doc["rounds"]] == [0, 1, 2]
    assert doc["summary"]["rounds"] == 2 and doc["rounds"][2]["bytes_up"] == sum(d["up"] for d in r2)
    assert doc["rounds"][0]["query_bytes_down"] == sum(d["down"] for d in grid.delivered if d["type"].startswith("query"))
    from safetensors.torch import load_file

    plain = create_model("taskedge-vit-tiny", num_classes=10)
    plain.load_state_dict(load_file(str(run / "final_model.safetensors")))  # a plain, merged model


def test_rereconciliation_resends_mask(weights, tmp_path):
    cfg = _cfg(weights, tmp_path, reconcile_every=1, num_server_rounds=2, server_test_size=0, fraction_evaluate=0.0)
    grid, fed, summary = _run(cfg)
    assert len(_sent(grid, "query.stats")) == 3 * 2 and len(_sent(grid, "query.mask")) == 3 * 2
    assert fed.mask_version == 2 and summary["rounds"] == 2
    assert [r["mask_version"] for r in fed.history] == [1, 1, 2]


def test_lost_client_state_is_dropped_then_healed(weights, tmp_path):
    cfg = _cfg(weights, tmp_path, num_server_rounds=3, server_test_size=0, fraction_evaluate=0.0)
    grid = InProcessGrid(client_app, 2, cfg.to_dict())
    node = sorted(grid.contexts)[1]
    seen = []

    def forget(nid, reply):
        if nid == node and reply.metadata.message_type == "train":
            seen.append(nid)
            if len(seen) == 1:
                grid.contexts[nid].state = RecordDict()  # e.g. the device restarted after round 1
        return reply

    grid.tamper = forget
    fed, _ = run_federation(grid, cfg)
    reasons = [d["reason"] for d in fed.dropped]
    assert len(reasons) == 1 and "must resend" in reasons[0] and fed.dropped[0]["round"] == 2
    assert [d["node"] for d in _sent(grid, "query.mask")].count(node) == 2  # re-delivered before round 3
    assert fed.history[-1]["replies"] == 2


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
    fed, summary = run_federation(grid, cfg)
    reasons = sorted(d["reason"] for d in fed.dropped)
    assert len(reasons) == 5
    for needle in ("length", "NaN/Inf", "dtype float64", "unknown key 'extra'", "non-negative integer"):
        assert any(needle in r for r in reasons), (needle, reasons)
    rec = fed.history[-1]
    assert rec["replies"] == 1 and not rec["skipped"] and summary["rounds"] == 1


def test_too_few_valid_replies_skip_the_round(weights, tmp_path):
    cfg = _cfg(weights, tmp_path, num_server_rounds=1, fraction_evaluate=0.0, server_test_size=0, min_replies=2)
    grid = InProcessGrid(client_app, 2, cfg.to_dict())
    grid.tamper = _tamper_factory({sorted(grid.contexts)[0]: "nan"})
    fed, _ = run_federation(grid, cfg)
    assert fed.history[-1]["skipped"] and fed.history[-1]["replies"] == 1
    initial = get_arrays("taskedge", method_model(cfg, fed.mask))  # zero deltas + the pre-trained head
    for k, v in initial.items():
        np.testing.assert_array_equal(fed.arrays[k], v)


def test_heterogeneous_budgets_train_nested_subsets(weights, tmp_path):
    """Node 0 trains the full mask, node 1 only the rank-0 entries; both send full-length vectors,
    and the new global value of every entry is the weighted mean over the nodes that trained it."""
    cfg = _cfg(weights, tmp_path, num_server_rounds=1, budget_ranks="0,1", fraction_evaluate=0.0,
               server_test_size=0, budget=0.02)
    grid = InProcessGrid(client_app, 2, cfg.to_dict())
    full, small = sorted(grid.contexts)
    replies = {}

    def keep(nid, reply):
        if reply.metadata.message_type == "train":
            replies[nid] = ({k: v.numpy() for k, v in reply.content["arrays"].items()},
                            reply.content["metrics"]["num-examples"])
        return reply

    grid.tamper = keep
    fed, _ = run_federation(grid, cfg)
    assert fed.node_rank == {full: 0, small: 1}
    pos = nested(fed.mask, 1)[1]
    assert 0 < len(pos) < fed.mask.num_entries
    (v_full, n_full), (v_small, n_small) = replies[full], replies[small]
    assert v_full["values"].shape == v_small["values"].shape == (fed.mask.num_entries,)
    others = np.setdiff1d(np.arange(fed.mask.num_entries), pos)
    np.testing.assert_array_equal(v_small["values"][others], 0.0)  # untrained: the values it was sent
    after = fed.arrays["values"]
    want = (v_full["values"][pos].astype(np.float64) * n_full + v_small["values"][pos] * n_small) / (n_full + n_small)
    np.testing.assert_allclose(after[pos], want, rtol=1e-5, atol=1e-8)  # float32 storage
    np.testing.assert_array_equal(after[others], v_full["values"][others])  # only the full node trained these
    head_want = (v_full["head.weight"] * n_full + v_small["head.weight"] * n_small) / (n_full + n_small)
    np.testing.assert_allclose(fed.arrays["head.weight"], head_want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["fedavg-full", "fedlora"])
def test_baselines_run_and_count_bytes(weights, tmp_path, method):
    cfg = _cfg(weights, tmp_path, method=method, num_server_rounds=1, fraction_evaluate=0.0)
    grid, fed, summary = _run(cfg, nodes=2)
    entries = sum(v.size for v in fed.arrays.values())
    # no statistics or mask phase: only the classes query (the nodes' class names fix the head) comes first
    assert {d["type"] for d in grid.delivered if d["type"].startswith("query")} == {"query.classes"}
    assert 4 * entries <= summary["upload_bytes_per_client_round"] <= 4 * entries + 256 * len(fed.arrays) + 256
    if method == "fedavg-full":
        assert entries == sum(p.numel() for p in create_model("taskedge-vit-tiny", num_classes=10).parameters())
    else:
        assert all("lora_" in k or "head" in k for k in fed.arrays)


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


def test_gradient_score_mask_is_the_allocation_of_the_summed_node_gradients(weights, tmp_path):
    """score='gradient' in the federation: each node's signed calibration-gradient sums (own probe) are
    validated, added up by the server, and the mask is the neuron-level top-k of |sum|; a node whose
    gradients are malformed is dropped with a reason."""
    from common.taskedge.allocation import allocate, budget_entries
    from common.taskedge.gradient_score import calibration_gradients
    from common.taskedge.tuner import backbone_parameters, find_head

    cfg = _cfg(weights, tmp_path, score="gradient")
    grid = InProcessGrid(client_app, 3, cfg.to_dict())
    mask = statistics_phase(grid, cfg, sorted(grid.get_node_ids()), RoundLog())
    model = create_model("taskedge-vit-tiny", num_classes=10, weights=weights)
    tcfg = cfg.taskedge_config()
    targets = target_modules(model, tcfg)
    total = None
    for pid in range(3):  # independent reference: the same probe + backward per node, summed here
        d = load_local_data(cfg.task, pid, 20, partitioner=cfg.partitioner, alpha=cfg.alpha, seed=cfg.seed,
                            test_fraction=cfg.test_fraction, calib_size=cfg.calib_size)
        b = [(d.x_calib[i:i + cfg.batch_size], d.y_calib[i:i + cfg.batch_size])
             for i in range(0, len(d.x_calib), cfg.batch_size)]
        g = calibration_gradients(model, targets, find_head(model), b, signed=True)
        total = g if total is None else {n: total[n] + g[n] for n in g}
    scores = {n: v.abs().float() for n, v in total.items()}
    count = budget_entries(cfg.budget, backbone_parameters(model, find_head(model)), sum(s.numel() for s in scores.values()))
    expected = allocate(scores, count, "neuron")
    for n in expected.names():
        assert torch.equal(mask.indices[n], expected.indices[n]), n
    # the paper score's mask differs (the labels matter)
    pgrid = InProcessGrid(client_app, 3, _cfg(weights, tmp_path).to_dict())
    paper = statistics_phase(pgrid, _cfg(weights, tmp_path), sorted(pgrid.get_node_ids()), RoundLog())
    assert any(not torch.equal(mask.indices[n], paper.indices[n]) for n in mask.names())


def test_gradient_replies_are_validated(weights, tmp_path):
    from server import validate

    cfg = _cfg(weights, tmp_path, score="gradient")
    grid = InProcessGrid(client_app, 1, cfg.to_dict())
    nid = min(grid.get_node_ids())
    out = Message(RecordDict({"config": ConfigRecord(cfg.client_config())}), dst_node_id=nid, message_type="query.stats")
    reply = grid.send_and_receive([out])[0]
    from server.phases import max_examples, server_model, stats_limits

    base = server_model(cfg)
    targets = target_modules(base, cfg.taskedge_config())
    shapes, rows = stats_limits(base, cfg, targets)
    gshapes = {n: (m.weight.shape[0], m.weight[0].numel()) for n, m in targets.items()}
    st, _, _ = validate.stats_reply(reply, shapes, rows, cfg.calib_size, max_examples(cfg), None, gshapes)
    assert all(f"{n}.g" in st and st[f"{n}.g"].shape == gshapes[n] for n in gshapes)
    name = min(gshapes)
    for bad, why in ((np.full(gshapes[name], np.nan, np.float32), "NaN/Inf"),
                     (np.full(gshapes[name], 1e9, np.float32), "> 1e"), (np.zeros((3, 3), np.float32), "shape"),
                     (np.zeros(gshapes[name], np.float64), "dtype float64, expected float32")):
        grads = dict(reply.content["grads"].items())
        grads[f"{name}.g"] = Array(bad)
        content = RecordDict({k: reply.content[k] for k in ("info", "stats")})
        content["grads"] = ArrayRecord(grads)
        msg = Message(content, reply_to=out)
        with pytest.raises(validate.BadReply, match=why):
            validate.stats_reply(msg, shapes, rows, cfg.calib_size, max_examples(cfg), None, gshapes)
    content = RecordDict({k: reply.content[k] for k in ("info", "stats")})  # no gradients at all
    with pytest.raises(validate.BadReply, match="records"):
        validate.stats_reply(Message(content, reply_to=out), shapes, rows, cfg.calib_size, max_examples(cfg), None,
                             gshapes)


@pytest.mark.parametrize("method", ["taskedge", "fedlora"])
def test_federation_on_the_embedded_mobilenetv2(tmp_path, method):
    """The depthwise CNN federates: TaskEdge masks its depthwise convs too; peft LoRA leaves the depthwise
    convs it refuses frozen (instead of failing), and the upload is the float32 arrays of what trains."""
    cfg = _cfg("", tmp_path, method=method, model="taskedge-mobilenetv2-tiny", num_server_rounds=1,
               fraction_evaluate=0.0, budget=0.02, lora_rank=4)
    grid, fed, summary = _run(cfg, nodes=2)
    assert summary["rounds"] == 1
    entries = sum(v.size for v in fed.arrays.values())
    assert 4 * entries <= summary["upload_bytes_per_client_round"] <= 4 * entries + 256 * len(fed.arrays) + 256
    model = create_model("taskedge-mobilenetv2-tiny", num_classes=10)
    depthwise = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert depthwise
    if method == "fedlora":
        assert not any(n + ".lora_" in k for n in depthwise for k in fed.arrays)
        assert any("lora_A" in k for k in fed.arrays)
    else:
        mask = fed.mask
        assert any(mask.indices[n].numel() > 0 for n in depthwise if n in mask.indices)
