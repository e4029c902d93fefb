"""The three federated methods behind one small interface, shared by client and server.

Every method reduces to "a dict of float32 arrays that travels" (the wire form):

- taskedge:    {"values": all masked entries, concatenated in mask order (modules sorted by
               name, ascending flat index)} + the dense head ("head.weight", ...). One packed
               vector keeps the per-array framing constant, so an upload is ~4 B x entries.
- fedlora:     HF peft LoRA (r, alpha=2r) adapters on the same target modules + the head.
- fedavg-full: every floating-point entry of the state dict.

The server builds its own model with the same functions, for the initial arrays,
centralised evaluation and the final merged export. No Flower imports here.
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
from common.tuner import apply_mask, delta_layers, extract, find_head, load, merge_and_unload, target_modules

PACKED = "values"
Arrays = "OrderedDict[str, np.ndarray]"


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


def module_sizes(model: nn.Module) -> "OrderedDict[str, int]":
    """Entries per sparse-delta module, in the packed order."""
    return OrderedDict((n, int(m.values.numel())) for n, m in delta_layers(model).items())


def get_arrays(method: str, model: nn.Module) -> Arrays:
    """The wire form of what this method trains (float32, C-contiguous)."""
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    if method == "taskedge":
        flat = extract(model, indices=False)
        vals = [v for k, v in flat.items() if k.endswith(".values")]
        out[PACKED] = np.concatenate(vals).astype(np.float32) if vals else np.zeros(0, np.float32)
        out.update((k, v) for k, v in flat.items() if not k.endswith(".values"))
    elif method == "fedlora":
        from peft import get_peft_model_state_dict

        out.update((k, v.detach().cpu().numpy()) for k, v in get_peft_model_state_dict(model).items())
    else:
        out.update((k, v.detach().cpu().numpy()) for k, v in model.state_dict().items() if v.is_floating_point())
    return OrderedDict((k, np.ascontiguousarray(v, dtype=np.float32)) for k, v in out.items())


def array_specs(method: str, model: nn.Module) -> "OrderedDict[str, tuple[int, ...]]":
    """Expected key -> shape of the wire form (what a valid reply must look like)."""
    return OrderedDict((k, v.shape) for k, v in get_arrays(method, model).items())


def set_arrays(method: str, model: nn.Module, arrays: dict[str, np.ndarray]) -> None:
    """Inverse of `get_arrays`; checks keys and shapes before writing anything."""
    specs = array_specs(method, model)
    if set(arrays) != set(specs):
        raise ValueError(f"arrays do not match the model: missing {sorted(set(specs) - set(arrays))[:4]}, "
                         f"unexpected {sorted(set(arrays) - set(specs))[:4]}")
    for k, shape in specs.items():
        if tuple(np.shape(arrays[k])) != tuple(shape):
            raise ValueError(f"'{k}': expected shape {tuple(shape)}, got {np.shape(arrays[k])}")
    if method == "taskedge":
        sizes = module_sizes(model)
        parts = np.split(np.asarray(arrays[PACKED]), np.cumsum(list(sizes.values()))[:-1]) if sizes else []
        flat = {f"{n}.values": p for n, p in zip(sizes, parts)}
        flat.update((k, v) for k, v in arrays.items() if k != PACKED)
        load(model, flat)
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
