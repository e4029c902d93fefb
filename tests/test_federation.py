"""Federation building blocks without a federation: reconciliation, aggregation, validation, config."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict

from common.taskedge.allocation import allocate
from common.taskedge.config import TaskEdgeConfig
from common.local import local_stats
from common.models import create_model
from common.settings import DEFAULTS, METHOD_LR, parse_run_config
from common.taskedge.stats import arrays_to_norms, collect_stats
from common.taskedge.tuner import build_mask, target_modules
from common.wire import carry_values, nested, packed_positions, put, take
from server.aggregate import Update, masked_mean
from server.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from server.reconcile import stats_mask, vote_mask
from server.strategy import NESTED, TaskEdgeFedAvgM, make_strategy


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return create_model("taskedge-vit-tiny", num_classes=10).eval()


def _client_batches(k, seed):
    g = torch.Generator().manual_seed(seed)
    # clients see differently shifted data, so their statistics genuinely differ
    return torch.randn(24 + 8 * k, 3, 32, 32, generator=g) * (1 + k) + k


# ---------------------------------------------------------------- reconciliation
@pytest.mark.parametrize("budget", [0.001, 0.01])
def test_stats_reconciliation_equals_pooled_mask(vit, budget):
    tcfg = TaskEdgeConfig(budget=budget)
    clients = [_client_batches(k, seed=k) for k in range(3)]
    stats = [local_stats(vit, tcfg, x, batch_size=16) for x in clients]
    fed = stats_mask(vit, tcfg, stats)
    # centrally, on the union of the clients' calibration data
    union = [x[i:i + 16] for x in clients for i in range(0, len(x), 16)]
    pooled = collect_stats(vit, target_modules(vit, tcfg), union)
    central = build_mask(vit, tcfg, {n: s.norm() for n, s in pooled.items()})
    assert fed.names() == central.names()
    for n in central.names():
        assert torch.equal(fed.indices[n], central.indices[n]), n
        assert torch.equal(fed.ranks[n], central.ranks[n]), n
    # and it is not simply what any single client would pick
    single = build_mask(vit, tcfg, arrays_to_norms(stats[2]))
    assert any(not torch.equal(single.indices[n], central.indices[n]) for n in central.names())


def _two_layer():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))  # last Linear = head
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[0].weight[1, 3] = 2.0  # row 1: column 3 has the larger |W| -> wins the tie
    return net


def test_vote_counts_then_summed_score():
    net = _two_layer()
    tcfg = TaskEdgeConfig(budget=3)  # 3 entries: one per row of the 3x4 target
    stats = [{"0.ss": np.ones(4), "0.n": np.array([1])} for _ in range(3)]
    votes = [{"0.idx": np.array([1, 4, 10])},      # row0 col1, row1 col0, row2 col2
             {"0.idx": np.array([1, 7, 10])},      # row0 col1, row1 col3, row2 col2
             {"0.idx": np.array([2, 10])}]         # row0 col2, row2 col2
    mask = vote_mask(net, tcfg, stats, votes)
    assert mask.indices["0"].tolist() == [1, 7, 10]  # row1: 1 vote each, |W| breaks the tie for col 3


def test_packed_positions_and_carry():
    scores = {"a": torch.tensor([[3.0, 2.0, 1.0], [1.0, 5.0, 4.0]]), "b": torch.tensor([[1.0, 2.0]])}
    full = allocate(scores, 5, "neuron")
    sub = full.subset(1)
    pos = packed_positions(full, sub)
    # full packed order: a -> idx [0,1,4,5] (ranks 0,1,0,1), b -> idx [0,1] ... only 5 entries taken
    offs = {"a": 0, "b": full.indices["a"].numel()}
    for n in sub.names():
        p = sub.positions_in(full)[n].numpy() + offs[n]
        assert np.isin(p, pos).all()
    assert len(pos) == sub.num_entries
    values = np.arange(full.num_entries, dtype=np.float32) + 1
    new = allocate({"a": scores["a"], "b": torch.tensor([[2.0, 1.0]])}, 4, "neuron")
    carried = carry_values(full, values, new)
    for n in new.names():
        for j, idx in enumerate(new.indices[n].tolist()):
            old = full.indices[n].tolist()
            want = values[offs[n] + old.index(idx)] if idx in old else 0.0
            got = carried[(0 if n == "a" else new.indices["a"].numel()) + j]
            assert got == want


def test_nested_share_take_put():
    full = allocate({"m": torch.tensor([[3.0, 2.0, 1.0], [1.0, 5.0, 4.0]])}, 4, "neuron")  # ranks 0,1 per row
    sub, pos = nested(full, 1)
    # full mask, packed in ascending flat index: [0, 1, 4, 5]; rank 0 is row 0 col 0 and row 1 col 1
    assert sub.indices["m"].tolist() == [0, 4] and pos.tolist() == [0, 2]
    assert nested(full, 0)[1] is None and nested(full, 2)[1] is None  # rank 0 or >= depth: the whole mask
    arrays = {"values": np.array([1, 2, 3, 4], np.float32), "head.weight": np.ones(2, np.float32)}
    share = take(arrays, pos)
    assert share["values"].tolist() == [1, 3]
    back = put(arrays, {"values": np.array([10, 40], np.float32), "head.weight": np.zeros(2, np.float32)}, pos)
    assert back["values"].tolist() == [10, 2, 40, 4] and back["head.weight"].tolist() == [0, 0]
    assert arrays["values"].tolist() == [1, 2, 3, 4]  # the received arrays are not modified


# ---------------------------------------------------------------- aggregation
def test_masked_mean_by_hand():
    cur = {"values": np.zeros(4, np.float32), "head": np.ones(2, np.float32)}
    ups = [
        Update({"values": np.array([1, 2, 3, 4], np.float32), "head": np.array([2, 2], np.float32)}, 1.0),
        # heterogeneous budget: trained entries 0 and 2 only
        Update({"values": np.array([5, 7], np.float32), "head": np.array([4, 4], np.float32)}, 3.0,
               {"values": np.array([0, 2])}),
        # zero examples: must not move anything
        Update({"values": np.full(4, 100, np.float32), "head": np.full(2, 100, np.float32)}, 0.0),
    ]
    avg, cov = masked_mean(cur, ups)
    np.testing.assert_allclose(avg["values"], [(1 + 15) / 4, 2, (3 + 21) / 4, 4])
    np.testing.assert_allclose(avg["head"], [(2 + 12) / 4] * 2)
    np.testing.assert_allclose(cov["values"], [4, 1, 4, 1])


def test_untrained_entries_keep_their_value():
    cur = {"values": np.array([9, 8, 7], np.float32)}
    avg, cov = masked_mean(cur, [Update({"values": np.array([1.0], np.float32)}, 2.0, {"values": np.array([1])}),
                                 Update({"values": np.array([3.0], np.float32)}, 2.0, {"values": np.array([1])})])
    np.testing.assert_allclose(avg["values"], [9, 2, 7])
    assert cov["values"].tolist() == [0, 4, 0]
    only_zero = masked_mean(cur, [Update({"values": np.ones(3, np.float32)}, 0.0)])[0]
    np.testing.assert_array_equal(only_zero["values"], cur["values"])


class _Ranks:
    """Stand-in for MaskDelivery: node 2 trains packed positions [0, 2] only."""

    def positions(self, node):
        return np.array([0, 2]) if node == 2 else None


def _reply(values, head, n, node):
    content = RecordDict({"arrays": ArrayRecord({"values": Array(np.asarray(values, np.float32)),
                                                 "head": Array(np.asarray(head, np.float32))}),
                          "metrics": MetricRecord({"num-examples": n, "train-loss": float(node)})})
    return Message(content, reply_to=Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN))


def test_nested_fedavgm_by_hand():
    """Per-entry denominators, then Flower's FedAvgM momentum on the result (lr 1, momentum 0.5)."""
    strategy = make_strategy(parse_run_config({"server-opt": "fedavgm", "server-momentum": 0.5}), None, nested=True)
    assert type(strategy) is NESTED[TaskEdgeFedAvgM]
    strategy.delivery = _Ranks()
    cur = ArrayRecord({"values": Array(np.zeros(4, np.float32)), "head": Array(np.ones(2, np.float32))})
    strategy.current_global = strategy.current_arrays = cur
    # node 1 trains everything (weight 1); node 2 only entries 0 and 2 (weight 3); its other entries are ignored
    replies = [_reply([1, 2, 3, 4], [2, 2], 1, 1), _reply([5, 99, 7, 99], [4, 4], 3, 2)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    avg = np.array([(1 + 15) / 4, 2, (3 + 21) / 4, 4])
    np.testing.assert_allclose(arrays["values"].numpy(), avg)  # round 1: momentum = pseudo-gradient
    np.testing.assert_allclose(arrays["head"].numpy(), [(2 + 12) / 4] * 2)
    assert metrics["train-loss"] == pytest.approx((1 * 1 + 3 * 2) / 4)
    strategy.current_global = arrays
    second, _ = strategy.aggregate_train(2, [_reply(avg + 1, [3.5, 3.5], 1, 1)])
    # pseudo-gradient -1 everywhere; momentum buffer 0.5 * (-avg) - 1; new = avg - buffer
    np.testing.assert_allclose(second["values"].numpy(), avg - (0.5 * -avg - 1), rtol=1e-6)


# ---------------------------------------------------------------- config
def test_run_config_defaults_and_errors():
    cfg = parse_run_config({})
    assert cfg.to_dict() == {**DEFAULTS, "lr": METHOD_LR["taskedge"]}
    assert parse_run_config({"method": "fedavg-full"}).lr == METHOD_LR["fedavg-full"]
    assert parse_run_config({"lr": 1}).lr == 1.0
    for bad, key in [({"alpha": -1.0}, "'alpha'"), ({"method": "fedsgd"}, "'method'"), ({"foo": 1}, "'foo'"),
                     ({"local-epochs": 1.5}, "'local-epochs'"), ({"fraction-train": 2.0}, "'fraction-train'"),
                     ({"budget-ranks": "1,x"}, "'budget-ranks'"), ({"reconcile": "mean"}, "'reconcile'")]:
        with pytest.raises(ValueError, match=key):
            parse_run_config(bad)


def test_checkpoint_roundtrip(tmp_path):
    mask = allocate({"m": torch.rand(4, 6)}, 6, "neuron")
    ck = Checkpoint(3, "taskedge", {"values": np.arange(6, dtype=np.float32), "head.weight": np.ones((2, 3), np.float32)},
                    mask, 2, {"values": np.full(6, 0.5, np.float32)}, {"lr": 0.1})
    path = save_checkpoint(ck, tmp_path / "c.safetensors")
    back = load_checkpoint(tmp_path / "c.safetensors")
    assert back.round == 3 and back.method == "taskedge" and back.mask_version == 2 and back.config == {"lr": 0.1}
    assert list(back.arrays) == ["values", "head.weight"]
    np.testing.assert_array_equal(back.arrays["values"], ck.arrays["values"])
    assert torch.equal(back.mask.indices["m"], mask.indices["m"]) and torch.equal(back.mask.ranks["m"], mask.ranks["m"])
    np.testing.assert_array_equal(back.opt_state["values"], ck.opt_state["values"])
    raw = path.read_bytes()  # a plain safetensors file: u64 header length, then a JSON header; no pickle
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])
    assert header["__metadata__"]["format"] == "taskedge-fl-checkpoint-1" and "global/values" in header
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing")


# ---------------------------------------------------------------- client data
def test_partitions_iid_and_dirichlet():
    from common.partition import load_local_data, partition_labels
    from common.data.tasks import get_task

    n = get_task("shapes-downstream").train_size
    iid = partition_labels("shapes-downstream", "iid", 4, 0.5, 0)
    assert sum(map(len, iid)) == n and {len(p) for p in iid} == {n // 4}
    skew = partition_labels("shapes-downstream", "dirichlet", 4, 0.1, 0)
    assert sum(map(len, skew)) == n
    # strong label skew: some client misses some classes entirely
    assert any(len(set(p)) < 10 for p in skew)
    d = load_local_data("shapes-downstream", 1, 4, partitioner="iid", test_fraction=0.2, calib_size=16)
    assert len(d.x_train) == n // 4 - n // 20 and len(d.x_test) == n // 20 and d.x_calib.shape == (16, 3, 32, 32)
    with pytest.raises(ValueError, match="partition-id"):
        load_local_data("shapes-downstream", 4, 4, partitioner="iid")
