"""TaskEdge + LoRA (dW = M ⊙ (B A), A frozen) and N:M sparsity end to end.

Layer level: gradients against autograd on the dense equivalent, merge against the wrapped forward.
Method registry: wire round trip, fixed length. Federation (in-process, real ClientApp handlers and
strategy): FedAvg of B equals the mean of the clients' effective updates; with nm="2:4" every node
prunes exactly as the server did and every merged weight keeps the pattern.
"""
import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from common.taskedge.allocation import Mask, nm_keep
from common.taskedge.config import TaskEdgeConfig
from common.taskedge.lora import (LORA_PACKED, MaskedLowRankFn, TaskEdgeLoRAConfig, TaskEdgeLoRAConv2d,
                                  TaskEdgeLoRALinear, effective_deltas, frozen_a, get_taskedge_lora_model, lora_layers,
                                  mask_rows)
from common.wire import carry_lora
from common.methods import build, carry_arrays, export, get_arrays, method_model, node_mask, set_arrays
from common.taskedge.nm import check_nm, nm_violations, semi_structured_unsupported, to_semi_structured
from common.settings import DEFAULTS, parse_run_config
from common.train import make_optimizer
from common.taskedge.tuner import (count_trainable, delta_layers, get_taskedge_model, merge_and_unload, nm_names,
                          target_modules)


def tiny_vit(num_classes=5):
    torch.manual_seed(0)
    return VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=num_classes)


def _calib(n=2):
    g = torch.Generator().manual_seed(5)
    return [torch.randn(4, 3, 16, 16, generator=g) for _ in range(n)]


def _randomise_b(model, seed=9, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * scale)


def _dense_delta(layer, b):
    """M ⊙ (B_full A) by plain tensor ops (the dense reference)."""
    rows = layer.base_layer.weight.shape[0]
    full = torch.zeros(rows, b.shape[1], dtype=b.dtype).index_copy(0, layer.lora_rows, b)
    m = torch.zeros(rows * layer.width, dtype=b.dtype)
    m[layer.flat_idx] = 1
    return (m.view(rows, layer.width) * (full @ layer.lora_A.to(b.dtype))).view_as(layer.base_layer.weight)


# ---------------------------------------------------------------- layer level

def test_frozen_a_is_a_fixed_function_of_seed_and_name():
    a = frozen_a("blocks.0.attn.qkv", 2, 5, seed=0)
    # pinned: A must never drift between releases / platforms (every node regenerates it)
    np.testing.assert_array_equal(a.numpy(), np.array([[0.194778174161911, 0.055384088307619095, 0.9250117540359497, -0.016196483746170998, 0.5625166296958923], [-0.5216623544692993, -0.5682790279388428, 0.46763667464256287, 0.17889779806137085, 1.0565662384033203]], np.float32))
    assert torch.equal(a, frozen_a("blocks.0.attn.qkv", 2, 5, seed=0))
    assert not torch.equal(a, frozen_a("blocks.0.attn.qkv", 2, 5, seed=1))
    assert not torch.equal(a, frozen_a("blocks.1.attn.qkv", 2, 5, seed=0))
    big = frozen_a("x", 4, 20000)
    assert big.abs().max() <= np.sqrt(3 / 4) + 1e-6
    np.testing.assert_allclose((big.var(1) * 4).numpy(), 1.0, atol=0.05)  # unit-variance columns


def test_masked_low_rank_fn_gradcheck():
    g = torch.Generator().manual_seed(0)
    b = torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    at = torch.randn(7, 3, dtype=torch.float64, generator=g)
    brow = torch.tensor([0, 0, 1, 2, 3, 3, 3])
    acol = torch.tensor([1, 5, 0, 6, 2, 3, 4])
    assert torch.autograd.gradcheck(lambda b: MaskedLowRankFn.apply(b, at, brow, acol), (b,))


@pytest.mark.parametrize("kind", ["linear", "conv", "grouped", "depthwise"])
def test_gradients_match_autograd_on_the_dense_equivalent(kind):
    torch.manual_seed(1)
    if kind == "linear":
        base, x = nn.Linear(24, 10), torch.randn(3, 5, 24)
    else:
        groups = {"conv": 1, "grouped": 2, "depthwise": 8}[kind]
        base = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=groups)
        x = torch.randn(2, 8, 9, 9)
    rows, width = base.weight.shape[0], base.weight[0].numel()
    idx = torch.sort(torch.randperm(rows * width)[: rows * width // 3]).values
    r = 3
    a = frozen_a("m", r, width)
    layer = (TaskEdgeLoRALinear(base, idx, r, a) if kind == "linear" else TaskEdgeLoRAConv2d(base, idx, r, a))
    with torch.no_grad():
        layer.lora_B.normal_()
    x1 = x.clone().requires_grad_(True)
    y = layer(x1)
    gy = torch.randn_like(y)
    (y * gy).sum().backward()

    b = layer.lora_B.detach().clone().requires_grad_(True)
    w = base.weight.detach() + _dense_delta(layer, b)
    x2 = x.clone().requires_grad_(True)
    if kind == "linear":
        y2 = nn.functional.linear(x2, w, base.bias)
    else:
        y2 = nn.functional.conv2d(x2, w, base.bias, base.stride, base.padding, base.dilation, base.groups)
    (y2 * gy).sum().backward()
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_B.grad, b.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    assert base.weight.grad is None  # no dense weight gradient anywhere


def test_merge_equals_wrapped_output_and_only_b_and_head_train():
    model, mask = get_taskedge_lora_model(tiny_vit(), TaskEdgeLoRAConfig(budget=0.05, r=2), _calib())
    _randomise_b(model)
    x = torch.randn(3, 3, 16, 16)
    model.eval()
    plain = merge_and_unload(model).eval()
    torch.testing.assert_close(model(x), plain(x), rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, TaskEdgeLoRALinear) for m in plain.modules())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_B" for n in delta_layers(model)} | {"head.weight", "head.bias"}
    rows = sum(v.numel() for v in mask_rows(mask).values())
    c = count_trainable(model)
    assert c["delta"] == rows * 2 and mask.num_entries > c["delta"]  # support larger than trainable count
    opt = make_optimizer(model, 1e-2)
    model.train()
    nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2])).backward()
    opt.step()
    state = sum(t.numel() for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim())
    assert state == 2 * (c["delta"] + c["head"])  # AdamW moments for B and head only


def test_registry_wire_round_trip_is_fixed_length_and_validated():
    model, mask = get_taskedge_lora_model(tiny_vit(), TaskEdgeLoRAConfig(budget=0.05, r=2), _calib())
    _randomise_b(model)
    arrays = get_arrays("taskedge-lora", model)
    assert list(arrays)[0] == LORA_PACKED and arrays[LORA_PACKED].dtype == np.float32
    assert arrays[LORA_PACKED].size == 2 * sum(v.numel() for v in mask_rows(mask).values())
    fresh = build("taskedge-lora", tiny_vit(), TaskEdgeConfig(budget=0.05), mask, lora_rank=2)
    set_arrays("taskedge-lora", fresh, arrays)
    for n, d in effective_deltas(model).items():
        assert torch.equal(d, effective_deltas(fresh)[n])
    bad = dict(arrays)
    bad[LORA_PACKED] = arrays[LORA_PACKED][:-1]
    with pytest.raises(ValueError, match=LORA_PACKED):
        set_arrays("taskedge-lora", fresh, bad)
    assert node_mask("taskedge-lora", mask, 1) == (mask, None)  # nested budgets do not apply
    assert export("taskedge-lora", model) is not model


def test_fedavg_of_b_is_the_mean_of_the_effective_updates():
    """What makes aggregation exact: for fixed (M, A), dW is linear in B."""
    model, mask = get_taskedge_lora_model(tiny_vit(), TaskEdgeLoRAConfig(budget=0.05, r=3), _calib())
    clients, weights = [], [3.0, 1.0, 6.0]
    for seed in range(3):
        _randomise_b(model, seed=seed)
        clients.append((get_arrays("taskedge-lora", model)[LORA_PACKED], effective_deltas(model)))
    mean_b = sum(w * b.astype(np.float64) for w, (b, _) in zip(weights, clients)) / sum(weights)
    arrays = get_arrays("taskedge-lora", model)
    arrays[LORA_PACKED] = mean_b.astype(np.float32)
    set_arrays("taskedge-lora", model, arrays)
    got = effective_deltas(model)
    for n in got:
        want = sum(w * d[n].double() for w, (_, d) in zip(weights, clients)) / sum(weights)
        torch.testing.assert_close(got[n].double(), want, rtol=1e-5, atol=1e-6)


def test_carry_keeps_the_rows_of_neurons_under_both_masks():
    model, small = get_taskedge_lora_model(tiny_vit(), TaskEdgeLoRAConfig(budget=0.01, r=2), _calib())
    _, big = get_taskedge_lora_model(tiny_vit(), TaskEdgeLoRAConfig(budget=0.05, r=2), _calib())
    _randomise_b(model)
    old = get_arrays("taskedge-lora", model)
    new = carry_arrays("taskedge-lora", small, old, big,
                       get_arrays("taskedge-lora", build("taskedge-lora", tiny_vit(), TaskEdgeConfig(), big, 2)))
    assert new[LORA_PACKED].size == 2 * sum(v.numel() for v in mask_rows(big).values())
    np.testing.assert_array_equal(new["head.weight"], old["head.weight"])
    assert np.count_nonzero(new[LORA_PACKED]) == np.count_nonzero(old[LORA_PACKED])  # rows of `small` ⊆ `big`
    assert np.array_equal(carry_lora(small, old[LORA_PACKED], small, 2), old[LORA_PACKED])


# ---------------------------------------------------------------- N:M

def test_nm_keep_breaks_ties_towards_the_lower_index():
    s = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 2.0, 2.0, 2.0]])
    assert nm_keep(s, 2, 4).tolist() == [[True, True, False, False, False, True, True, False]]


@pytest.mark.parametrize("method", ["taskedge", "taskedge-lora"])
def test_nm_merged_weights_keep_the_pattern_centrally(method):
    cfg = TaskEdgeLoRAConfig(budget=0.05, r=2, nm=(2, 4))
    if method == "taskedge":
        model, mask = get_taskedge_model(tiny_vit(), cfg, _calib())
        with torch.no_grad():
            for layer in delta_layers(model).values():
                layer.values.normal_()
    else:
        model, mask = get_taskedge_lora_model(tiny_vit(), cfg, _calib())
        _randomise_b(model, scale=1.0)
    names = nm_names(tiny_vit(), cfg)
    assert set(names) == set(target_modules(tiny_vit(), cfg))  # every width here is a multiple of 4
    plain = merge_and_unload(model)
    assert check_nm(plain, 2, 4, names) == {n: 0 for n in names}
    for n in names:  # exactly N per group: the pruned base is dense where kept, and deltas only add there
        w = plain.get_submodule(n).weight.detach().reshape(plain.get_submodule(n).weight.shape[0], -1)
        assert int((w != 0).sum()) == w.numel() // 2
    assert mask.norms is not None and set(mask.norms) == set(names)


def test_nm_violations_counts_bad_groups():
    w = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    assert nm_violations(w, 2, 4) == 2


def test_mask_carries_the_norms_and_nodes_prune_identically():
    cfg = TaskEdgeConfig(budget=0.02, nm=(2, 4))
    _, mask = get_taskedge_model(tiny_vit(), cfg, _calib())
    again = Mask.from_arrays(mask.to_arrays())  # what a node keeps from the mask message
    assert set(again.norms) == set(mask.norms)
    server = build("taskedge", tiny_vit(), cfg, mask)
    node = build("taskedge", tiny_vit(), cfg, again)
    for (n, p), (_, q) in zip(server.state_dict().items(), node.state_dict().items()):
        assert torch.equal(p, q), n
    with pytest.raises(ValueError, match="norms"):
        build("taskedge", tiny_vit(), cfg, Mask(mask.indices, mask.ranks, mask.shapes))
    bad = mask.to_arrays()
    bad[next(k for k in bad if k.endswith(".norm"))][0] = -1.0
    with pytest.raises(ValueError, match="norm"):
        Mask.from_arrays(bad)


def test_semi_structured_conversion_keeps_cpu_models_dense():
    lin = nn.Sequential(nn.Linear(64, 32))
    with torch.no_grad():
        lin[0].weight.mul_(nm_keep(lin[0].weight.abs(), 2, 4))
    assert semi_structured_unsupported("cpu", torch.float32) is not None
    out = to_semi_structured(lin)
    assert list(out) == ["0"] and out["0"] != "semi-structured"
    assert lin[0].weight.layout == torch.strided


# ---------------------------------------------------------------- run config

def test_run_config_selects_taskedge_lora_and_nm():
    cfg = parse_run_config(method="taskedge-lora", lora_rank=2, nm="2:4", budget=0.05)
    assert cfg.taskedge_config().nm == (2, 4) and cfg.lora_rank == 2
    assert "nm" in cfg.client_config() and cfg.lr > 0
    assert parse_run_config().taskedge_config().nm is None
    for bad in ("2", "4:2", "2:2", "0:4", "a:b", "2:4:8"):
        with pytest.raises(ValueError, match="'nm'"):
            parse_run_config(nm=bad)
    with pytest.raises(ValueError, match="'nm'"):
        parse_run_config(method="fedlora", nm="2:4")
    with pytest.raises(ValueError, match="'nm'"):
        parse_run_config(reconcile="vote", nm="2:4")
    with pytest.raises(ValueError, match="'budget-ranks'"):
        parse_run_config(method="taskedge-lora", budget_ranks="0,1")


# ---------------------------------------------------------------- federation (in-process)

def _fed_cfg(weights, tmp_path, **kw):
    base = {"weights-path": weights, "num-partitions": 20, "num-server-rounds": 1, "server-test-size": 50,
            "calib-size": 32, "batch-size": 32, "output-dir": str(tmp_path), "min-nodes": 1,
            "fraction-evaluate": 0.0, "local-epochs": 1}
    if "clip-factor" in DEFAULTS:  # the exact mean, not a clipped one
        base["clip-factor"] = 0.0
    base.update({k.replace("_", "-"): v for k, v in kw.items()})
    return parse_run_config(base)


def _federate(cfg, nodes=3):
    from client.client_app import app
    from server.inprocess import InProcessGrid
    from server.runner import run_federation

    replies = {}

    def spy(msg, reply):
        if msg.metadata.message_type == "train" and not reply.has_error():
            replies[msg.metadata.dst_node_id] = ({k: v.numpy() for k, v in reply.content["arrays"].items()},
                                                 float(reply.content["metrics"]["num-examples"]))

    grid = InProcessGrid(app, nodes, cfg.to_dict(), observe=spy)
    fed, summary = run_federation(grid, cfg)
    return grid, fed, summary, replies


def test_federated_taskedge_lora_averages_the_effective_updates_exactly(weights, tmp_path):
    cfg = _fed_cfg(weights, tmp_path, method="taskedge-lora", budget=0.05, lora_rank=2)
    grid, fed, summary, replies = _federate(cfg)
    assert summary["rounds"] == 1 and not fed.dropped and len(replies) == 3
    assert list(fed.arrays)[0] == LORA_PACKED
    rows = sum(v.numel() for v in mask_rows(fed.mask).values())
    assert fed.arrays[LORA_PACKED].size == 2 * rows  # fixed length: rows x r, the same for every node
    assert {a[LORA_PACKED].shape for a, _ in replies.values()} == {(2 * rows,)}
    model = method_model(cfg, fed.mask)
    per_client, total = [], 0.0
    for arrays, n in replies.values():
        set_arrays(cfg.method, model, arrays)
        per_client.append((n, effective_deltas(model)))
        total += n
    set_arrays(cfg.method, model, fed.arrays)
    got = effective_deltas(model)
    assert any(d.abs().max() > 0 for d in got.values())  # it trained
    for name, d in got.items():
        want = sum(n * deltas[name].double() for n, deltas in per_client) / total
        torch.testing.assert_close(d.double(), want, rtol=1e-4, atol=1e-7)
    for kind in ("query.stats", "query.mask"):  # it ran the TaskEdge phases
        assert any(d["type"] == kind for d in grid.delivered)


@pytest.mark.parametrize("method", ["taskedge", "taskedge-lora"])
def test_federated_nm_prunes_identically_and_merged_weights_keep_the_pattern(weights, tmp_path, method):
    from common.models import create_model

    cfg = _fed_cfg(weights, tmp_path, method=method, nm="2:4", budget=0.02, lora_rank=2)
    grid, fed, summary, replies = _federate(cfg, nodes=2)
    assert summary["rounds"] == 1 and not fed.dropped and len(replies) == 2
    tcfg = cfg.taskedge_config()
    names = nm_names(create_model("taskedge-vit-tiny", num_classes=10, weights=weights), tcfg)
    assert names and fed.mask.norms is not None
    server = method_model(cfg, fed.mask)
    for ctx in grid.contexts.values():  # every node prunes its backbone exactly as the server did
        node_held = Mask.from_arrays({k: v.numpy() for k, v in ctx.state["mask"].items()})
        node = method_model(cfg, node_held)
        for n in names:
            assert torch.equal(node.get_submodule(n).weight, server.get_submodule(n).weight), n
    for arrays, _ in replies.values():  # after local training ...
        set_arrays(cfg.method, server, arrays)
        assert check_nm(export(cfg.method, server), 2, 4, names) == {n: 0 for n in names}
    set_arrays(cfg.method, server, fed.arrays)  # ... and after federated aggregation
    merged = export(cfg.method, server)
    assert check_nm(merged, 2, 4, names) == {n: 0 for n in names}
    final = fed.run_dir / "final_model.safetensors"
    from safetensors.torch import load_file

    sd = load_file(str(final))
    for n in names:
        assert nm_violations(sd[f"{n}.weight"], 2, 4) == 0, n
