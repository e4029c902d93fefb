"""The method and score registries: one name per method everywhere, builders that train exactly what each
method declares (hand counts), aliases resolved in one place, and scores that say what they need."""
import pytest
import torch
from torch import nn

from common.methods import BUILDERS, build, build_calibrated, get_arrays, set_arrays
from common.options import METHODS as RUN_CONFIG_METHODS
from common.registry import ALIASES, FEDERATED_METHODS, MASK_METHODS, METHODS, resolve_method
from common.settings import parse_run_config
from common.taskedge.config import TaskEdgeConfig
from common.taskedge.importance import importance, row_norms
from common.taskedge.scores import REGISTRY as SCORES, get_score
from common.taskedge.tuner import calibrate, target_modules

HEAD = "head"


def _vit():
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2,
                             num_classes=5)


def _calib(n=2):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 5, (4,), generator=gen)) for _ in range(n)]


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_every_registered_name_has_one_builder_and_the_run_config_offers_the_federated_ones():
    assert set(BUILDERS) == set(METHODS)
    assert RUN_CONFIG_METHODS == FEDERATED_METHODS
    assert set(MASK_METHODS) == {"taskedge", "taskedge-lora"}
    assert not set(ALIASES) & set(METHODS)  # an alias never shadows a registered name


def test_aliases_resolve_in_one_place_and_unknown_names_are_named():
    assert {a: resolve_method(a) for a in ("linear", "full", "lora", "bn_head", "lora_dw")} == {
        "linear": "head-only", "full": "fedavg-full", "lora": "fedlora", "bn_head": "bn-head", "lora_dw": "lora-dw"}
    assert parse_run_config(method="lora").method == "fedlora"
    with pytest.raises(ValueError, match="method must be one of taskedge, .*; got 'lorra'"):
        resolve_method("lorra")
    with pytest.raises(ValueError, match="run config 'method': must be one of .*got 'bn-head'"):
        parse_run_config(method="bn-head")  # registered, but has no wire form: not a federated method


def _hand_count(method: str, model: nn.Module, r: int) -> int:
    """What each method trains, counted from the plain model's own modules (not from requires_grad)."""
    head = sum(p.numel() for p in model.get_submodule(HEAD).parameters())
    targets = target_modules(model, TaskEdgeConfig())
    if method == "head-only":
        return head
    if method in ("fedavg-full", "galore"):
        return sum(p.numel() for p in model.parameters())
    if method == "bn-head":
        return head + sum(p.numel() for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters())
    if method == "bitfit":
        return head + sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias")
                          and not n.startswith(HEAD + "."))
    # LoRA: A (r x the weight's input width: in, or in x kh x kw for a conv) and B (out x r) per target module
    lora = sum(r * (m.weight[0].numel() + m.weight.shape[0]) for m in targets.values())
    if method == "fedlora":
        return head + lora
    if method == "dora":
        return head + lora + sum(m.weight.shape[0] for m in targets.values())  # + DoRA's magnitude per output
    raise AssertionError(method)


@pytest.mark.parametrize("method", ["head-only", "fedavg-full", "galore", "bn-head", "bitfit", "fedlora", "dora"])
def test_each_builder_trains_what_its_method_declares(method):
    r = 2
    expected = _hand_count(method, _vit(), r)
    model = build(method, _vit(), TaskEdgeConfig(), lora_rank=r, save_head=False)
    assert _trainable(model) == expected


def test_mask_methods_train_the_budget_to_the_entry():
    model, mask = build_calibrated("taskedge", _vit(), TaskEdgeConfig(budget=300), _calib())
    head = sum(p.numel() for p in model.get_submodule(HEAD).parameters())
    assert mask.num_entries == 300 and _trainable(model) == 300 + head
    r = 3
    lmodel, lmask = build_calibrated("taskedge-lora", _vit(), TaskEdgeConfig(budget=300), _calib(), lora_rank=r)
    rows = sum(int(torch.unique(lmask.indices[n] // lmask.shapes[n][1]).numel()) for n in lmask.names())
    assert _trainable(lmodel) == r * rows + head  # B: (rows of the mask) x r, A frozen


def test_a_mask_method_refuses_to_build_without_a_mask_and_the_rest_need_none():
    with pytest.raises(ValueError, match="taskedge needs a mask"):
        build("taskedge", _vit(), TaskEdgeConfig())
    model, mask = build_calibrated("linear", _vit(), TaskEdgeConfig(), None)  # an alias, no calibration data
    assert mask is None and _trainable(model) == 32 * 5 + 5


@pytest.mark.parametrize("method", FEDERATED_METHODS)
def test_federated_methods_round_trip_their_wire_form(method):
    kw = {"mask": build_calibrated("taskedge", _vit(), TaskEdgeConfig(budget=200), _calib())[1]} \
        if method in MASK_METHODS else {}
    model = build(method, _vit(), TaskEdgeConfig(budget=200), lora_rank=2, **kw)
    arrays = {k: v + 1.0 for k, v in get_arrays(method, model).items()}
    set_arrays(method, model, arrays)
    assert all((get_arrays(method, model)[k] == v).all() for k, v in arrays.items())


def test_scores_declare_what_they_need_and_compute_it():
    model = _vit()
    name, mod = next(iter(target_modules(model, TaskEdgeConfig()).items()))
    norm = torch.rand(mod.in_features) + 0.1
    w, act = mod.weight.detach().abs(), norm.expand(mod.out_features, -1)
    expected = {"taskedge": w * act, "taskedge-sqrt": w * act.sqrt(), "magnitude": w, "activation": act}
    for score, want in expected.items():
        assert torch.allclose(importance(mod, norm, score), want), score
    assert torch.equal(row_norms(mod, norm), act)
    needs = {s.name: set(s.needs) for s in SCORES.values()}
    assert needs == {"taskedge": {"weights", "stats"}, "taskedge-sqrt": {"weights", "stats"}, "magnitude": {"weights"},
                     "activation": {"stats"}, "random": set(), "gradient": {"gradients"}}
    with pytest.raises(ValueError, match="computed from calibration gradients"):
        importance(mod, norm, "gradient")
    with pytest.raises(ValueError, match="score must be one of taskedge, .*got 'wanda'"):
        get_score("wanda")


@pytest.mark.parametrize("score", list(SCORES))
def test_calibration_collects_only_what_the_score_needs(score):
    norms, grads = calibrate(_vit(), TaskEdgeConfig(score=score), _calib())
    assert (norms is not None) == get_score(score).needs_stats
    assert (grads is not None) == get_score(score).needs_gradients


def test_docs_list_the_registries():
    from pathlib import Path

    from common.registry import methods_table
    from common.taskedge.scores import scores_table

    text = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    for tag, table in (("methods", methods_table()), ("scores", scores_table())):
        start, end = f"<!-- {tag}:start -->\n", f"<!-- {tag}:end -->"
        assert text[text.index(start) + len(start):text.index(end)] == table, f"regenerate the {tag} table"
