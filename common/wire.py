"""The one wire format of TaskEdge-FL, used by the client and the server alike (no Flower here).

* A mask goes down once per mask version, as `Mask.to_arrays()`: '<module>.idx', '<module>.rank'
  and '<module>.shape' (int64). It is never re-sent with the values.
* Every training / evaluation message of a round carries ONE ArrayRecord of the same keys and
  shapes for every client: `values`, all entries of the global mask (modules in sorted order,
  ascending flat index within a module) as one float32 vector, then the dense head's state-dict
  entries. A node with a smaller budget rank trains only the nested sub-mask (`Mask.subset`) but
  answers with the full-length vector (entries it did not train unchanged), so DP clipping and
  secure aggregation see a plain fixed-length vector; the server knows each node's rank and
  derives the per-entry denominators from it (`packed_positions`).
* `extract` / `load` are the per-module form of the same values (centralised use, inspection).
* With run config `value-dtype` float16 / int8 these float32 arrays are encoded on the wire only
  (common/quantize.py; down: the values, up: each node's update); both sides work on float32.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from .taskedge.allocation import Mask
from .taskedge.lora import LORA_PACKED, lora_layers, mask_rows
from .taskedge.tuner import delta_layers, find_head

PACKED = "values"
Arrays = "OrderedDict[str, np.ndarray]"

def packed_offsets(mask: Mask) -> dict[str, int]:
    """Start of each module's block in the packed value vector (modules in sorted order)."""
    offs, pos = {}, 0
    for n in mask.names():
        offs[n] = pos
        pos += int(mask.indices[n].numel())
    return offs

def packed_positions(full: Mask, sub: Mask) -> np.ndarray:
    """Positions of a nested sub-mask's entries inside the full mask's packed vector."""
    offs = packed_offsets(full)
    rel = sub.positions_in(full)
    parts = [offs[n] + rel[n].numpy() for n in sub.names()]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

def carry_values(old: Mask, old_values: np.ndarray, new: Mask) -> np.ndarray:
    """Packed values for a new mask: surviving entries keep their learned value, new ones start at 0."""
    out = np.zeros(new.num_entries, dtype=np.float32)
    old_offs, new_offs = packed_offsets(old), packed_offsets(new)
    for n in new.names():
        if n not in old.indices:
            continue
        oi, ni = old.indices[n].numpy(), new.indices[n].numpy()
        _, o_pos, n_pos = np.intersect1d(oi, ni, assume_unique=True, return_indices=True)
        out[new_offs[n] + n_pos] = old_values[old_offs[n] + o_pos]
    return out

def pack(model: nn.Module) -> Arrays:
    """The wire arrays of a sparse-delta model: the packed `values` vector, then the head."""
    flat = extract(model, indices=False)
    vals = [v for k, v in flat.items() if k.endswith(".values")]
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    out[PACKED] = np.concatenate(vals) if vals else np.zeros(0, np.float32)
    out.update((k, v) for k, v in flat.items() if not k.endswith(".values"))
    return OrderedDict((k, np.ascontiguousarray(v, dtype=np.float32)) for k, v in out.items())

def unpack(model: nn.Module, arrays: dict[str, np.ndarray]) -> None:
    """Inverse of `pack`; every array is checked before anything is written."""
    sizes = OrderedDict((n, int(m.values.numel())) for n, m in delta_layers(model).items())
    values = np.asarray(arrays.get(PACKED, np.zeros(0, np.float32))).reshape(-1)
    if values.size != sum(sizes.values()):
        raise ValueError(f"'{PACKED}': expected {sum(sizes.values())} entries (the mask), got {values.size}")
    parts = np.split(values, np.cumsum(list(sizes.values()))[:-1]) if sizes else []
    flat = {f"{n}.values": p for n, p in zip(sizes, parts)}
    flat.update((k, v) for k, v in arrays.items() if k != PACKED)
    load(model, flat)

def take(arrays: dict[str, np.ndarray], positions: np.ndarray | None) -> Arrays:
    """A nested node's share of the global arrays: the values at `positions` (None = all)."""
    out = OrderedDict(arrays)
    if positions is not None:
        out[PACKED] = np.asarray(arrays[PACKED])[positions]
    return out

def put(full: dict[str, np.ndarray], trained: dict[str, np.ndarray], positions: np.ndarray | None) -> Arrays:
    """Inverse of `take`: the full-length arrays with a nested node's trained values written back."""
    out = OrderedDict(trained)
    if positions is not None:
        vec = np.array(full[PACKED], dtype=np.float32, copy=True)
        vec[positions] = trained[PACKED]
        out[PACKED] = vec
    return out

def extract(model: nn.Module, indices: bool = True, head: str | None | bool = True) -> "OrderedDict[str, np.ndarray]":
    """Flat arrays in a stable order: '<module>.idx' (int64, optional), '<module>.values' (float32),
    then the head's state-dict entries. The per-module form of `pack` (what `load` reads back)."""
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for name, layer in delta_layers(model).items():
        if indices:
            out[f"{name}.idx"] = layer.flat_idx.cpu().numpy().astype(np.int64)
        out[f"{name}.values"] = layer.values.detach().cpu().float().numpy()
    if head is not False:
        hname = find_head(model, None if head is True else head)
        if hname is not None:
            for k, v in model.get_submodule(hname).state_dict().items():
                out[f"{hname}.{k}"] = v.detach().cpu().numpy()
    return out

def load(model: nn.Module, arrays: dict[str, np.ndarray], head: str | None | bool = True) -> None:
    """Inverse of `extract`. Validates every array (names, shapes, dtypes, indices) before writing any."""
    layers = delta_layers(model)
    hname = find_head(model, None if head is True else head) if head is not False else None
    head_sd = model.get_submodule(hname).state_dict() if hname else {}
    writes = []
    for key, arr in arrays.items():
        arr = np.asarray(arr)
        mod, _, leaf = key.rpartition(".")
        if mod in layers and leaf == "values":
            layer = layers[mod]
            if "values" not in layer.TRAINABLE:  # common.taskedge.lora: values derive from lora_B (common.taskedge.lora.unpack_lora)
                raise ValueError(f"'{key}': the values of '{mod}' are derived, not loadable; load its factors instead")
            if arr.shape != tuple(layer.values.shape) or arr.dtype.kind != "f":
                raise ValueError(f"'{key}': expected float array of shape {tuple(layer.values.shape)}, "
                                 f"got {arr.dtype} {arr.shape}")
            writes.append((layer.values, arr))
        elif mod in layers and leaf == "idx":
            if arr.shape != tuple(layers[mod].flat_idx.shape) or not np.array_equal(arr, layers[mod].flat_idx.cpu().numpy()):
                raise ValueError(f"'{key}': indices differ from the model's mask; apply the new mask first")
        elif hname and key.startswith(hname + ".") and key[len(hname) + 1:] in head_sd:
            ref = head_sd[key[len(hname) + 1:]]
            if arr.shape != tuple(ref.shape) or arr.dtype.kind != "f":
                raise ValueError(f"'{key}': expected float array of shape {tuple(ref.shape)}, got {arr.dtype} {arr.shape}")
            writes.append((ref, arr))
        else:
            raise ValueError(f"unknown key '{key}': expected '<module>.values' / '<module>.idx' of a sparse-delta "
                             f"layer or a head entry '{hname}.*'")
    with torch.no_grad():
        for tensor, arr in writes:
            tensor.copy_(torch.from_numpy(np.ascontiguousarray(arr)).to(tensor.dtype))

def nested(mask: Mask, rank: int) -> tuple[Mask, np.ndarray | None]:
    """The sub-mask a node of budget rank `rank` trains, and where its entries sit in the packed
    vector (None: the node trains the whole mask; rank 0 means the whole mask)."""
    if rank <= 0:
        return mask, None
    sub = mask.subset(rank)
    if sub.num_entries == mask.num_entries:
        return mask, None
    return sub, packed_positions(mask, sub)


# ---- TaskEdge + LoRA (method taskedge-lora): B of every wrapped module, then the dense head
def _head_arrays(model: nn.Module) -> OrderedDict:
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    hname = find_head(model)
    if hname is not None:
        for k, v in model.get_submodule(hname).state_dict().items():
            out[f"{hname}.{k}"] = np.ascontiguousarray(v.detach().cpu().numpy(), dtype=np.float32)
    return out


def pack_lora(model: nn.Module) -> "OrderedDict[str, np.ndarray]":
    """Wire arrays: 'lora_B' (every module's B, sorted module order, row-major) then the dense head."""
    parts = [layer.lora_B.detach().cpu().float().numpy().reshape(-1) for layer in lora_layers(model).values()]
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    out[LORA_PACKED] = np.ascontiguousarray(np.concatenate(parts) if parts else np.zeros(0, np.float32),
                                            dtype=np.float32)
    out.update(_head_arrays(model))
    return out


def unpack_lora(model: nn.Module, arrays: dict[str, np.ndarray]) -> None:
    """Inverse of `pack_lora`; the head goes through `load` (validated before any write)."""
    layers = lora_layers(model)
    sizes = [layer.lora_B.numel() for layer in layers.values()]
    vec = np.asarray(arrays.get(LORA_PACKED, np.zeros(0, np.float32))).reshape(-1)
    if vec.size != sum(sizes) or vec.dtype.kind != "f":
        raise ValueError(f"'{LORA_PACKED}': expected {sum(sizes)} float entries, got {vec.dtype} {vec.size}")
    head = {k: v for k, v in arrays.items() if k != LORA_PACKED}
    load(model, head)  # validates head keys / shapes first
    with torch.no_grad():
        for layer, part in zip(layers.values(), np.split(vec, np.cumsum(sizes)[:-1]) if sizes else []):
            layer.lora_B.copy_(torch.from_numpy(np.ascontiguousarray(part)).reshape(layer.lora_B.shape))


def carry_lora(old: Mask, old_b: np.ndarray, new: Mask, r: int) -> np.ndarray:
    """Packed B for a new mask: the rows of neurons present under both masks keep their learned B
    (so the update on entries that survive is unchanged), other rows start at zero."""
    out = np.zeros(sum(v.numel() for v in mask_rows(new).values()) * r, dtype=np.float32)
    old_rows, new_rows = mask_rows(old), mask_rows(new)
    old_off, pos = {}, 0
    for n in old.names():
        old_off[n] = pos
        pos += old_rows[n].numel() * r
    pos = 0
    for n in new.names():
        nr = new_rows[n].numpy()
        if n in old_rows:
            _, o_pos, n_pos = np.intersect1d(old_rows[n].numpy(), nr, assume_unique=True, return_indices=True)
            src = old_b[old_off[n]:old_off[n] + old_rows[n].numel() * r].reshape(-1, r)
            dst = out[pos:pos + nr.size * r].reshape(-1, r)
            dst[n_pos] = src[o_pos]
        pos += nr.size * r
    return out
