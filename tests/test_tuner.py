"""The injector end to end on small timm models: budgets, merge, wire round trip, optimizer state, bad input."""
import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from common.taskedge.allocation import Mask
from common.taskedge.config import TaskEdgeConfig
from common.taskedge.layers import SparseDeltaConv2d, SparseDeltaLinear
from common.train import make_optimizer
from common.taskedge.tuner import (apply_mask, count_trainable, delta_layers, find_head, get_taskedge_model,
                          merge_and_unload, target_modules)
from common.wire import extract, load


def tiny_vit(num_classes=5):
    torch.manual_seed(0)
    return VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=num_classes)


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.pw(torch.relu(self.dw(torch.relu(self.stem(x)))))))
        return self.fc(x.mean((2, 3)))


def _calib(c=3, s=16, n=2):
    g = torch.Generator().manual_seed(5)
    return [torch.randn(4, c, s, s, generator=g) for _ in range(n)]


def _randomise(model):
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for layer in delta_layers(model).values():
            layer.values.copy_(torch.randn(layer.values.shape, generator=g) * 0.05)


def test_vit_targets_exclude_head_and_budget_is_exact():
    model = tiny_vit()
    assert find_head(model) == "head"
    names = list(target_modules(model, TaskEdgeConfig()))
    assert "head" not in names and any(n.endswith("attn.qkv") for n in names) and "patch_embed.proj" in names
    cfg = TaskEdgeConfig(budget=0.01)
    model, mask = get_taskedge_model(model, cfg, _calib())
    c = count_trainable(model)
    assert c["delta"] == mask.num_entries == round(0.01 * c["backbone"])
    assert c["head"] == 32 * 5 + 5
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.values" for n in delta_layers(model)} | {"head.weight", "head.bias"}


@pytest.mark.parametrize("factory,inputs", [(tiny_vit, _calib()), (TinyCNN, _calib(3, 12))])
def test_merged_model_matches_wrapped(factory, inputs):
    model = factory()
    model, _ = get_taskedge_model(model, TaskEdgeConfig(budget=0.05), inputs)
    assert any(isinstance(m, SparseDeltaConv2d) for m in model.modules())
    _randomise(model)
    model.eval()
    plain = merge_and_unload(model)
    assert not any(isinstance(m, (SparseDeltaLinear, SparseDeltaConv2d)) for m in plain.modules())
    with torch.no_grad():
        assert torch.allclose(model(inputs[0]), plain(inputs[0]), atol=1e-5)


def test_extract_load_round_trip_is_bit_exact():
    a, _ = get_taskedge_model(tiny_vit(), TaskEdgeConfig(budget=0.02), _calib())
    _randomise(a)
    arrays = extract(a)
    keys = list(arrays)
    assert keys[-2:] == ["head.weight", "head.bias"]
    assert all(arrays[k].dtype == np.int64 for k in keys if k.endswith(".idx"))
    b, _ = get_taskedge_model(tiny_vit(), TaskEdgeConfig(budget=0.02), _calib())
    load(b, arrays)
    for k, v in extract(b).items():
        assert v.tobytes() == arrays[k].tobytes(), k
    assert list(extract(b)) == keys  # stable order


def test_optimizer_state_only_for_values_and_head():
    model, _ = get_taskedge_model(tiny_vit(), TaskEdgeConfig(budget=0.01), _calib())
    opt = make_optimizer(model, 1e-3)
    model(_calib()[0]).sum().backward()
    opt.step()
    state_numel = sum(t.numel() for s in opt.state.values() for t in s.values() if t.dim() > 0)
    c = count_trainable(model)
    assert state_numel == 2 * (c["delta"] + c["head"])  # Adam: exp_avg + exp_avg_sq, nothing dense
    assert all(p.grad is None for n, p in model.named_parameters() if "base_layer" in n)


def test_budget_ablations_and_global_mode_run():
    # the budget is a fraction of the backbone (every parameter but the head), rounded to entries
    backbone = sum(p.numel() for n, p in tiny_vit().named_parameters() if not n.startswith("head."))
    chosen = {}
    for score in ("magnitude", "activation", "random"):
        model, mask = get_taskedge_model(tiny_vit(), TaskEdgeConfig(budget=0.01, score=score), _calib())
        assert mask.num_entries == count_trainable(model)["delta"] == round(0.01 * backbone)
        chosen[score] = {(n, i) for n in mask.names() for i in mask.indices[n].tolist()}
    # the scores rank entries differently, so each pair of masks differs somewhere
    for a, b in (("magnitude", "activation"), ("magnitude", "random"), ("activation", "random")):
        assert chosen[a] != chosen[b], (a, b)

    def per_row(mask):  # entries each output row (neuron) got, over all target modules
        return torch.cat([torch.bincount(mask.indices[n] // mask.shapes[n][1], minlength=mask.shapes[n][0])
                          for n in mask.names()])

    count = round(0.05 * backbone)  # large enough that the neuron level gives every row >= 1 entry
    _, neuron = get_taskedge_model(tiny_vit(), TaskEdgeConfig(budget=0.05), _calib())
    _, top = get_taskedge_model(tiny_vit(), TaskEdgeConfig(budget=0.05, allocation="global"), _calib())
    assert neuron.num_entries == top.num_entries == count
    k = count // per_row(neuron).numel()
    assert k >= 1
    assert int(per_row(neuron).min()) >= k  # TaskEdge: every neuron gets its top-k
    assert int(per_row(top).min()) < k  # global top-k starves some neurons


def test_nm_mode_keeps_merged_weight_n_m_sparse():
    model, _ = get_taskedge_model(tiny_vit(), TaskEdgeConfig(budget=0.01, nm=(2, 4), target_modules=[r".*mlp\.fc\d"]), _calib())
    _randomise(model)
    plain = merge_and_unload(model)
    for name in ("blocks.0.mlp.fc1", "blocks.1.mlp.fc2"):
        w = plain.get_submodule(name).weight
        assert (w.reshape(w.shape[0], -1, 4) != 0).sum(-1).max() <= 2


def test_bad_input_is_named_and_nothing_half_applied():
    with pytest.raises(ValueError, match="budget"):
        TaskEdgeConfig(budget=0)
    with pytest.raises(ValueError, match="score"):
        TaskEdgeConfig(score="wanda")
    with pytest.raises(TypeError, match="LayerNorm"):
        target_modules(tiny_vit(), TaskEdgeConfig(target_modules=[r"blocks\.0\.norm1"]))
    with pytest.raises(ValueError, match="matched no"):
        target_modules(tiny_vit(), TaskEdgeConfig(target_modules=["nope"]))
    with pytest.raises(ValueError, match="eligible modules hold only"):
        get_taskedge_model(tiny_vit(), TaskEdgeConfig(budget=10**9), _calib())

    cfg = TaskEdgeConfig(budget=0.01)
    # a mask whose last module has the wrong shape must not wrap the earlier ones
    good, m = get_taskedge_model(tiny_vit(), cfg, _calib())
    arrays = m.to_arrays()
    last = m.names()[-1]
    arrays[f"{last}.shape"] = np.array([3, 3])
    arrays[f"{last}.idx"] = np.array([0, 1]); arrays[f"{last}.rank"] = np.array([0, 0])
    fresh = tiny_vit()
    with pytest.raises(ValueError, match=last.replace(".", r"\.")):
        apply_mask(fresh, Mask.from_arrays(arrays), cfg)
    assert not delta_layers(fresh)

    # load(): wrong shape / unknown key / wrong dtype rejected before any write
    _randomise(good)
    before = {k: v.copy() for k, v in extract(good).items()}
    bad = dict(before)
    first = next(k for k in bad if k.endswith(".values"))
    bad[first] = np.zeros(3, dtype=np.float32)
    with pytest.raises(ValueError, match=first.replace(".", r"\.")):
        load(good, {**{k: v * 0 for k, v in before.items() if k.endswith(".values")}, first: bad[first]})
    with pytest.raises(ValueError, match="unknown key 'bogus'"):
        load(good, {"bogus": np.zeros(1)})
    with pytest.raises(ValueError, match="expected float"):
        load(good, {first: before[first].astype(np.int32)})
    for k, v in extract(good).items():
        assert np.array_equal(v, before[k]), k
