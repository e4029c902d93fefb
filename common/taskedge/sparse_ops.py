"""Autograd functions for W_eff = W0 + scatter(idx, values) that never form a dense weight gradient.

(About 500 lines, kept in one file on purpose: the Linear and Conv2d functions share the W0 patching, the
lead-entry layout and the chunked gather, and splitting them would spread one cost model over files.)

Backward returns the gradient of `values` only,
    g[e] = sum_t dY[t, row(e)] * X[t, col(e)],
from the input columns the mask reads, plus the input gradient through W_eff. W0 is frozen and
gets no gradient.

Cost model (what keeps this at the frozen-backbone floor):
  * forward and input gradient are ONE dense GEMM / conv each, run on W_eff = W0 + delta made
    by patching the E masked entries of W0 in place and restoring them bit-exactly afterwards
    (O(E) per call; no weight-sized copy, nothing weight-sized saved). That is the same kernel
    the floor runs. (A (tokens x entries) gather/scatter on top of the W0 GEMM was slower:
    index_add_ along dim 1 goes through scatter_add with an expanded int64 index on CPU.)
  * the value gradient is a gather-multiply-sum over (tokens x entries), chunked over tokens
    so the temporaries stay cache-sized; no (tokens x width) weight gradient is formed. The
    first K entries of every row (output channel), K = the fewest any row has, multiply dY as it
    is; only the other entries gather dY's columns. Conv value gradients use one flat gather over
    all kernel offsets (indices cached per input shape on the layer), with padding handled by a
    mask instead of a padded copy.
  * nothing beyond the floor is saved where autograd already keeps the input: when the graph
    saves x's storage (ReLU's result, attention's output) x itself is saved; after LayerNorm /
    GELU / SiLU the kept columns are recomputed in backward from what that op saves. Otherwise
    only the input columns/channels the mask reads are saved (optionally in bf16), or the input
    itself when the mask reads all of them. (The floor's Linear saves no input; its Conv2d saves
    the whole input.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_CHUNK = 1 << 20  # elements per temporary (tokens x entries) product; 4 MiB in float32 (1 MiB was slower)
GATHER = "gather"  # how _cols gathers columns: "gather" (parallel over threads) or "index_select" (serial)


def _cols(a: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """a.index_select(1, idx) (a new contiguous tensor). torch.gather with a broadcast (stride-0)
    index runs on all intra-op threads; index_select along dim 1 is a serial loop on CPU."""
    if GATHER == "gather" and a.shape[0] > 1:
        shape = (1, idx.numel()) + (1,) * (a.dim() - 2)
        return torch.gather(a, 1, idx.view(shape).expand(a.shape[0], idx.numel(), *a.shape[2:]))
    return a.index_select(1, idx)


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _patch(weight: torch.Tensor, flat_idx: torch.Tensor, values: torch.Tensor):
    """(W_eff, undo): W_eff = W0 + scatter(values) without a weight-sized copy; ``_restore(undo)``
    puts W0 back.

    The E masked entries of the frozen W0 are patched in place (through a detached alias: no
    autograd bookkeeping) and restored bit-exactly from a saved copy of those E entries, so the
    cost is O(E) instead of a weight-sized clone per call. The result equals
    weight.index_add(values) exactly (flat indices are unique). W0 must not be saved for backward
    by anything else (a version counter check would fire); the functions below keep it on ctx
    instead of saving it. A non-contiguous weight gets an out-of-place W_eff.
    """
    if flat_idx.numel() == 0:  # a wrapped layer that got no entries: W_eff is W0
        return weight.detach(), None
    v = values.detach()
    if v.dtype != weight.dtype:
        v = v.to(weight.dtype)
    w = weight.detach()
    if not w.is_contiguous():
        return w.reshape(-1).index_add(0, flat_idx, v).view_as(w), None
    flat = w.view(-1)
    orig = flat.index_select(0, flat_idx)
    flat.index_add_(0, flat_idx, v)
    return w, (flat, flat_idx, orig)


def _restore(undo) -> None:
    if undo is not None:
        flat, flat_idx, orig = undo
        flat.index_copy_(0, flat_idx, orig)


def _in_save_dtype(x: torch.Tensor, save_dtype: str) -> torch.Tensor:
    """x as saved for the value gradient: itself, or a copy in the reduced save dtype."""
    return x.to(_dtype(save_dtype))


# --- getting the input back in backward without a copy ------------------------------------------
#
# The floor (frozen backbone) saves no Linear input: the input gradient needs only the weight. The
# value gradient needs the input columns the mask reads. Often autograd keeps them alive anyway:
#   * "alias":  x's storage is saved by the op that made x or by a view chain above it (ReLU saves
#               its result, CPU flash attention its output, of which ViT's proj input is a view):
#               saving x itself costs nothing;
#   * "ln":     x = layer_norm(h) over the last dim: LayerNorm saves h, mean, rstd (and its affine
#               parameters), so the columns are recomputed from those, O(tokens x kept columns);
#   * "unary":  x = gelu(h) / silu(h): the op saves h; the columns are recomputed elementwise.
# The recomputed columns equal the forward's up to float rounding of the recomputation (a few ulp),
# in float32 whatever the save dtype. Anything else saves the kept columns ("cols") or, when the mask
# reads them all, x itself ("full").

_SAVED_NAMES: dict[type, tuple[str, ...]] = {}
_UNARY = {"GeluBackward0": "gelu", "SiluBackward0": "silu"}


def _saved_tensors_of(fn) -> list[torch.Tensor]:
    names = _SAVED_NAMES.get(type(fn))
    if names is None:
        names = _SAVED_NAMES[type(fn)] = tuple(a for a in dir(fn) if a.startswith("_saved_"))
    out = []
    for a in names:
        try:
            t = getattr(fn, a)
        except RuntimeError:  # already freed (retain_graph=False after a backward)
            continue
        if isinstance(t, torch.Tensor):
            out.append(t)
    return out


def _storage_ptr(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return 0


def _graph_keeps(x: torch.Tensor, depth: int = 4) -> bool:
    """True when a node on x's single-parent grad_fn chain (up to ``depth`` nodes) saves a tensor
    on x's storage: the graph keeps that memory alive until after this layer's backward anyway
    (ancestors run their backward later), so saving x as well adds nothing."""
    ptr = _storage_ptr(x)
    fn = x.grad_fn
    for _ in range(depth):
        if fn is None or not ptr:
            return False
        if any(_storage_ptr(t) == ptr for t in _saved_tensors_of(fn)):
            return True
        nxt = [f for f, _ in fn.next_functions if f is not None]
        fn = nxt[0] if len(nxt) == 1 else None
    return False


def _recompute_source(x: torch.Tensor):
    """("ln", tensors, None) / ("unary", (h,), name) when x's columns can be recomputed from what its
    producer saves (see above), else None. Only the exact producer output qualifies (same shape and
    dtype, output 0, normalisation over the last dim only)."""
    fn = x.grad_fn
    if fn is None or x.output_nr != 0:
        return None
    kind = type(fn).__name__
    try:
        if kind == "NativeLayerNormBackward0":
            if tuple(fn._saved_normalized_shape) != (x.shape[-1],):
                return None
            h, mean, rstd = fn._saved_input, fn._saved_result1, fn._saved_result2
            w, b = fn._saved_weight, fn._saved_bias
            if h.shape != x.shape or h.dtype != x.dtype or mean.dtype != x.dtype:
                return None
            return "ln", (h, mean, rstd, w, b), None
        if kind in _UNARY:
            h = fn._saved_self
            if kind == "GeluBackward0":
                name = "gelu-" + fn._saved_approximate
            else:
                name = _UNARY[kind]
            if h.shape != x.shape or h.dtype != x.dtype:
                return None
            return "unary", (h,), name
    except (AttributeError, RuntimeError):
        return None
    return None


def _columns(kind: str, tensors, fn_name, ucols: torch.Tensor) -> torch.Tensor:
    """The recomputed input columns ucols, (tokens x kept), float32 (see _recompute_source)."""
    if kind == "ln":
        h, mean, rstd, w, b = tensors
        c = h.shape[-1]
        xu = _cols(h.reshape(-1, c), ucols).float()
        xu = xu.sub_(mean.reshape(-1, 1)).mul_(rstd.reshape(-1, 1))
        if w is not None:
            xu.mul_(w.index_select(0, ucols))
        if b is not None:
            xu.add_(b.index_select(0, ucols))
        return xu
    (h,) = tensors
    xu = _cols(h.reshape(-1, h.shape[-1]), ucols).float()
    if fn_name.startswith("gelu-"):
        return F.gelu(xu, approximate=fn_name[5:])
    return F.silu(xu)


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
        aa = _cols(a[s:s + step], a_idx)
        part = aa.mul_(_cols(b[s:s + step], b_idx)).sum(0)  # in place: one temporary less
        out = part if out is None else out.add_(part)
    return out


def _lead_dot(a: torch.Tensor, b: torch.Tensor, b_idx: torch.Tensor) -> torch.Tensor:
    """out[r * K + j] = sum_t a[t, r] * b[t, b_idx[r * K + j]] for a (t x R), K = len(b_idx) / R:
    _rowwise_dot when entry (r, j) belongs to row r, without gathering a."""
    t, r = a.shape
    k = b_idx.numel() // max(1, r)
    if t == 0 or k == 0:
        return torch.zeros(k * r, dtype=torch.float32, device=a.device)
    a = a.float() if a.dtype != torch.float32 else a
    b = b.float() if b.dtype != torch.float32 else b
    step = max(1, _CHUNK // (k * r))
    out = None
    for s in range(0, t, step):
        bb = _cols(b[s:s + step], b_idx).view(-1, r, k)
        part = bb.mul_(a[s:s + step].unsqueeze(2)).sum(0)
        out = part if out is None else out.add_(part)
    return out.reshape(-1)


def linear_value_grad(dy: torch.Tensor, xs: torch.Tensor, colmap: torch.Tensor, lead: torch.Tensor,
                      rest: torch.Tensor, rest_rows: torch.Tensor) -> torch.Tensor:
    """g[e] = sum_t dy[t, row(e)] * xs[t, colmap[e]] (float32).

    ``lead`` (see lead_entries) holds the first K entries of every row, K = the fewest entries any
    row has: those multiply dy's columns in place, without a gather; ``rest`` is every other entry,
    ``rest_rows`` their rows (general gather). With no rest, lead is every entry in mask order."""
    if lead.numel() == 0:
        return _rowwise_dot(dy, rest_rows, xs, colmap)  # rest == all entries, in order
    if rest.numel() == 0:
        return _lead_dot(dy, xs, colmap)  # lead == all entries, in order
    g = torch.empty(lead.numel() + rest.numel(), dtype=torch.float32, device=dy.device)
    g.index_copy_(0, lead, _lead_dot(dy, xs, colmap.index_select(0, lead)))
    g.index_copy_(0, rest, _rowwise_dot(dy, rest_rows, xs, colmap.index_select(0, rest)))
    return g


def lead_entries(owner: torch.Tensor, n_owner: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lead, rest) positions for entries sorted by ``owner`` (row / output channel), see
    linear_value_grad: lead[o * K + j] = position of owner o's j-th entry for j < K, K = the fewest
    entries any owner has (no lead when an owner has none); rest = the other positions, ascending.
    Both ascending, so with exactly K entries per owner lead = arange(E) (mask order)."""
    counts = torch.bincount(owner, minlength=n_owner) if owner.numel() else torch.zeros(n_owner, dtype=torch.long)
    k = int(counts.min()) if n_owner else 0
    if k == 0:
        empty = torch.zeros(0, dtype=torch.long, device=owner.device)
        return empty, torch.arange(owner.numel(), device=owner.device)
    start = torch.cumsum(counts, 0) - counts  # first position of each owner (entries sorted by owner)
    lead = (start.unsqueeze(1) + torch.arange(k, device=owner.device).unsqueeze(0)).reshape(-1)
    is_lead = torch.zeros(owner.numel(), dtype=torch.bool, device=owner.device)
    is_lead[lead] = True
    return lead, (~is_lead).nonzero().reshape(-1)


def _input_source(x: torch.Tensor, x2: torch.Tensor, idx: torch.Tensor, save_dtype: str, recompute: bool):
    """(kind, tensors to save, detail) for the value gradient's input x (see the notes above):
    "alias" x itself (its storage is kept alive by the graph anyway), "ln"/"unary" recomputed
    columns, "full" x2 (x as (rows, columns) / (N, C, H, W)) or its save-dtype copy when the mask
    reads every column/channel, "cols" a copy of x2's kept columns/channels ``idx`` (dim 1)."""
    if _graph_keeps(x):
        return "alias", (x,), None
    if recompute:
        rc = _recompute_source(x)
        if rc is not None:
            return rc
    if idx.numel() == x2.shape[1]:
        return "full", (_in_save_dtype(x2, save_dtype),), None
    kept = _cols(x2, idx) if x2.dim() == 2 else x2.index_select(1, idx)  # conv: whole H x W planes
    return "cols", (_in_save_dtype(kept, save_dtype),), None


class SparseDeltaLinearFn(torch.autograd.Function):
    """y = x W_eff^T + b with W_eff = W0 + scatter(values), built on the fly (never saved).

    ``plan`` = (ucols, inv, lead, rest, rest_rows): the input columns the mask reads, each entry's
    position among them, and the lead / rest split of linear_value_grad (buffers of the layer)."""

    @staticmethod
    def forward(ctx, x, values, weight, bias, flat_idx, plan, save_dtype: str):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        w_eff, undo = _patch(weight, flat_idx, values)
        try:
            y = F.linear(x2, w_eff, bias)
        finally:
            _restore(undo)
        kind, src, detail = "none", (), None
        if ctx.needs_input_grad[1]:
            kind, src, detail = _input_source(x, x2, plan[0], save_dtype, True)
        ctx.save_for_backward(values, flat_idx, *src)
        ctx.kind, ctx.detail, ctx.plan = kind, detail, plan
        ctx.weight, ctx.in_shape = weight, shape  # frozen parameter: not saved (see _patch)
        return y.reshape(*shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        values, flat_idx, *src = ctx.saved_tensors
        weight = ctx.weight
        dy2 = dy.reshape(-1, weight.shape[0])
        dx = dv = None
        if ctx.needs_input_grad[0]:
            w_eff, undo = _patch(weight, flat_idx, values)
            try:
                dx = (dy2 @ w_eff.to(dy2.dtype)).reshape(ctx.in_shape)
            finally:
                _restore(undo)
        if ctx.needs_input_grad[1]:
            ucols, inv, lead, rest, rest_rows = ctx.plan
            kind = ctx.kind
            if kind in ("alias", "full"):
                xs, colmap = src[0].reshape(-1, ctx.in_shape[-1]), ucols.index_select(0, inv)
            elif kind == "cols":
                xs, colmap = src[0], inv
            else:
                xs, colmap = _columns(kind, src, ctx.detail, ucols), inv
            dv = linear_value_grad(dy2, xs, colmap, lead, rest, rest_rows).to(values.dtype)
        return dx, dv, None, None, None, None, None


class SparseDeltaConv2dFn(torch.autograd.Function):
    """Conv2d with W_eff = W0 + scatter(values); value gradients from shifted input views.

    Symmetric padding goes straight to the convolution; asymmetric padding ('same' with an even
    kernel) is applied explicitly. The input is saved as the floor's conv saves it (whole) when the
    graph keeps its storage alive anyway or the mask reads every channel; otherwise only the input
    channels some trainable entry reads (unpadded). With dense=True the value gradient is gathered
    from torch's dense conv weight gradient instead (the input is saved whole).
    """

    @staticmethod
    def forward(ctx, x, values, weight, bias, flat_idx, geom, save_dtype: str, dense: bool,
                o_ident: bool = False, cache: dict | None = None, lead=None):
        pad, stride, dilation, groups, uch, inv_ch, ent_o, ent_uv = geom
        l, r, t, b = pad
        w_eff, undo = _patch(weight, flat_idx, values)
        try:
            if l == r and t == b:
                y = F.conv2d(x, w_eff, bias, stride, (t, l), dilation, groups)
            else:
                y = F.conv2d(F.pad(x, pad), w_eff, bias, stride, 0, dilation, groups)
        finally:
            _restore(undo)
        if dense:
            kind, src = "full", (_in_save_dtype(x, save_dtype),)
        else:
            kind, src, _ = _input_source(x, x, uch, save_dtype, False)
        ctx.save_for_backward(src[0], values, flat_idx)
        ctx.weight = weight  # frozen parameter: not saved (see _patch)
        ctx.geom, ctx.dense, ctx.kind, ctx.full, ctx.xshape = geom, dense, kind, kind != "cols", x.shape
        ctx.o_ident, ctx.cache, ctx.lead = o_ident, cache, lead
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
            w_eff, undo = _patch(weight, *sel)
            try:
                gx, gw, _ = torch.ops.aten.convolution_backward(
                    dy, xin, w_eff.to(dy.dtype), None, stride, (t, l) if sym else (0, 0), dilation, False, (0, 0),
                    groups, (need_x, dense_v, False))
            finally:
                _restore(undo)
            if need_x:
                dx = gx if sym else gx[:, :, t: t + h, l: l + w]
            if dense_v:
                dv = gw.reshape(-1).index_select(0, flat_idx).to(values.dtype)
        if need_v and not ctx.dense:
            ch = inv_ch if not ctx.full else uch.index_select(0, inv_ch)
            dv = conv_value_grad(keep, dy, weight.shape, pad, stride, dilation, ch, ent_o, ent_uv,
                                 ctx.o_ident, ctx.cache, ctx.lead).to(values.dtype)
        return dx, dv, None, None, None, None, None, None, None, None, None


INDEX_CACHE_MAX = 1 << 12  # (entries x output positions) up to which the flat gather index is cached whole


def _conv_gather_index(xshape, wshape, pad, stride, dilation, ch, ent_uv, ho, wo, cache, order=None):
    """Flat index into one sample of the saved (unpadded) input for every (entry, output position),
    and the validity of each (None when no position falls into the zero padding; a bool (E, P)
    mask, or a pair of float (E, ho, 1) / (E, 1, wo) factors to multiply by), for the entries in
    mask order or, given ``order``, in that order. Cached per input shape (and order or not):
    whole up to INDEX_CACHE_MAX elements; above, as its row and column parts (index = row part
    + column part, validity = row factor * column factor), O(E (ho + wo)) instead of O(E ho wo)
    kept on the layer, the (E, P) index rebuilt by one broadcast add per call."""
    key = (tuple(xshape[1:]), ho, wo, ch.device) + (() if order is None else ("ordered",))
    hit = cache.get(key) if cache is not None else None
    if hit is None:
        hit = _conv_index_parts(xshape, wshape, pad, stride, dilation, ch, ent_uv, ho, wo, order)
        if cache is not None:
            cache[key] = hit
    if len(hit) == 2:
        return hit
    rows, cols, vh, vw = hit
    idx = (rows + cols).reshape(-1)
    return idx, None if vh is None else (vh, vw)


def _conv_index_parts(xshape, wshape, pad, stride, dilation, ch, ent_uv, ho, wo, order):
    """What _conv_gather_index caches: (idx, valid) whole, or (rows, cols, vh, vw) in parts."""
    if order is not None:
        ch, ent_uv = ch.index_select(0, order), ent_uv.index_select(0, order)
    _, _, h, w = xshape
    kw = wshape[3]
    l, _, t, _ = pad
    (sh, sw), (dh, dw) = stride, dilation
    dev, e = ch.device, ch.numel()
    u, v = ent_uv // kw, ent_uv % kw
    hi = (torch.arange(ho, device=dev) * sh).reshape(1, -1) + (u * dh - t).reshape(-1, 1)  # (E, ho)
    wi = (torch.arange(wo, device=dev) * sw).reshape(1, -1) + (v * dw - l).reshape(-1, 1)  # (E, wo)
    vh, vw = (hi >= 0) & (hi < h), (wi >= 0) & (wi < w)
    rows = (ch.reshape(-1, 1) * (h * w) + hi.clamp(0, h - 1) * w).unsqueeze(2)  # (E, ho, 1)
    cols = wi.clamp(0, w - 1).unsqueeze(1)  # (E, 1, wo)
    all_valid = bool(vh.all()) and bool(vw.all())
    if e * ho * wo <= INDEX_CACHE_MAX:
        valid = (vh.unsqueeze(2) & vw.unsqueeze(1)).reshape(e, ho * wo)
        return (rows + cols).reshape(-1), None if all_valid else valid
    if all_valid:
        return rows, cols, None, None
    return rows, cols, vh.unsqueeze(2).float(), vw.unsqueeze(1).float()


def conv_value_grad(xs, dy, wshape, pad, stride, dilation, ch, ent_o, ent_uv, o_ident=False, cache=None,
                    lead=None):
    """g[e] = sum_{n,h,w} dY[n, o_e, h, w] * Xpad[n, c_e, h*s + u_e*d, w*s + v_e*d].

    xs holds the saved (unpadded) input channels; `ch` indexes them per entry. All kernel
    offsets are handled by one flat gather (no per-offset loop, no padded copy: positions in
    the zero padding are masked out after the batch sum); a 1x1 / stride-1 / unpadded conv is
    the Linear case on channel rows and gathers whole rows. ``lead`` = (lead, rest) positions
    (``lead_entries`` over output channels): the first K entries of every output channel multiply
    the output gradient as it is, without a gather; only the rest gather dY's channels. o_ident
    (entry e belongs to output channel e) is the case lead = all entries, K = 1.
    """
    n_b, o_c, ho, wo = dy.shape
    e = ent_o.numel()
    if e == 0 or n_b == 0:
        return torch.zeros(e, dtype=torch.float32, device=dy.device)
    if lead is None:
        every = torch.arange(e, device=ent_o.device)
        lead = (every, every[:0]) if o_ident else (every[:0], every)
    lead, rest = lead
    kl, kr = lead.numel(), rest.numel()
    k = kl // o_c
    # with both lead and rest the entries are gathered in (lead, rest) order; otherwise lead or rest
    # is every entry, in mask order
    order = torch.cat([lead, rest]) if kl and kr else None
    o_rest = ent_o.index_select(0, rest) if kr else None
    p = ho * wo
    dyf = dy.reshape(n_b, o_c, p)
    dyf = dyf.float() if dyf.dtype != torch.float32 else dyf
    pointwise = wshape[2] == wshape[3] == 1 and tuple(stride) == (1, 1) and not any(pad)
    xs = xs.float() if xs.dtype != torch.float32 else xs  # cast once (bf16 gathers are slow)
    if pointwise:
        xf, idx, valid = xs.reshape(n_b, xs.shape[1], p), ch if order is None else ch.index_select(0, order), None
    else:
        idx, valid = _conv_gather_index(xs.shape, wshape, pad, stride, dilation, ch, ent_uv, ho, wo, cache, order)
        xf = xs.reshape(n_b, -1)
    n_per = max(1, _CHUNK // (e * p))
    acc = None
    for s in range(0, n_b, n_per):
        bb = _cols(xf[s:s + n_per], idx).view(-1, e, p)  # (n, E, P)
        if kl:
            bb[:, :kl].view(-1, o_c, k, p).mul_(dyf[s:s + n_per].unsqueeze(2))
        if kr:
            bb[:, kl:].mul_(_cols(dyf[s:s + n_per], o_rest))
        part = bb.sum(0)  # (E, P)
        acc = part if acc is None else acc.add_(part)
    if isinstance(valid, tuple):  # row and column factors (see _conv_gather_index)
        acc.view(e, ho, wo).mul_(valid[0]).mul_(valid[1])
    elif valid is not None:
        acc.mul_(valid)
    g = acc.sum(1)
    if order is None:
        return g
    out = torch.empty_like(g)
    out.index_copy_(0, lead, g[:kl])
    return out.index_copy_(0, rest, g[kl:])
