"""TaskEdge + LoRA: a low-rank update confined to the TaskEdge mask, with a frozen random A.

    dW = M ⊙ (B A)        W_eff = W0 + dW

* M: the TaskEdge mask of the module (neuron-level top-k entries by |W|·‖X_j‖, the same `Mask` the
  plain method uses; with N:M on it lies inside the N:M keep set). `budget` sets its size.
* A (r x width): frozen, pseudo-random, derived from (seed, module name) by a counter-based hash
  (`frozen_a`), so every node and the server hold the same A without sending it, on any platform
  and torch version.
* B (rows x r): trained, zero at start; one row per output neuron that M touches. `r` (run config
  `lora-rank`) sets the trainable count: rows x r, e.g. r = k gives plain TaskEdge's count at k
  entries per row, over a support M that can be several times larger.

Why this formulation (and not LoRA on B and A, or M ⊙ (B A) with both trained):

* Exact federated aggregation. The update is linear in B for a fixed (M, A), so the clients'
  FedAvg mean of B gives exactly the mean of their effective updates:
      Σ_c w_c M ⊙ (B_c A) / Σ_c w_c = M ⊙ ((Σ_c w_c B_c / Σ_c w_c) A).
  Training A as well would make the product of the means differ from the mean of the products
  (the known LoRA-averaging error). This is FFA-LoRA's observation, restricted to TaskEdge's mask.
  The wire carries a fixed-length vector (all B's, modules in sorted order) plus the dense head,
  so stock FedAvg, FedAvgM and Flower's DP wrappers apply unchanged.
* Mergeable, and N:M-safe. dW lives on M, so merging writes only masked entries: with N:M on
  (M ⊆ the keep set) the merged weight keeps the N:M pattern and can run on sparse tensor cores.
  A dense B A on whole rows (FFA-LoRA on the top rows) would break the pattern.
* No dense weight gradient. The masked entries' values v = (B A)[M] feed the existing sparse-delta
  autograd functions (`common.taskedge.sparse_ops`), which give dL/dv for the masked entries only; the
  gradient of B is then dB[i] = Σ_{e in row i} dL/dv_e · A[:, col(e)] (`MaskedLowRankFn`, O(E·r)).
  No (out x in) tensor is formed, nothing weight-sized is saved, optimizer state is rows x r.

Plain TaskEdge is the special case in which every masked entry has its own parameter; with
r >= the entries of a row, that row's update is unconstrained (the two coincide up to
parametrisation). The low-rank constraint bites when M has more entries per row than r.

    model, mask = get_taskedge_lora_model(model, TaskEdgeLoRAConfig(budget=0.05, r=2), calib_batches)
    ... train [p for p in model.parameters() if p.requires_grad] (lora_B + head) ...
    plain = merge_and_unload(model)   # common.taskedge.tuner: W0 + M ⊙ (B A) folded in
"""
from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .allocation import Mask
from .config import TaskEdgeConfig
from .layers import SparseDeltaConv2d, SparseDeltaLayer, SparseDeltaLinear
from .tuner import apply_mask, apply_nm, build_mask, calibrate, delta_layers, find_head, mark_trainable, set_module

LORA_PACKED = "lora_B"
_CHUNK = 1 << 20  # entries x rank per temporary


@dataclass
class TaskEdgeLoRAConfig(TaskEdgeConfig):
    """TaskEdgeConfig (the mask M: budget, score, allocation, nm, ...) plus the rank r of B.

    seed (inherited) also seeds the frozen A.
    """

    r: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be an integer >= 1, got {self.r!r}")


def frozen_a(name: str, r: int, width: int, seed: int = 0) -> torch.Tensor:
    """The frozen A (r x width, float32) of module `name`: uniform in ±sqrt(3/r) (unit-variance
    columns in expectation), from a splitmix64 counter hash of (seed, name, position). Bit-identical
    on every platform and numpy/torch version: nothing here depends on a library's random stream."""
    key = (int(seed) & 0xFFFFFFFF) << 32 | zlib.crc32(name.encode())
    z = np.arange(r * width, dtype=np.uint64) + np.uint64(key)
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53  # [0, 1)
    return torch.from_numpy(((2.0 * u - 1.0) * np.sqrt(3.0 / r)).astype(np.float32).reshape(r, width))


class MaskedLowRankFn(torch.autograd.Function):
    """v[e] = Σ_r B[brow[e], r] · At[acol[e], r]: the masked entries of B·A, never B·A itself.

    Backward: dB[i] = Σ_{e: brow[e]=i} dv[e] · At[acol[e]] (At is frozen: no gradient). Chunked over
    entries so temporaries stay small; saves only At and the index vectors (buffers of the layer).
    """

    @staticmethod
    def forward(ctx, b, at, brow, acol):
        e, r = brow.numel(), b.shape[1]
        out = torch.empty(e, dtype=b.dtype, device=b.device)
        step = max(1, _CHUNK // max(1, r))
        at = at.to(b.dtype)
        for s in range(0, e, step):
            out[s:s + step] = (b.index_select(0, brow[s:s + step]) * at.index_select(0, acol[s:s + step])).sum(1)
        ctx.save_for_backward(at, brow, acol)
        ctx.b_shape = b.shape
        return out

    @staticmethod
    def backward(ctx, dv):
        at, brow, acol = ctx.saved_tensors
        db = torch.zeros(ctx.b_shape, dtype=dv.dtype, device=dv.device)
        step = max(1, _CHUNK // max(1, ctx.b_shape[1]))
        for s in range(0, brow.numel(), step):
            db.index_add_(0, brow[s:s + step], dv[s:s + step, None] * at.index_select(0, acol[s:s + step]).to(dv.dtype))
        return db, None, None, None


class TaskEdgeLoRALayer(SparseDeltaLayer):
    """Mixin over a sparse-delta wrapper: `values` are derived from (B, A) instead of being trained."""

    TRAINABLE = ("lora_B",)

    def _init_values(self, n: int, dtype: torch.dtype, device) -> None:
        pass  # `values` is the property below

    def _init_lora(self, r: int, a: torch.Tensor) -> None:
        w = self.base_layer.weight
        if tuple(a.shape) != (r, self.width):
            raise ValueError(f"A must have shape ({r}, {self.width}), got {tuple(a.shape)}")
        urows, brow = torch.unique(self.flat_idx // self.width, return_inverse=True)
        self.register_buffer("lora_rows", urows, persistent=False)  # output neurons B has a row for
        self.register_buffer("lora_brow", brow.reshape(-1), persistent=False)
        self.register_buffer("lora_acol", self.flat_idx % self.width, persistent=False)
        self.register_buffer("lora_At", a.t().contiguous().to(w.device, torch.float32), persistent=False)
        self.lora_B = nn.Parameter(torch.zeros(urows.numel(), r, dtype=w.dtype, device=w.device))
        self.r = r

    @property
    def lora_A(self) -> torch.Tensor:
        return self.lora_At.t()

    @property
    def values(self) -> torch.Tensor:
        """The masked entries of B·A in mask order (differentiable w.r.t. B)."""
        return MaskedLowRankFn.apply(self.lora_B, self.lora_At, self.lora_brow, self.lora_acol)

    def extra_repr(self) -> str:
        return f"r={self.r}, rows={self.lora_rows.numel()}, entries={self.flat_idx.numel()}"


class TaskEdgeLoRALinear(TaskEdgeLoRALayer, SparseDeltaLinear):
    def __init__(self, base: nn.Linear, flat_idx: torch.Tensor, r: int, a: torch.Tensor, save_dtype: str = "float32"):
        SparseDeltaLinear.__init__(self, base, flat_idx, save_dtype)
        self._init_lora(r, a)


class TaskEdgeLoRAConv2d(TaskEdgeLoRALayer, SparseDeltaConv2d):
    def __init__(self, base: nn.Conv2d, flat_idx: torch.Tensor, r: int, a: torch.Tensor, save_dtype: str = "float32",
                 dense_grad: bool = False):
        SparseDeltaConv2d.__init__(self, base, flat_idx, save_dtype, dense_grad)
        self._init_lora(r, a)


def lora_layers(model: nn.Module) -> dict[str, TaskEdgeLoRALayer]:
    return {n: m for n, m in delta_layers(model).items() if isinstance(m, TaskEdgeLoRALayer)}


def apply_lora_mask(model: nn.Module, mask: Mask, config: TaskEdgeLoRAConfig) -> nn.Module:
    """The injector: every masked module becomes a TaskEdge-LoRA wrapper; only lora_B and the head train.

    Validation (module names, types, mask shapes) is `tuner.apply_mask`'s, done before anything is
    swapped; the sparse-delta wrappers it makes are then replaced by their low-rank versions.
    """
    apply_mask(model, mask, config)
    for name, layer in delta_layers(model).items():
        if isinstance(layer, TaskEdgeLoRALayer):
            continue
        a = frozen_a(name, config.r, layer.width, config.seed)
        if isinstance(layer, SparseDeltaLinear):
            new = TaskEdgeLoRALinear(layer.base_layer, layer.flat_idx, config.r, a, config.save_dtype)
        else:
            new = TaskEdgeLoRAConv2d(layer.base_layer, layer.flat_idx, config.r, a, config.save_dtype,
                                     layer.dense_grad)
        set_module(model, name, new)
    mark_trainable(model, find_head(model, config.head))
    return model


def get_taskedge_lora_model(model: nn.Module, config: TaskEdgeLoRAConfig,
                            calib_batches: Iterable) -> tuple[nn.Module, Mask]:
    """Centralised path: calibrate, allocate the mask M, (N:M-prune the base), wrap."""
    norms, grads = calibrate(model, config, calib_batches)
    mask = build_mask(model, config, norms, grads)
    apply_nm(model, config, norms)
    return apply_lora_mask(model, mask, config), mask


def effective_deltas(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per wrapped module, the dense dW = M ⊙ (B A) (what merging adds)."""
    return {n: layer.get_delta_weight() for n, layer in delta_layers(model).items()}


def mask_rows(mask: Mask) -> dict[str, torch.Tensor]:
    """Per module, the sorted output neurons that the mask touches (the rows of B)."""
    return {n: torch.unique(mask.indices[n] // mask.shapes[n][1]) for n in mask.names()}
