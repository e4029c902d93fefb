"""Autograd functions for W_eff = W0 + scatter(idx, values) that never form a dense weight gradient.

Backward returns the gradient of `values` only,
    g[e] = sum_t dY[t, row(e)] * X[t, col(e)],
from the input columns the mask reads (saved, optionally in reduced precision), plus the
input gradient through W_eff. W0 is frozen and gets no gradient.

Cost model (what keeps this at the frozen-backbone floor):
  * forward and input gradient are ONE dense GEMM / conv each, run on W_eff = W0 + delta made
    by patching the E masked entries of W0 in place and restoring them bit-exactly afterwards
    (O(E) per call; no weight-sized copy, nothing weight-sized saved). That is the same kernel
    the floor runs. (A (tokens x entries) gather/scatter on top of the W0 GEMM was slower:
    index_add_ along dim 1 goes through scatter_add with an expanded int64 index on CPU.)
  * the value gradient is a gather-multiply-sum over (tokens x entries), chunked over tokens
    so the temporaries stay cache-sized; no (tokens x width) weight gradient is formed. Conv
    value gradients use one flat gather over all kernel offsets (indices cached per input
    shape on the layer), with padding handled by a mask instead of a padded copy.
  * only the input columns/channels the mask reads are saved (optionally in bf16); when the
    mask reads all of them the input itself is saved (no copy, shared with any other op that
    saves it).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

_CHUNK = 1 << 18  # elements per temporary (tokens x entries) product; ~1 MiB in float32


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


@contextmanager
def _effective_weight(weight: torch.Tensor, flat_idx: torch.Tensor, values: torch.Tensor):
    """W_eff = W0 + scatter(values) for the duration of the block, without a weight-sized copy.

    The E masked entries of the frozen W0 are patched in place and restored bit-exactly from
    a saved copy of those E entries afterwards (also on error), so the cost is O(E) instead
    of a weight-sized clone per call. The result equals weight.index_add(values) exactly
    (flat indices are unique). W0 must not be saved for backward by anything else (a version
    counter check would fire); the functions below keep it on ctx instead of saving it. A
    non-contiguous weight falls back to an out-of-place W_eff.
    """
    if flat_idx.numel() == 0:  # a wrapped layer that got no entries: W_eff is W0
        yield weight
        return
    v = values.detach().to(weight.dtype)
    if not weight.is_contiguous():
        yield weight.reshape(-1).index_add(0, flat_idx, v).view_as(weight)
        return
    with torch.no_grad():
        flat = weight.detach().view(-1)
        orig = flat.index_select(0, flat_idx)
        flat.index_add_(0, flat_idx, v)
    try:
        yield weight.detach()
    finally:
        with torch.no_grad():
            flat.index_copy_(0, flat_idx, orig)


def _keep(x: torch.Tensor, dim: int, idx: torch.Tensor, full: bool, save_dtype: str) -> torch.Tensor:
    """The slices of x the value gradient reads, in the save dtype (x itself when all are read)."""
    kept = x if full else x.index_select(dim, idx)
    return kept.to(_dtype(save_dtype))


def _rowwise_dot(a: torch.Tensor, a_idx: torch.Tensor, b: torch.Tensor, b_idx: torch.Tensor) -> torch.Tensor:
    """out[e] = sum_t a[t, a_idx[e]] * b[t, b_idx[e]] (float32), chunked over t to bound memory."""
    t, e = a.shape[0], a_idx.numel()
    if t == 0 or e == 0:
        return torch.zeros(e, dtype=torch.float32, device=a.device)
    a = a.float() if a.dtype != torch.float32 else a
    b = b.float() if b.dtype != torch.float32 else b  # a bf16 gather is slower than the up-front cast
    step = max(1, _CHUNK // e)
    out = None
    for s in range(0, t, step):
        aa = a[s:s + step].index_select(1, a_idx)
        part = aa.mul_(b[s:s + step].index_select(1, b_idx)).sum(0)  # in place: one temporary less
        out = part if out is None else out.add_(part)
    return out


class SparseDeltaLinearFn(torch.autograd.Function):
    """y = x W_eff^T + b with W_eff = W0 + scatter(values), built on the fly (never saved)."""

    @staticmethod
    def forward(ctx, x, values, weight, bias, flat_idx, rows, ucols, inv, save_dtype: str):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        with _effective_weight(weight, flat_idx, values) as w_eff:
            y = F.linear(x2, w_eff, bias)
        full = ucols.numel() == shape[-1]  # then ucols == arange(in) and inv == cols
        ctx.save_for_backward(_keep(x2, 1, ucols, full, save_dtype), values, flat_idx, rows, inv)
        ctx.weight, ctx.in_shape = weight, shape  # frozen parameter: not saved (see _effective_weight)
        return y.reshape(*shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        xu, values, flat_idx, rows, inv = ctx.saved_tensors
        weight = ctx.weight
        dy2 = dy.reshape(-1, weight.shape[0])
        dx = dv = None
        if ctx.needs_input_grad[0]:
            with _effective_weight(weight, flat_idx, values) as w_eff:
                dx = (dy2 @ w_eff.to(dy2.dtype)).reshape(ctx.in_shape)
        if ctx.needs_input_grad[1]:
            dv = _rowwise_dot(dy2, rows, xu, inv).to(values.dtype)
        return dx, dv, None, None, None, None, None, None, None


class SparseDeltaConv2dFn(torch.autograd.Function):
    """Conv2d with W_eff = W0 + scatter(values); value gradients from shifted input views.

    Symmetric padding goes straight to the convolution; asymmetric padding ('same' with an even
    kernel) is applied explicitly. Only the input channels that some trainable entry reads are
    saved (unpadded). With dense=True the value gradient is gathered from torch's dense conv
    weight gradient instead (the input is saved whole).
    """

    @staticmethod
    def forward(ctx, x, values, weight, bias, flat_idx, geom, save_dtype: str, dense: bool,
                o_ident: bool = False, cache: dict | None = None):
        pad, stride, dilation, groups, uch, inv_ch, ent_o, ent_uv = geom
        l, r, t, b = pad
        with _effective_weight(weight, flat_idx, values) as w_eff:
            if l == r and t == b:
                y = F.conv2d(x, w_eff, bias, stride, (t, l), dilation, groups)
            else:
                y = F.conv2d(F.pad(x, pad), w_eff, bias, stride, 0, dilation, groups)
        full = dense or uch.numel() == x.shape[1]
        ctx.save_for_backward(_keep(x, 1, uch, full, save_dtype), values, flat_idx)
        ctx.weight = weight  # frozen parameter: not saved (see _effective_weight)
        ctx.geom, ctx.dense, ctx.full, ctx.xshape = geom, dense, full, x.shape
        ctx.o_ident, ctx.cache = o_ident, cache
        return y

    @staticmethod
    def backward(ctx, dy):
        keep, values, flat_idx = ctx.saved_tensors
        weight = ctx.weight
        pad, stride, dilation, groups, uch, inv_ch, ent_o, ent_uv = ctx.geom
        l, r, t, b = pad
        sym = l == r and t == b
        need_x, need_v = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dense_v = need_v and ctx.dense
        dx = dv = None
        if need_x or dense_v:
            # one aten call: the input gradient through W_eff and/or the dense weight gradient
            n, c, h, w = ctx.xshape
            if dense_v:
                xin = keep.to(dy.dtype)
                xin = xin if sym else F.pad(xin, pad)
            else:  # only the shape matters (as in torch.nn.grad.conv2d_input)
                xin = dy.new_empty(1).expand((n, c, h, w) if sym else (n, c, h + t + b, w + l + r))
            sel = (flat_idx, values) if need_x else (flat_idx[:0], values[:0])  # dense grad: shape only
            with _effective_weight(weight, *sel) as w_eff:
                gx, gw, _ = torch.ops.aten.convolution_backward(
                    dy, xin, w_eff.to(dy.dtype), None, stride, (t, l) if sym else (0, 0), dilation, False, (0, 0),
                    groups, (need_x, dense_v, False))
            if need_x:
                dx = gx if sym else gx[:, :, t: t + h, l: l + w]
            if dense_v:
                dv = gw.reshape(-1).index_select(0, flat_idx).to(values.dtype)
        if need_v and not ctx.dense:
            ch = inv_ch if not ctx.full else uch[inv_ch]
            dv = conv_value_grad(keep, dy, weight.shape, pad, stride, dilation, ch, ent_o, ent_uv,
                                 ctx.o_ident, ctx.cache).to(values.dtype)
        return dx, dv, None, None, None, None, None, None, None, None


def _conv_gather_index(xshape, wshape, pad, stride, dilation, ch, ent_uv, ho, wo, cache):
    """Flat index into one sample of the saved (unpadded) input for every (entry, output position),
    and a validity mask (None when no position falls into the zero padding). Cached per shape."""
    key = (tuple(xshape[1:]), ho, wo, ch.device)
    if cache is not None and key in cache:
        return cache[key]
    _, _, h, w = xshape
    kw = wshape[3]
    l, _, t, _ = pad
    (sh, sw), (dh, dw) = stride, dilation
    dev = ch.device
    u, v = ent_uv // kw, ent_uv % kw
    hi = (torch.arange(ho, device=dev) * sh).reshape(1, -1) + (u * dh - t).reshape(-1, 1)  # (E, ho)
    wi = (torch.arange(wo, device=dev) * sw).reshape(1, -1) + (v * dw - l).reshape(-1, 1)  # (E, wo)
    vh, vw = (hi >= 0) & (hi < h), (wi >= 0) & (wi < w)
    idx = (ch.reshape(-1, 1, 1) * (h * w) + hi.clamp(0, h - 1).unsqueeze(2) * w
           + wi.clamp(0, w - 1).unsqueeze(1)).reshape(ch.numel(), ho * wo)
    valid = (vh.unsqueeze(2) & vw.unsqueeze(1)).reshape(ch.numel(), ho * wo)
    out = (idx.reshape(-1), None if bool(valid.all()) else valid)
    if cache is not None:
        cache[key] = out
    return out


def conv_value_grad(xs, dy, wshape, pad, stride, dilation, ch, ent_o, ent_uv, o_ident=False, cache=None):
    """g[e] = sum_{n,h,w} dY[n, o_e, h, w] * Xpad[n, c_e, h*s + u_e*d, w*s + v_e*d].

    xs holds the saved (unpadded) input channels; `ch` indexes them per entry. All kernel
    offsets are handled by one flat gather (no per-offset loop, no padded copy: positions in
    the zero padding are masked out after the batch sum); a 1x1 / stride-1 / unpadded conv is
    the Linear case on channel rows and gathers whole rows. With o_ident (entry e belongs to
    output channel e) the output gradient is used as it is, without a gather.
    """
    n_b, o_c, ho, wo = dy.shape
    e = ent_o.numel()
    if e == 0 or n_b == 0:
        return torch.zeros(e, dtype=torch.float32, device=dy.device)
    p = ho * wo
    dyf = dy.reshape(n_b, o_c, p).float()
    pointwise = wshape[2] == wshape[3] == 1 and tuple(stride) == (1, 1) and not any(pad)
    xs = xs.float() if xs.dtype != torch.float32 else xs  # cast once (bf16 gathers are slow)
    if pointwise:
        xf, idx, valid = xs.reshape(n_b, xs.shape[1], p), ch, None
    else:
        idx, valid = _conv_gather_index(xs.shape, wshape, pad, stride, dilation, ch, ent_uv, ho, wo, cache)
        xf = xs.reshape(n_b, -1)
    n_per = max(1, _CHUNK // (e * p))
    acc = None
    for s in range(0, n_b, n_per):
        bb = xf[s:s + n_per].index_select(1, idx).reshape(-1, e, p)  # (n, E, P)
        a = dyf[s:s + n_per] if o_ident else dyf[s:s + n_per].index_select(1, ent_o)
        part = bb.mul_(a).sum(0)  # (E, P)
        acc = part if acc is None else acc.add_(part)
    if valid is not None:
        acc.mul_(valid)
    return acc.sum(1)
