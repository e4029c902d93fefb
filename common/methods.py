"""The builders of the method registry (`common.registry` names them), and the federated methods' wire form.

`build` turns a pre-trained model into any registered method's trainable model: the federation, the
centralised runs, `taskedge-finetune` and the benchmarks all build through it.
Every federated method reduces to "a dict of float32 arrays that travels":

- taskedge:    `common.wire.pack` — the packed `values` vector of the global mask + the dense head.
- taskedge-lora: `common.taskedge.lora.pack_lora` — dW = M ⊙ (B A) on the global mask M with A frozen (shared by
               seed): the packed `lora_B` vector + the dense head; averaging B averages the updates exactly.
- fedlora:     HF peft LoRA (r, alpha=2r) adapters on the same target modules + the head.
- fedavg-full: every floating-point entry of the state dict.
- head-only:   the dense classifier head alone (a linear probe; the frozen backbone is the floor).

`method_model` is the one place that turns a run configuration (and a mask) into the trainable
model; the server builds its own copy with it for the initial arrays, centralised evaluation and
the final merged export. No Flower imports here.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from common.taskedge.allocation import Mask
from common.taskedge.config import TaskEdgeConfig
from common.taskedge.scores import get_score
from common.train import HEAD_LR_ATTR
from common.taskedge.tuner import (apply_mask, apply_nm, build_mask, calibrate, find_head, mark_trainable,
                                   merge_and_unload)
from common.registry import METHODS, method_info, resolve_method
from common.wire import PACKED, Arrays, carry_values, nested, pack, unpack

if TYPE_CHECKING:
    from common.settings import AppConfig



@lru_cache(maxsize=2)
def pretrained_base(model: str, num_classes: int, weights_path: str, seed: int, img_size: int = 0) -> nn.Module:
    """The pre-trained model for these run-config values, built once per process and shared: never mutate it
    (`base_model` hands out copies)."""
    from common.architectures import EMBEDDED_MODELS
    from common.models import create_model

    kw = {"img_size": img_size} if img_size and model not in EMBEDDED_MODELS and takes_img_size(model) else {}
    if weights_path == "hub":
        return create_model(model, num_classes=num_classes, pretrained=True, **kw)
    if weights_path:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return create_model(model, num_classes=num_classes, weights=weights_path, **kw)
    if model in EMBEDDED_MODELS:
        return create_model(model, num_classes=num_classes, pretrained=True)
    with torch.random.fork_rng():  # no weights: identical random init on every node
        torch.manual_seed(seed)
        return create_model(model, num_classes=num_classes, **kw)


def takes_img_size(model: str) -> bool:
    """Whether a timm architecture is built for an input size (ViT-like: patch grid, position embedding);
    CNNs pool globally and take any size."""
    import inspect

    import timm

    fn = timm.models.model_entrypoint(model) if timm.is_model(model) else None
    if fn is None:
        return False
    cls = getattr(timm.models, fn.__module__.rsplit(".", 1)[-1], None)
    arch = next((v for v in vars(cls).values() if isinstance(v, type) and issubclass(v, nn.Module)
                 and "img_size" in inspect.signature(v.__init__).parameters), None) if cls else None
    return arch is not None


def base_fingerprint(model: str, num_classes: int, weights_path: str = "", seed: int = 0, img_size: int = 0) -> str:
    """`common.models.backbone_fingerprint` of this process's pre-trained model for these run-config values (the
    arguments of `base_model`): the cached copy `base_model` deep-copies, so it is hashed once per process."""
    from common.models import backbone_fingerprint

    return backbone_fingerprint(pretrained_base(model, num_classes, weights_path, seed, img_size))


def base_model(model: str, num_classes: int, weights_path: str = "", seed: int = 0, img_size: int = 0) -> nn.Module:
    """A fresh copy of the pre-trained model (cached per process; the cache is never mutated); `img_size`:
    build a ViT-like model for that input size (its position embedding resampled from the weights)."""
    return copy.deepcopy(pretrained_base(model, num_classes, weights_path, seed, img_size))


def _taskedge(base: nn.Module, tcfg: TaskEdgeConfig, mask: Mask | None, rank: int, seed: int, save_head: bool) -> nn.Module:
    return apply_mask(base, mask, tcfg)


def _taskedge_lora(base: nn.Module, tcfg: TaskEdgeConfig, mask: Mask | None, rank: int, seed: int,
                   save_head: bool) -> nn.Module:
    from common.taskedge.lora import TaskEdgeLoRAConfig, apply_lora_mask

    return apply_lora_mask(base, mask, TaskEdgeLoRAConfig(**{**tcfg.to_dict(), "r": rank}))


def _head_only(base: nn.Module, tcfg: TaskEdgeConfig, mask: Mask | None, rank: int, seed: int, save_head: bool) -> nn.Module:
    mark_trainable(base, find_head(base, tcfg.head))
    return base


def _peft(dora: bool = False, depthwise: bool = False):
    """peft LoRA / DoRA (alpha 2r) + dense head; depthwise convs peft refuses stay frozen (`depthwise`: forced
    in at r = groups, the cost study's variant)."""
    def make(base: nn.Module, tcfg: TaskEdgeConfig, mask: Mask | None, rank: int, seed: int, save_head: bool) -> nn.Module:
        from common.baselines import peft_lora

        return peft_lora(base, rank, dora=dora, seed=seed, config=tcfg, save_head=save_head, force_grouped=depthwise)
    return make


def _only(trains: str):
    """Freeze all but the head plus `trains` (common.baselines.train_only)."""
    def make(base: nn.Module, tcfg: TaskEdgeConfig, mask: Mask | None, rank: int, seed: int, save_head: bool) -> nn.Module:
        from common.baselines import train_only

        return train_only(base, trains)
    return make


def _everything(base: nn.Module, tcfg: TaskEdgeConfig, mask: Mask | None, rank: int, seed: int, save_head: bool) -> nn.Module:
    return base.requires_grad_(True)  # galore: the low rank lives in its optimizer (common.baselines.galore_optimizer)


# one builder per name of common.registry.METHODS (tests/test_registry.py checks they agree)
BUILDERS = {
    "taskedge": _taskedge, "taskedge-lora": _taskedge_lora,
    "fedlora": _peft(), "dora": _peft(dora=True), "lora-dw": _peft(depthwise=True),
    "fedavg-full": _everything, "galore": _everything,
    "head-only": _head_only, "bn-head": _only("bn-head"), "bitfit": _only("bitfit"),
}


def build(method: str, base: nn.Module, tcfg: TaskEdgeConfig, mask: Mask | None = None,
          lora_rank: int = 8, seed: int = 0, *, save_head: bool = True) -> nn.Module:
    """Turn a pre-trained model into the trainable model of `method` (a name or alias of common.registry),
    in place where the method allows it. `save_head`: peft methods keep the head in peft's state dict
    (`modules_to_save`, what the federation sends); False trains it as a plain parameter (no extra copy).

    With N:M on (tcfg.nm), the base weights of a mask method are first pruned from the activation norms the
    mask carries (`Mask.norms`): the same pruning on every node and on the server.
    """
    name = resolve_method(method)
    if METHODS[name].uses_mask:
        if mask is None:
            raise ValueError(f"{name} needs a mask")
        if tcfg.nm is not None:
            if mask.norms is None and get_score(tcfg.score).needs_stats:
                raise ValueError(f"nm={tcfg.nm}: the mask carries no activation norms to prune the base weights by")
            apply_nm(base, tcfg, mask.norms)
    return BUILDERS[name](base, tcfg, mask, lora_rank, seed, save_head)


def build_calibrated(method: str, base: nn.Module, tcfg: TaskEdgeConfig, calib_batches=None, lora_rank: int = 8,
                     seed: int = 0, *, save_head: bool = True) -> tuple[nn.Module, Mask | None]:
    """The centralised path of `build`: a mask method first scores `calib_batches` (a list of (x, y)) and
    allocates its mask on this model; (trainable model, mask or None)."""
    mask = None
    if method_info(method).uses_mask:
        norms, grads = calibrate(base, tcfg, calib_batches)
        mask = build_mask(base, tcfg, norms, grads)
    return build(method, base, tcfg, mask, lora_rank, seed, save_head=save_head), mask


def method_model(cfg: AppConfig, mask: Mask | None = None) -> nn.Module:
    """The trainable model of `cfg.method` on a fresh copy of the pre-trained backbone."""
    base = base_model(cfg.model, cfg.head_size, cfg.weights_path, cfg.seed, cfg.img_size)
    model = build(cfg.method, base, cfg.taskedge_config(), mask, cfg.lora_rank, cfg.seed)
    setattr(model, HEAD_LR_ATTR, cfg.effective_head_lr)  # the head's AdamW rate (common.train.make_optimizer reads it)
    return model


def get_arrays(method: str, model: nn.Module) -> Arrays:
    """The wire form of what this method trains (float32, C-contiguous)."""
    if method == "taskedge":
        return pack(model)
    if method == "taskedge-lora":
        from common.wire import pack_lora

        return pack_lora(model)
    if method == "fedlora":
        from peft import get_peft_model_state_dict

        sd = get_peft_model_state_dict(model)
    elif method == "head-only":
        head = find_head(model)
        sd = {k: v for k, v in model.state_dict().items() if k.startswith(head + ".") and v.is_floating_point()}
    else:
        sd = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    return OrderedDict((k, np.ascontiguousarray(v.detach().cpu().numpy(), dtype=np.float32)) for k, v in sd.items())


def set_arrays(method: str, model: nn.Module, arrays: dict[str, np.ndarray]) -> None:
    """Inverse of `get_arrays`; checks keys and shapes before writing anything."""
    specs = OrderedDict((k, v.shape) for k, v in get_arrays(method, model).items())
    if set(arrays) != set(specs):
        raise ValueError(f"arrays do not match the model: missing {sorted(set(specs) - set(arrays))[:4]}, "
                         f"unexpected {sorted(set(arrays) - set(specs))[:4]}")
    for k, shape in specs.items():
        if tuple(np.shape(arrays[k])) != tuple(shape):
            raise ValueError(f"'{k}': expected shape {tuple(shape)}, got {np.shape(arrays[k])}")
    if method == "taskedge":
        unpack(model, arrays)
    elif method == "taskedge-lora":
        from common.wire import unpack_lora

        unpack_lora(model, arrays)
    elif method == "fedlora":
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()})
    else:
        sd = model.state_dict()
        with torch.no_grad():
            for k, v in arrays.items():
                sd[k].copy_(torch.from_numpy(np.asarray(v)).to(sd[k].dtype))


def export(method: str, model: nn.Module) -> nn.Module:
    """A plain model with the learned update folded in (what gets deployed)."""
    if method_info(method).uses_mask:
        return merge_and_unload(model)
    if method == "fedlora":
        return copy.deepcopy(model).merge_and_unload()
    return copy.deepcopy(model)


def num_entries(arrays: dict[str, np.ndarray]) -> int:
    return int(sum(np.asarray(v).size for v in arrays.values()))


def node_mask(method: str, mask: Mask, rank: int) -> tuple[Mask, np.ndarray | None]:
    """The mask a node of budget rank `rank` trains and its positions in the packed vector (None: all).

    taskedge: the nested sub-mask (`common.wire.nested`). taskedge-lora: always the whole mask — B's
    rows and the support M are global, so a smaller budget rank does not apply (the rank is ignored).
    """
    if method == "taskedge":
        return nested(mask, rank)
    return mask, None


def carry_arrays(method: str, old_mask: Mask, old_arrays: dict[str, np.ndarray], new_mask: Mask,
                 new_arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Arrays for a re-reconciled mask: what was learned on the old mask carried over where it survives
    (taskedge: surviving entries keep their values; taskedge-lora: surviving rows keep their B), the
    head kept as it is; `new_arrays` (the fresh model's arrays) gives the keys and shapes."""
    out = dict(new_arrays)
    if method == "taskedge":
        out[PACKED] = carry_values(old_mask, old_arrays[PACKED], new_mask)
    elif method == "taskedge-lora":
        from common.wire import LORA_PACKED, carry_lora, mask_rows

        rows = sum(v.numel() for v in mask_rows(old_mask).values())
        r = int(np.asarray(old_arrays[LORA_PACKED]).size // max(rows, 1))
        out[LORA_PACKED] = carry_lora(old_mask, old_arrays[LORA_PACKED], new_mask, r)
    else:
        raise ValueError(f"method {method!r} has no mask to re-reconcile")
    out.update((k, v) for k, v in old_arrays.items() if k not in (PACKED, "lora_B") and k in out)
    return out
