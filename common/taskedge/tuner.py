"""The TaskEdge injector: find target modules, score, allocate, swap in sparse-delta layers.

    model = create_model(...)
    mask = build_mask(model, cfg, collect_norms(model, cfg, calib_batches))
    apply_mask(model, mask, cfg)      # in place; only `values` and the head train
    ... train ...
    plain = merge_and_unload(model)   # ordinary nn.Module with the deltas folded in

What travels between client and server (values in mask order, the head) is `common.wire`.
"""
from __future__ import annotations

import copy
import re
from dataclasses import replace
from collections.abc import Iterable

import torch
from torch import nn

from .allocation import Mask, allocate, budget_entries, nm_keep
from .config import TaskEdgeConfig
from .scores import get_score
from .importance import importance
from .layers import SparseDeltaConv2d, SparseDeltaLayer, SparseDeltaLinear
from .stats import collect_stats

SUPPORTED = (nn.Linear, nn.Conv2d)


def find_head(model: nn.Module, head: str | None = None) -> str | None:
    """Name of the classifier head: explicit (""/"none" = no head), timm's pretrained_cfg['classifier']
    (its first entry when a model has several, e.g. distilled DeiT), the module `get_classifier()`
    returns, or the last nn.Linear."""
    names = dict(model.named_modules())
    if head is not None:
        if head in ("", "none"):
            return None
        if head not in names:
            raise ValueError(f"head={head!r} is not a module of the model; e.g. one of {list(names)[-3:]}")
        return head
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    cls = cfg.get("classifier") if isinstance(cfg, dict) else None
    cls = cls[0] if isinstance(cls, (list, tuple)) and cls else cls
    if isinstance(cls, str) and cls in names:
        return cls
    if hasattr(model, "get_classifier"):
        clf = model.get_classifier()
        found = [n for n, m in names.items() if m is clf and n]
        if found:
            return found[0]
    linears = [n for n, m in names.items() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def _under(name: str, prefix: str | None) -> bool:
    return prefix is not None and (name == prefix or name.startswith(prefix + "."))


def target_modules(model: nn.Module, config: TaskEdgeConfig) -> dict[str, nn.Module]:
    """Modules that get a sparse delta, in sorted-name order (the canonical wire order)."""
    head = find_head(model, config.head)
    out = {}
    for name, mod in model.named_modules():
        if not name or _under(name, head) or isinstance(mod, SparseDeltaLayer):
            continue
        if config.target_modules is None:
            if isinstance(mod, SUPPORTED):
                out[name] = mod
            continue
        if any(re.fullmatch(p, name) for p in config.target_modules):
            if not isinstance(mod, SUPPORTED):
                raise TypeError(f"target_modules matched '{name}' of type {type(mod).__name__}; "
                                f"supported types are nn.Linear and nn.Conv2d")
            out[name] = mod
    out = {n: m for n, m in out.items() if not any(re.fullmatch(p, n) for p in config.exclude_modules)}
    if not out:
        raise ValueError(f"target_modules={config.target_modules!r} (exclude {config.exclude_modules!r}) "
                         f"matched no nn.Linear / nn.Conv2d outside the head")
    return dict(sorted(out.items()))


def _owner(name: str) -> str:
    """Module name that owns parameter `name` ("" for the root)."""
    return name.rpartition(".")[0]


def _is_delta_values(model: nn.Module, name: str) -> bool:
    """A trainable parameter of a sparse-delta wrapper (`values`; `lora_B` for common.taskedge.lora's layers)."""
    owner = model.get_submodule(_owner(name))
    return isinstance(owner, SparseDeltaLayer) and name.rpartition(".")[2] in owner.TRAINABLE


def backbone_parameters(model: nn.Module, head: str | None) -> int:
    """Parameters of the pre-trained backbone (everything but the head), counting wrapped bases once."""
    return sum(p.numel() for name, p in model.named_parameters()
               if not (_under(_owner(name), head) or _is_delta_values(model, name)))


def collect_norms(model: nn.Module, config: TaskEdgeConfig, batches: Iterable) -> dict[str, torch.Tensor]:
    """Calibration pass: per-feature activation norms for every target module."""
    stats = collect_stats(model, target_modules(model, config), batches)
    return {n: s.norm() for n, s in stats.items()}


def score_modules(model: nn.Module, config: TaskEdgeConfig, norms: dict[str, torch.Tensor] | None,
                  grads: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Score matrix per target module; score='gradient' takes them from `grads` (common.taskedge.gradient_score)."""
    gen = torch.Generator().manual_seed(config.seed)
    spec = get_score(config.score)
    scores = {}
    for name, mod in target_modules(model, config).items():
        if spec.needs_gradients:
            if grads is None or name not in grads:
                raise ValueError(f"no calibration gradient for module '{name}' (score={config.score!r} needs them)")
            scores[name] = grads[name]
            continue
        norm = None if norms is None else norms.get(name)
        if norm is None and spec.needs_stats:
            raise ValueError(f"no activation statistics for module '{name}' (score={config.score!r} needs them)")
        scores[name] = importance(mod, norm, config.score, gen)
    return scores


def mask_size(model: nn.Module, config: TaskEdgeConfig, scores: dict[str, torch.Tensor]) -> int:
    """Entries the budget buys over these (rows, width) score matrices: `budget` of the backbone's parameters,
    or `per_neuron` entries per output neuron (row)."""
    return budget_entries(config.budget, backbone_parameters(model, find_head(model, config.head)),
                          sum(s.numel() for s in scores.values()), rows=sum(s.shape[0] for s in scores.values()),
                          per_neuron=config.per_neuron)


def build_mask(model: nn.Module, config: TaskEdgeConfig, norms: dict[str, torch.Tensor] | None,
               grads: dict[str, torch.Tensor] | None = None) -> Mask:
    """Scores -> neuron-level (or global) mask of exactly the budgeted number of entries."""
    scores = score_modules(model, config, norms, grads)
    if config.nm is not None:
        n, m = config.nm
        pruned = set(nm_names(model, config))
        by = scores if prune_score(config) == config.score else _prune_scores(model, config, norms)
        scores = {k: s.masked_fill(~nm_keep(by[k], n, m), float("-inf")) if k in pruned else s
                  for k, s in scores.items()}
    mask = allocate(scores, mask_size(model, config, scores), config.allocation, col_cap=config.col_cap)
    if config.nm is not None:
        for name in mask.names():
            if torch.isinf(scores[name].reshape(-1)[mask.indices[name]]).any():
                raise ValueError(f"budget {config.budget!r} exceeds the entries that N:M={config.nm} keeps in '{name}'")
        if norms is not None:  # the pruning's input travels with the mask: every node prunes identically
            mask.norms = {k: norms[k] for k in scores if k in norms}
    return mask


def prune_score(config: TaskEdgeConfig) -> str:
    """The score N:M prunes the base weights by: the selection score itself, except for a gradient score,
    which prunes by Wanda's |W|·‖X‖ ('taskedge'; the usual N:M criterion): every node must redo the
    pruning from what the mask carries (the pooled norms, `Mask.norms`), and gradients never travel down."""
    return config.score if get_score(config.score).fn is not None else "taskedge"


def _prune_scores(model: nn.Module, config: TaskEdgeConfig, norms: dict[str, torch.Tensor] | None
                  ) -> dict[str, torch.Tensor]:
    return score_modules(model, replace(config, score=prune_score(config)), norms)


def nm_names(model: nn.Module, config: TaskEdgeConfig) -> list[str]:
    """Target modules that N:M applies to: those whose (rows, width) view has a width divisible by M
    (sparse tensor cores need it; any other module keeps its dense base and unrestricted mask)."""
    if config.nm is None:
        return []
    m = config.nm[1]
    return [n for n, mod in target_modules(model, config).items() if mod.weight[0].numel() % m == 0]


def apply_nm(model: nn.Module, config: TaskEdgeConfig, norms: dict[str, torch.Tensor] | None) -> None:
    """Prune the frozen base weights to N:M along the input by the same score (in place)."""
    if config.nm is None:
        return
    n, m = config.nm
    scores = _prune_scores(model, config, norms)
    mods = target_modules(model, config)
    for name in nm_names(model, config):
        mod = mods[name]
        keep = nm_keep(scores[name], n, m).reshape(mod.weight.shape)
        with torch.no_grad():
            mod.weight.mul_(keep.to(mod.weight.dtype))


def apply_mask(model: nn.Module, mask: Mask, config: TaskEdgeConfig | None = None) -> nn.Module:
    """Swap every masked module for its sparse-delta wrapper and freeze all but values + head.

    Everything is validated before the first module is touched, so a bad mask leaves the model as it was.
    """
    config = config or TaskEdgeConfig()
    modules = dict(model.named_modules())
    plan = []
    for name in mask.names():
        mod = modules.get(name)
        if mod is None:
            raise ValueError(f"mask names module '{name}', which the model does not have")
        if not isinstance(mod, SUPPORTED):
            raise TypeError(f"mask names '{name}' of type {type(mod).__name__}; supported: nn.Linear, nn.Conv2d")
        shape = (mod.weight.shape[0], mod.weight[0].numel())
        if tuple(mask.shapes[name]) != shape:
            raise ValueError(f"mask for '{name}' is for a {tuple(mask.shapes[name])} weight, the model has {shape}")
        plan.append((name, mod))
    head = find_head(model, config.head)
    wrapped = {}
    for name, mod in plan:
        if isinstance(mod, nn.Linear):
            wrapped[name] = SparseDeltaLinear(mod, mask.indices[name], config.save_dtype)
        else:
            # "auto": whichever common.taskedge.layers.dense_grad_pays picks per module (dense only for ungrouped convs
            # whose mask holds > 1/64 of the weight; depthwise / grouped stay sparse)
            dense = None if config.conv_grad == "auto" else config.conv_grad == "dense"
            wrapped[name] = SparseDeltaConv2d(mod, mask.indices[name], config.save_dtype, dense)
    for name, new in wrapped.items():
        set_module(model, name, new)
    mark_trainable(model, head)
    return model


def mark_trainable(model: nn.Module, head: str | None) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(_is_delta_values(model, name) or _under(_owner(name), head))


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def delta_layers(model: nn.Module) -> dict[str, SparseDeltaLayer]:
    return dict(sorted((n, m) for n, m in model.named_modules() if isinstance(m, SparseDeltaLayer)))


def merge_and_unload(model: nn.Module) -> nn.Module:
    """A plain copy of the model: every sparse-delta layer replaced by its merged base layer."""
    plain = copy.deepcopy(model)
    for name, layer in delta_layers(plain).items():
        set_module(plain, name, layer.merge())
    for p in plain.parameters():
        p.requires_grad_(True)
    return plain


def calibrate(model: nn.Module, config: TaskEdgeConfig, calib_batches: Iterable
              ) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor] | None]:
    """What the score (and N:M pruning) needs from the calibration batches: (norms, gradients)."""
    calib_batches = list(calib_batches)
    grads, spec = None, get_score(config.score)
    if spec.needs_gradients:
        from .gradient_score import calibration_gradients

        grads = calibration_gradients(model, target_modules(model, config), find_head(model, config.head),
                                      calib_batches)
    norms = collect_norms(model, config, calib_batches) if spec.needs_stats or config.nm else None
    return norms, grads


def get_taskedge_model(model: nn.Module, config: TaskEdgeConfig, calib_batches: Iterable) -> tuple[nn.Module, Mask]:
    """One call for the centralised path: calibrate, (N:M prune), allocate, wrap."""
    norms, grads = calibrate(model, config, calib_batches)
    mask = build_mask(model, config, norms, grads)
    apply_nm(model, config, norms)
    return apply_mask(model, mask, config), mask


def count_trainable(model: nn.Module, head: str | None = None) -> dict[str, int]:
    """Trainable entries split into sparse deltas and head, and the backbone size they are measured against."""
    hname = find_head(model, head)
    deltas = sum(getattr(layer, t).numel() for layer in delta_layers(model).values() for t in layer.TRAINABLE)
    head_n = sum(p.numel() for p in model.get_submodule(hname).parameters()) if hname else 0
    return {"delta": deltas, "head": head_n, "backbone": backbone_parameters(model, hname)}


def print_trainable_parameters(model: nn.Module, head: str | None = None) -> str:
    c = count_trainable(model, head)
    line = (f"trainable delta entries: {c['delta']:,} ({100 * c['delta'] / c['backbone']:.4f}% of "
            f"{c['backbone']:,} backbone params) || dense head: {c['head']:,}")
    print(line)
    return line
