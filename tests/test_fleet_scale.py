"""Fleet-scale simulation pieces: nodes that render their own data, a setup cohort, a compact mask state."""
import numpy as np
import pytest
import torch

from client.client_app import app as client_app
from common.data.splits import make_split, node_split
from common.partition import node_data
from common.settings import parse_run_config
from common.taskedge.allocation import Mask
from server.inprocess import InProcessGrid
from server.phases import max_examples, setup_cohort
from server.runner import run_federation


def _cfg(weights, tmp_path, **kw):
    base = {"weights-path": weights, "num-server-rounds": 2, "server-test-size": 100, "calib-size": 8,
            "batch-size": 8, "output-dir": str(tmp_path), "min-nodes": 1, "partitioner": "generated",
            "examples-per-node": 10, "test-fraction": 0.0, "local-epochs": 1}
    base.update({k.replace("_", "-"): v for k, v in kw.items()})
    return parse_run_config(base)


def test_generated_nodes_own_disjoint_deterministic_examples():
    a, ya = node_split("shapes-downstream", 3, 12)
    b, _ = node_split("shapes-downstream", 3, 12)
    c, _ = node_split("shapes-downstream", 4, 12)
    assert a.shape == (12, 3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    assert set(ya.tolist()) == set(range(10))  # class-balanced: 12 over 10 classes, every class
    train = make_split("shapes-downstream", "train")[0].reshape(1000, -1)
    flat = torch.cat([a, c]).reshape(24, -1)
    assert not (torch.cdist(flat, train).min(dim=1).values < 1e-6).any()  # no image of the shared split


def test_generated_partition_in_node_data_and_the_reply_bound(weights, tmp_path):
    cfg = _cfg(weights, tmp_path, examples_per_node=15, test_fraction=0.2)
    d = node_data(cfg, {"partition-id": 9999, "num-partitions": 10_000})
    assert (len(d.x_train), len(d.x_test), len(d.x_calib)) == (12, 3, 8)
    assert max_examples(cfg) == 15  # a reply claiming more examples than a node renders is not credible
    with pytest.raises(ValueError, match="run config 'partitioner'.*generated"):
        parse_run_config({"partitioner": "generated", "data-path": str(tmp_path)})
    with pytest.raises(ValueError, match="run config 'examples-per-node': must be > 0"):
        parse_run_config({"examples-per-node": 0})
    with pytest.raises(ValueError, match=r"run config 'setup-fraction': must be in \(0, 1\]"):
        parse_run_config({"setup-fraction": 0.0})


def test_setup_cohort_is_a_seeded_share_of_at_least_min_replies():
    nodes = list(range(100, 200))
    cfg = parse_run_config({"setup-fraction": 0.25, "seed": 3})
    c = setup_cohort(nodes, cfg)
    assert len(c) == 25 and set(c) <= set(nodes) and c == sorted(c) and c == setup_cohort(nodes[::-1], cfg)
    assert setup_cohort(nodes, cfg, salt=5) != c  # a re-reconciliation asks another cohort
    assert len(setup_cohort(nodes, parse_run_config({"setup-fraction": 0.01, "min-replies": 4}))) == 4
    assert setup_cohort(nodes, parse_run_config({})) == nodes  # default: every node, the exact pooled mask


def test_compact_mask_arrays_round_trip_in_5_bytes_per_entry():
    rng = np.random.default_rng(0)
    idx = {"a": torch.from_numpy(np.sort(rng.choice(192 * 768, 500, replace=False))),
           "b": torch.from_numpy(np.sort(rng.choice(200, 7, replace=False)))}
    rk = {"a": torch.from_numpy(rng.integers(0, 4, 500)), "b": torch.zeros(7, dtype=torch.int64)}
    mask = Mask(idx, rk, {"a": (192, 768), "b": (10, 20)})
    wide, small = mask.to_arrays(), mask.to_arrays(compact=True)
    assert small["a.idx"].dtype == np.uint32 and small["b.idx"].dtype == np.uint8
    assert small["a.rank"].dtype == np.uint8
    back = Mask.from_arrays(small)
    assert all(torch.equal(back.indices[n], mask.indices[n]) and torch.equal(back.ranks[n], mask.ranks[n])
               for n in ("a", "b"))
    assert sum(v.nbytes for v in small.values()) * 3 < sum(v.nbytes for v in wide.values())


def test_a_setup_cohort_federation_asks_a_share_and_late_nodes_get_the_mask(weights, tmp_path):
    cfg = _cfg(weights, tmp_path, setup_fraction=0.3, fraction_train=0.5, fraction_evaluate=0.0, num_server_rounds=2)
    grid = InProcessGrid(client_app, 10, cfg.to_dict())
    fed, summary = run_federation(grid, cfg)
    asked = {k: {d["node"] for d in grid.delivered if d["type"] == f"query.{k}"} for k in ("classes", "stats", "mask")}
    cohort = set(setup_cohort(sorted(grid.contexts), cfg))
    assert asked["classes"] == asked["stats"] == cohort and len(cohort) == 3
    trained = {d["node"] for d in grid.delivered if d["type"] == "train"}
    assert trained - cohort and asked["mask"] == cohort | trained  # others got the mask when first sampled
    assert summary["rounds"] == 2 and summary["dropped_replies"] == 0 and fed.mask is not None
    held = grid.contexts[next(iter(trained - cohort))].state["mask"]
    assert {a.dtype for k, a in held.items() if k.endswith(".idx")} <= {"uint16", "uint32"}


def test_a_dp_run_with_a_setup_cohort_keeps_every_node_on_the_full_mask(weights, tmp_path):
    """setup-fraction < 1 picks the nested strategy (ranks outside the cohort are learnt later) except with DP,
    whose wrappers need every node on the full mask: the run goes through and is accounted."""
    cfg = _cfg(weights, tmp_path, setup_fraction=0.5, fraction_evaluate=0.0, num_server_rounds=1, dp="server",
               dp_noise_multiplier=0.5, dp_clip_norm=1.0)
    fed, summary = run_federation(InProcessGrid(client_app, 6, cfg.to_dict()), cfg)
    assert summary["rounds"] == 1 and summary["dropped_replies"] == 0 and 0 < summary["dp_epsilon"] < float("inf")
