"""FLOPs of one training step (forward + backward + optimizer), with torch's grouped-conv bug fixed.

Convention: torch's ``torch.utils.flop_counter.FlopCounterMode`` — 2 FLOPs per multiply-accumulate
of the registered ops (mm / addmm / bmm / convolution / convolution_backward / attention); bias
adds, normalisation, activations and other elementwise ops are not counted.

Two corrections on top of torch:

* **Grouped / depthwise conv weight gradient.** ``conv_backward_flop`` builds the weight-gradient
  conv from transposed shapes and drops ``groups``, so the weight gradient of a conv with
  ``groups = g`` is counted ``g`` times (a depthwise conv: ``C`` times; still so in torch 2.14,
  tests/test_flops.py pins it). ``corrected_conv_backward_flop`` counts the input gradient with
  torch's formula and divides torch's weight-gradient count by ``groups``; the result equals the
  analytic ``2 · N · C_out · H_out · W_out · (C_in / g) · k_h · k_w`` per requested gradient.
* **TaskEdge sparse-delta value gradient.** ``SparseDeltaLinearFn`` / ``SparseDeltaConv2dFn``
  (``common/taskedge/sparse_ops.py``) compute the gradient of the E trainable entries with gathers,
  an elementwise multiply and a sum — no op the counter sees, so torch counts 0 for it. The real
  work is one multiply and one add per (row, entry): ``2 · T · E`` with T = tokens (Linear) or
  ``N · H_out · W_out`` output positions (Conv2d, over the whole output grid, padding positions
  included — the kernel multiplies them and masks afterwards). We add that analytically from a
  forward hook on each layer (``sparse_value_grad_flops``). Its forward (one dense GEMM / conv on
  W0 + delta) and input gradient (one ``convolution_backward`` / mm) are ordinary aten ops and are
  counted by torch. With ``conv_grad="dense"`` the dense weight gradient is an aten op already
  counted (corrected), so nothing is added. Patching the E entries in and out of W0 (O(E) adds) is
  not counted, like any other elementwise op.

Optimizer: matmuls inside ``optimizer.step()`` (GaLore's projections) are counted by torch; the
elementwise AdamW update is added analytically as ``ADAMW_FLOPS_PER_ELEMENT`` per element of the
optimizer's ``exp_avg`` state (the trainable size for AdamW, the projected low-rank size for
GaLore). SVDs (GaLore's projector refresh) have no torch formula and are not counted.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, conv_backward_flop

aten = torch.ops.aten

# AdamW per element: weight decay (mul+sub: 2), exp_avg lerp (3), exp_avg_sq mul + addcmul (4),
# sqrt, divide by bias correction, add eps (3), divide and step (2) = 14
ADAMW_FLOPS_PER_ELEMENT = 14


def corrected_conv_backward_flop(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
                                 output_padding, groups, output_mask, out_shape=None, **kw) -> int:
    """torch's conv_backward_flop with the weight-gradient term divided by ``groups`` (see module doc)."""
    args = (grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed, output_padding, groups)
    total = 0
    if output_mask[0]:
        total += conv_backward_flop(*args, [True, False, False], out_val=out_shape)
    if output_mask[1]:
        wg = conv_backward_flop(*args, [False, True, False], out_val=out_shape)
        total += wg // groups
    return total


def flop_counter(display: bool = False) -> FlopCounterMode:
    """A FlopCounterMode whose convolution_backward formula is the corrected one."""
    return FlopCounterMode(display=display, custom_mapping={aten.convolution_backward: corrected_conv_backward_flop})


# --- analytic formulas (what the tests hold the counter to) -----------------------------------

def conv2d_flops(n: int, c_in: int, c_out: int, h_out: int, w_out: int, k_h: int, k_w: int, groups: int = 1) -> int:
    """2 · MACs of one Conv2d forward; the input gradient and the weight gradient cost the same each."""
    return 2 * n * c_out * h_out * w_out * (c_in // groups) * k_h * k_w


def linear_flops(tokens: int, d_in: int, d_out: int) -> int:
    """2 · MACs of one Linear forward (bias add not counted); input and weight gradients the same each."""
    return 2 * tokens * d_in * d_out


# --- TaskEdge sparse-delta value gradients ----------------------------------------------------

@contextmanager
def sparse_value_grad_flops(model: nn.Module):
    """Yield a one-element list that accumulates, per forward of every sparse-delta layer whose
    values require grad, the analytic cost ``2 · T · E`` of its value gradient (see module doc).
    Layers in dense conv-grad mode are skipped (their weight gradient is an aten op torch counts)."""
    from common.taskedge.layers import SparseDeltaConv2d, SparseDeltaLayer

    acc = [0]
    handles = []

    def hook(mod, _inp, out):
        vals = getattr(mod, "values", None)
        if vals is None or not torch.is_grad_enabled():
            return
        e = vals.numel()
        if isinstance(mod, SparseDeltaConv2d):
            if mod.dense_grad:
                return
            t = out.shape[0] * out.shape[2] * out.shape[3]
        else:
            t = out.numel() // out.shape[-1]
        if vals.requires_grad:
            acc[0] += 2 * t * e

    for m in model.modules():
        if isinstance(m, SparseDeltaLayer):
            handles.append(m.register_forward_hook(hook))
    try:
        yield acc
    finally:
        for h in handles:
            h.remove()


def _adam_state_elements(opt: torch.optim.Optimizer | None) -> int:
    if opt is None:
        return 0
    n = 0
    for st in opt.state.values():
        ea = st.get("exp_avg") if isinstance(st, dict) else None
        if torch.is_tensor(ea):
            n += ea.numel()
    return n


def step_flops(model: nn.Module, opt: torch.optim.Optimizer | None, x: torch.Tensor, y: torch.Tensor,
               floor: bool = False, loss_fn: Callable | None = None) -> dict[str, int]:
    """FLOPs of one training step by phase: forward, backward (incl. the analytic TaskEdge value
    gradient, reported also as ``sparse_value_grad``), optimizer (counted matmuls + analytic
    elementwise AdamW, the latter also as ``optimizer_elementwise``) and ``total``. Run it after a
    warm-up step so that the optimizer state exists (its size gives the elementwise count)."""
    loss_fn = loss_fn or F.cross_entropy
    if opt is not None:
        opt.zero_grad(set_to_none=True)
    if floor:
        x = x.detach().requires_grad_(True)
    with sparse_value_grad_flops(model) as sv, flop_counter() as fc:
        loss = loss_fn(model(x), y)
        fwd = fc.get_total_flops()
        loss.backward()
        bwd = fc.get_total_flops() - fwd
        if opt is not None:
            opt.step()
        opt_mm = fc.get_total_flops() - fwd - bwd
    elementwise = ADAMW_FLOPS_PER_ELEMENT * _adam_state_elements(opt)
    out = {"forward": int(fwd), "backward": int(bwd + sv[0]), "sparse_value_grad": int(sv[0]),
           "optimizer": int(opt_mm + elementwise), "optimizer_elementwise": int(elementwise)}
    out["total"] = out["forward"] + out["backward"] + out["optimizer"]
    return out
