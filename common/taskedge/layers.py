"""Layer wrappers: a frozen base layer plus a sparse trainable delta (peft-style shape).

Each wrapper keeps the original module as `base_layer` (frozen), the mask as buffers, and the
trainable vector `values` (one entry per masked weight, in mask order). `get_delta_weight`
gives the dense delta, `merge` returns a plain layer with the delta folded in.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .sparse_ops import SparseDeltaConv2dFn, SparseDeltaLinearFn, lead_entries


class SparseDeltaLayer(nn.Module):
    """Common part: mask bookkeeping, delta weight, merge."""

    base_layer: nn.Module
    TRAINABLE: tuple[str, ...] = ("values",)  # the parameters this wrapper trains (common.taskedge.lora: "lora_B")

    def __init__(self, base: nn.Module, flat_idx: torch.Tensor, save_dtype: str = "float32"):
        super().__init__()
        rows = base.weight.shape[0]
        width = base.weight[0].numel()
        flat_idx = torch.as_tensor(flat_idx, dtype=torch.long).reshape(-1)
        if flat_idx.numel() and (flat_idx.min() < 0 or flat_idx.max() >= rows * width):
            raise ValueError(f"mask indices must lie in [0, {rows * width}) for a weight of {tuple(base.weight.shape)}")
        if flat_idx.numel() > 1 and bool((flat_idx[1:] <= flat_idx[:-1]).any()):
            raise ValueError("mask indices must be strictly increasing (canonical mask order)")
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        dev = base.weight.device
        self.register_buffer("flat_idx", flat_idx.to(dev), persistent=False)
        self._init_values(flat_idx.numel(), base.weight.dtype, dev)
        self.save_dtype = save_dtype
        self.width = width

    def _init_values(self, n: int, dtype: torch.dtype, device) -> None:
        """The trainable `values` (one per masked entry); common.taskedge.lora derives them from a factor instead."""
        self.values = nn.Parameter(torch.zeros(n, dtype=dtype, device=device))

    @property
    def weight(self) -> torch.Tensor:  # read-only view for code that inspects .weight
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def get_delta_weight(self) -> torch.Tensor:
        w = self.base_layer.weight
        delta = torch.zeros(w.numel(), dtype=w.dtype, device=w.device)
        delta.index_add_(0, self.flat_idx, self.values.detach().to(w.dtype))
        return delta.view_as(w)

    def merge(self) -> nn.Module:
        """A plain copy of the base layer with the delta folded into its weight."""
        layer = copy.deepcopy(self.base_layer)
        with torch.no_grad():
            layer.weight.add_(self.get_delta_weight())
        return layer


class SparseDeltaLinear(SparseDeltaLayer):
    def __init__(self, base: nn.Linear, flat_idx: torch.Tensor, save_dtype: str = "float32"):
        super().__init__(base, flat_idx, save_dtype)
        rows = (self.flat_idx // self.width)
        cols = (self.flat_idx % self.width)
        ucols, inv = torch.unique(cols, return_inverse=True)
        lead, rest = lead_entries(rows, base.out_features)  # value-gradient plan (sparse_ops.linear_value_grad)
        self.register_buffer("ucols", ucols, persistent=False)
        self.register_buffer("inv", inv, persistent=False)
        self.register_buffer("lead", lead, persistent=False)
        self.register_buffer("rest", rest, persistent=False)
        self.register_buffer("rest_rows", rows[rest], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.base_layer
        plan = (self.ucols, self.inv, self.lead, self.rest, self.rest_rows)
        return SparseDeltaLinearFn.apply(x, self.values, b.weight, b.bias, self.flat_idx, plan, self.save_dtype)


DENSE_GRAD_SHARE = 1 / 64  # conv_grad "auto": dense above this share of the weight (see dense_grad_pays)


def dense_grad_pays(base: nn.Conv2d, entries: int) -> bool:
    """Whether torch's dense weight gradient (then a gather of the E entries) is the cheaper value
    gradient: for an ungrouped conv whose mask holds more than DENSE_GRAD_SHARE of its weights.
    The sparse gather costs ~1.5-2 ns per (entry, output position, sample), the dense GEMM ~0.02 ns
    per multiply-accumulate (1 thread, this repository's CPU): ResNet-18's 7x7 stem at 64 px, 192
    entries = 2 % of the weight, 6.7 ms dense vs 10-13 ms sparse; its 3x3 64->64 convs, 192
    entries = 0.5 %, 6.2 ms dense vs 1.8 ms sparse. Grouped / depthwise convs stay sparse (their
    dense weight gradient is far slower than its multiply-accumulates suggest)."""
    return base.groups == 1 and entries > DENSE_GRAD_SHARE * base.weight.numel()


class SparseDeltaConv2d(SparseDeltaLayer):
    """dense_grad: True = the value gradient is gathered from torch's dense weight gradient, False =
    sparse offset sums, None = whichever ``dense_grad_pays`` says (resolved here to a bool)."""

    def __init__(self, base: nn.Conv2d, flat_idx: torch.Tensor, save_dtype: str = "float32",
                 dense_grad: bool | None = False):
        if base.padding_mode != "zeros":
            raise ValueError(f"SparseDeltaConv2d supports padding_mode='zeros' only, got {base.padding_mode!r}")
        super().__init__(base, flat_idx, save_dtype)
        out_c, cpg = base.out_channels, base.in_channels // base.groups
        kk = base.kernel_size[0] * base.kernel_size[1]
        o = self.flat_idx // self.width
        col = self.flat_idx % self.width
        ch = (o // (out_c // base.groups)) * cpg + col // kk
        uch, inv_ch = torch.unique(ch, return_inverse=True)
        self.register_buffer("ent_o", o, persistent=False)
        self.register_buffer("ent_uv", col % kk, persistent=False)
        self.register_buffer("uch", uch, persistent=False)
        self.register_buffer("inv_ch", inv_ch, persistent=False)
        self.dense_grad = dense_grad_pays(base, self.flat_idx.numel()) if dense_grad is None else bool(dense_grad)
        self.pad = tuple(base._reversed_padding_repeated_twice)
        # entry e belongs to output channel e (one entry per channel): the value gradient can use
        # dY as it is instead of gathering its channels
        self.o_ident = bool(o.numel() == out_c and torch.equal(o, torch.arange(out_c, device=o.device)))
        lead, rest = lead_entries(o, out_c)  # entries that use dY as it is (generalises o_ident)
        self.register_buffer("lead", lead, persistent=False)
        self.register_buffer("rest", rest, persistent=False)
        # gather indices of the value gradient, per input shape; public because they are memory the
        # layer keeps alive (benchmarks.profiling counts them)
        self.index_cache: dict = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.base_layer
        geom = (self.pad, b.stride, b.dilation, b.groups, self.uch, self.inv_ch, self.ent_o, self.ent_uv)
        return SparseDeltaConv2dFn.apply(x, self.values, b.weight, b.bias, self.flat_idx, geom,
                                         self.save_dtype, self.dense_grad, self.o_ident, self.index_cache,
                                         (self.lead, self.rest))
