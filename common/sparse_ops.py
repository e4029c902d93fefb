"""Autograd functions for W_eff = W0 + scatter(idx, values) that never form a dense weight gradient.

Backward returns the gradient of `values` only,
    g[e] = sum_t dY[t, row(e)] * X[t, col(e)],
from the input columns the mask reads (saved, optionally in reduced precision), plus the
input gradient through W_eff. W0 is frozen and gets no gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_input, conv2d_weight

_CHUNK = 1 << 22  # elements per temporary (tokens x entries) product


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _rowwise_dot(a: torch.Tensor, a_idx: torch.Tensor, b: torch.Tensor, b_idx: torch.Tensor) -> torch.Tensor:
    """out[e] = sum_t a[t, a_idx[e]] * b[t, b_idx[e]], chunked over t to bound memory."""
    t, e = a.shape[0], a_idx.numel()
    out = torch.zeros(e, dtype=torch.float32, device=a.device)
    step = max(1, _CHUNK // max(e, 1))
    for s in range(0, t, step):
        aa = a[s:s + step].index_select(1, a_idx).float()
        bb = b[s:s + step].index_select(1, b_idx).float()
        out += (aa * bb).sum(0)
    return out


class SparseDeltaLinearFn(torch.autograd.Function):
    """y = x W0^T + b + sparse(values) applied as a gather/index_add (no W_eff is materialised)."""

    @staticmethod
    def forward(ctx, x, values, weight, bias, rows, cols, ucols, inv, save_dtype: str):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        y = F.linear(x2, weight, bias)
        xu = x2.index_select(1, ucols)  # only the columns the mask reads
        y.index_add_(1, rows, xu.index_select(1, inv) * values.to(x2.dtype))
        ctx.save_for_backward(xu.to(_dtype(save_dtype)), values, weight, rows, cols, inv)
        ctx.in_shape = shape
        return y.reshape(*shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        xu, values, weight, rows, cols, inv = ctx.saved_tensors
        dy2 = dy.reshape(-1, weight.shape[0])
        dx = dv = None
        if ctx.needs_input_grad[0]:
            dx = dy2 @ weight.to(dy2.dtype)
            dx.index_add_(1, cols, dy2.index_select(1, rows) * values.to(dy2.dtype))
            dx = dx.reshape(ctx.in_shape)
        if ctx.needs_input_grad[1]:
            dv = _rowwise_dot(dy2, rows, xu, inv).to(values.dtype)
        return dx, dv, None, None, None, None, None, None, None


class SparseDeltaConv2dFn(torch.autograd.Function):
    """Conv2d with W_eff = W0 + scatter(values); value gradients from shifted input views.

    The input is padded explicitly (handles 'same' and asymmetric padding). Only the input
    channels that some trainable entry reads are saved. With dense=True the value gradient is
    gathered from torch's dense conv weight gradient instead (cheaper for depthwise convs).
    """

    @staticmethod
    def forward(ctx, x, values, weight, bias, flat_idx, geom, save_dtype: str, dense: bool):
        pad, stride, dilation, groups, uch, inv_ch, ent_o, ent_uv = geom
        w_eff = weight.flatten().index_add(0, flat_idx, values.to(weight.dtype)).view_as(weight)
        xp = F.pad(x, pad) if any(pad) else x
        y = F.conv2d(xp, w_eff, bias, stride, 0, dilation, groups)
        keep = xp if dense else xp.index_select(1, uch)
        ctx.save_for_backward(keep.to(_dtype(save_dtype)), values, weight, flat_idx)
        ctx.geom, ctx.dense, ctx.xshape, ctx.xpshape, ctx.xdtype = geom, dense, x.shape, xp.shape, x.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        keep, values, weight, flat_idx = ctx.saved_tensors
        pad, stride, dilation, groups, uch, inv_ch, ent_o, ent_uv = ctx.geom
        dx = dv = None
        if ctx.needs_input_grad[0]:
            w_eff = weight.flatten().index_add(0, flat_idx, values.to(weight.dtype)).view_as(weight)
            dxp = conv2d_input(ctx.xpshape, w_eff.to(dy.dtype), dy, stride, 0, dilation, groups)
            if any(pad):
                l, r, t, b = pad
                dxp = dxp[:, :, t: dxp.shape[2] - b, l: dxp.shape[3] - r]
            dx = dxp
        if ctx.needs_input_grad[1]:
            if ctx.dense:
                gw = conv2d_weight(keep.to(dy.dtype), weight.shape, dy, stride, 0, dilation, groups)
                dv = gw.flatten().index_select(0, flat_idx).to(values.dtype)
            else:
                dv = _conv_value_grad(keep, dy, weight.shape, stride, dilation, inv_ch, ent_o, ent_uv).to(values.dtype)
        return dx, dv, None, None, None, None, None, None


def _conv_value_grad(xs, dy, wshape, stride, dilation, inv_ch, ent_o, ent_uv):
    """g[e] = sum_{n,h,w} dY[n, o_e, h, w] * Xpad[n, c_e, h*s + u_e*d, w*s + v_e*d]."""
    kh, kw = wshape[2], wshape[3]
    (sh, sw), (dh, dw) = stride, dilation
    ho, wo = dy.shape[2], dy.shape[3]
    out = torch.zeros(ent_o.numel(), dtype=torch.float32, device=dy.device)
    for uv in torch.unique(ent_uv).tolist():
        u, v = divmod(uv, kw)
        sel = (ent_uv == uv).nonzero().reshape(-1)
        view = xs[:, :, u * dh: u * dh + sh * (ho - 1) + 1: sh, v * dw: v * dw + sw * (wo - 1) + 1: sw]
        o_sel, c_sel = ent_o[sel], inv_ch[sel]
        n_per = max(1, _CHUNK // max(sel.numel() * ho * wo, 1))
        acc = torch.zeros(sel.numel(), dtype=torch.float32, device=dy.device)
        for s in range(0, dy.shape[0], n_per):
            a = dy[s:s + n_per].index_select(1, o_sel).float()
            b = view[s:s + n_per].index_select(1, c_sel).float()
            acc += (a * b).sum((0, 2, 3))
        out[sel] = acc
    return out
