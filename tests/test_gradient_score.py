"""The gradient-informed reference score: exact gradients, a probed head, the same allocation, no side effects."""
import copy

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from common.taskedge.allocation import allocate, budget_entries
from common.taskedge.config import TaskEdgeConfig
from common.taskedge.gradient_score import calibration_gradients
from common.settings import parse_run_config
from common.taskedge.tuner import backbone_parameters, get_taskedge_model, target_modules


def tiny_vit(num_classes=4):
    torch.manual_seed(0)
    return VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=num_classes)


def _labelled(n=3, bs=5, classes=4):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(bs, 3, 16, 16, generator=g), torch.randint(0, classes, (bs,), generator=g)) for _ in range(n)]


def test_gradients_equal_autograd_on_the_whole_calibration_set():
    model = tiny_vit()
    batches = _labelled()
    mods = target_modules(model, TaskEdgeConfig())
    got = calibration_gradients(model, mods, "head", batches, probe_steps=0)
    # independent reference: one summed loss over all calibration examples, torch.autograd.grad
    ref = copy.deepcopy(model).eval()
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    weights = [ref.get_submodule(n).weight for n in mods]
    grads = torch.autograd.grad(F.cross_entropy(ref(x), y, reduction="sum"), weights)
    assert set(got) == set(mods)
    for name, g in zip(mods, grads):
        assert torch.allclose(got[name], g.abs().reshape(g.shape[0], -1), rtol=1e-5, atol=1e-6), name


def test_probe_fits_the_head_and_the_model_is_left_untouched():
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    mods = target_modules(model, TaskEdgeConfig())
    with_probe = calibration_gradients(model, mods, "head", _labelled(), probe_steps=50)
    without = calibration_gradients(model, mods, "head", _labelled(), probe_steps=0)
    assert any(not torch.allclose(with_probe[n], without[n]) for n in mods)  # the head changed the gradients
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_gradient_score_mask_is_the_neuron_level_top_k_of_the_gradients():
    cfg = TaskEdgeConfig(budget=0.02, score="gradient")
    batches = _labelled()
    base = tiny_vit()
    grads = calibration_gradients(base, target_modules(base, cfg), "head", batches)
    count = budget_entries(0.02, backbone_parameters(base, "head"), sum(g.numel() for g in grads.values()))
    expected = allocate(grads, count, "neuron")
    _, mask = get_taskedge_model(tiny_vit(), cfg, batches)
    assert mask.num_entries == count
    for name in expected.names():
        assert torch.equal(mask.indices[name], expected.indices[name]), name
    # and it is not the label-free paper score's mask
    _, paper = get_taskedge_model(tiny_vit(), TaskEdgeConfig(budget=0.02), batches)
    assert any(not torch.equal(mask.indices[n], paper.indices[n]) for n in mask.names())


def test_unlabelled_calibration_and_unsupported_combinations_are_refused_by_name():
    with pytest.raises(ValueError, match="labelled calibration batches"):
        get_taskedge_model(tiny_vit(), TaskEdgeConfig(budget=0.02, score="gradient"), [torch.randn(4, 3, 16, 16)])
    assert TaskEdgeConfig(score="gradient", nm=(2, 4)).nm == (2, 4)  # pruned by |W|·‖X‖ (tests/test_gradient_private)
    assert parse_run_config({"score": "gradient"}).score == "gradient"
    for extra in ({"dp": "server"}, {"secure-aggregation": True, "clip-norm": 1.0}, {"nm": "2:4"}):
        assert parse_run_config({"score": "gradient", **extra}).score == "gradient"  # SecAgg+ / DP / N:M carry it
    with pytest.raises(ValueError, match="run config 'score': '?gradient'? needs reconcile='stats'"):
        parse_run_config({"score": "gradient", "reconcile": "vote"})
