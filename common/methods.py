"""The method registry: the three federated methods behind one small interface, for both apps.

Every method reduces to "a dict of float32 arrays that travels":

- taskedge:    `common.wire.pack` — the packed `values` vector of the global mask + the dense head.
- fedlora:     HF peft LoRA (r, alpha=2r) adapters on the same target modules + the head.
- fedavg-full: every floating-point entry of the state dict.

`method_model` is the one place that turns a run configuration (and a mask) into the trainable
model; the server builds its own copy with it for the initial arrays, centralised evaluation and
the final merged export. No Flower imports here.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from functools import lru_cache

import numpy as np
import torch
from torch import nn

from common.allocation import Mask
from common.config import TaskEdgeConfig
from common.tuner import apply_mask, find_head, merge_and_unload, target_modules
from common.settings import AppConfig
from common.wire import Arrays, pack, unpack


@lru_cache(maxsize=2)
def _cached_base(model: str, num_classes: int, weights_path: str, seed: int) -> nn.Module:
    from common.models import EMBEDDED_MODELS, create_model

    if weights_path == "hub":
        return create_model(model, num_classes=num_classes, pretrained=True)
    if weights_path:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return create_model(model, num_classes=num_classes, weights=weights_path)
    if model in EMBEDDED_MODELS:
        return create_model(model, num_classes=num_classes, pretrained=True)
    with torch.random.fork_rng():  # no weights: identical random init on every node
        torch.manual_seed(seed)
        return create_model(model, num_classes=num_classes)


def base_model(model: str, num_classes: int, weights_path: str = "", seed: int = 0) -> nn.Module:
    """A fresh copy of the pre-trained model (cached per process; the cache is never mutated)."""
    return copy.deepcopy(_cached_base(model, num_classes, weights_path, seed))


def build(method: str, base: nn.Module, tcfg: TaskEdgeConfig, mask: Mask | None = None,
          lora_rank: int = 8, seed: int = 0) -> nn.Module:
    """Turn a pre-trained model into the trainable model of `method` (in place for taskedge)."""
    if method == "taskedge":
        if mask is None:
            raise ValueError("taskedge needs a mask")
        return apply_mask(base, mask, tcfg)
    if method == "fedlora":
        from peft import LoraConfig, get_peft_model

        targets = list(target_modules(base, tcfg))
        head = find_head(base, tcfg.head)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return get_peft_model(base, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules=targets,
                                                   modules_to_save=[head] if head else None))
    if method == "fedavg-full":
        for p in base.parameters():
            p.requires_grad_(True)
        return base
    raise ValueError(f"unknown method {method!r}")


def method_model(cfg: AppConfig, mask: Mask | None = None) -> nn.Module:
    """The trainable model of `cfg.method` on a fresh copy of the pre-trained backbone."""
    from common.data import get_task

    base = base_model(cfg.model, get_task(cfg.task).num_classes, cfg.weights_path, cfg.seed)
    return build(cfg.method, base, cfg.taskedge_config(), mask, cfg.lora_rank, cfg.seed)


def get_arrays(method: str, model: nn.Module) -> Arrays:
    """The wire form of what this method trains (float32, C-contiguous)."""
    if method == "taskedge":
        return pack(model)
    if method == "fedlora":
        from peft import get_peft_model_state_dict

        sd = get_peft_model_state_dict(model)
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
    if method == "taskedge":
        return merge_and_unload(model)
    if method == "fedlora":
        return copy.deepcopy(model).merge_and_unload()
    return copy.deepcopy(model)


def num_entries(arrays: dict[str, np.ndarray]) -> int:
    return int(sum(np.asarray(v).size for v in arrays.values()))
