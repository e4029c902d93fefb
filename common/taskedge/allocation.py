"""Budget -> trainable entries: TaskEdge's neuron-level allocation and the global top-k ablation.

Neuron level: every output neuron (row) gets its top-k entries by score; what is left of the
budget goes to the rows whose next-best entry scores highest. Equivalently, entries are taken
in the total order (rank within row ascending, score descending, module order, row, column),
which makes allocations nested: the mask for a smaller budget is a prefix, hence a subset, of
the mask for a larger one. A client with a smaller budget therefore trains a subset of the
global mask (heterogeneous devices).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Mask:
    """Trainable entries per module, in the canonical (ascending flat index) order.

    indices[name]: int64 flat indices into weight.reshape(rows, width).
    ranks[name]: within-row rank of each entry (0 = the row's most important entry).
    shapes[name]: (rows, width).
    norms[name]: only with N:M on: the per-feature activation norms the N:M pruning of the base
        weights was derived from (`tuner.apply_nm`). They travel with the mask ('<name>.norm'), so
        every node prunes its copy of the backbone exactly as the server did, from the same pooled
        statistics (about 0.1 % of the model, once per mask version).
    """

    indices: dict[str, torch.Tensor]
    ranks: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, int]]
    norms: dict[str, torch.Tensor] | None = None  # N:M mode: the pooled activation norms the pruning used

    @property
    def num_entries(self) -> int:
        return int(sum(t.numel() for t in self.indices.values()))

    def names(self) -> list[str]:
        return sorted(self.indices)

    def subset(self, max_rank: int) -> "Mask":
        """The nested sub-mask of entries with rank < max_rank (heterogeneous budgets)."""
        idx, rk = {}, {}
        for n in self.names():
            keep = self.ranks[n] < max_rank
            idx[n], rk[n] = self.indices[n][keep], self.ranks[n][keep]
        return Mask(idx, rk, dict(self.shapes), self.norms)

    def positions_in(self, other: "Mask") -> dict[str, torch.Tensor]:
        """Where each of this mask's entries sits in `other`'s value vector (self must be a subset)."""
        pos = {}
        for n in self.names():
            big = other.indices[n]
            p = torch.searchsorted(big, self.indices[n])
            if p.numel() and (p.max() >= big.numel() or not torch.equal(big[p], self.indices[n])):
                raise ValueError(f"mask for '{n}' is not a subset of the reference mask")
            pos[n] = p
        return pos

    def to_arrays(self, compact: bool = False) -> dict[str, np.ndarray]:
        """Wire / checkpoint form: '<name>.idx', '<name>.rank' int64 and '<name>.shape'. `compact`: idx and
        rank in the smallest unsigned type that holds them (uint32 / uint8 on real models): the mask delivery
        sends, and every node keeps in its state between rounds, ~5 bytes per entry instead of 16."""
        out = {}
        for n in self.names():
            idx, rank = self.indices[n].numpy().astype(np.int64), self.ranks[n].numpy().astype(np.int64)
            if compact:
                idx = idx.astype(np.min_scalar_type(max(int(self.shapes[n][0]) * int(self.shapes[n][1]) - 1, 0)))
                rank = rank.astype(np.min_scalar_type(int(rank.max()) if rank.size else 0))
            out[f"{n}.idx"], out[f"{n}.rank"] = idx, rank
            out[f"{n}.shape"] = np.array(self.shapes[n], dtype=np.int64)
        for n in sorted(self.norms or {}):
            out[f"{n}.norm"] = self.norms[n].detach().cpu().numpy()
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "Mask":
        idx, rk, shp = {}, {}, {}
        for key in arrays:
            if not key.endswith(".idx"):
                continue
            n = key[:-4]
            for part in ("rank", "shape"):
                if f"{n}.{part}" not in arrays:
                    raise ValueError(f"mask arrays lack '{n}.{part}'")
            i = np.asarray(arrays[key])
            r = np.asarray(arrays[f"{n}.rank"])
            s = tuple(int(v) for v in np.asarray(arrays[f"{n}.shape"]).reshape(-1))
            if i.dtype.kind not in "iu" or r.dtype.kind not in "iu" or i.ndim != 1 or i.shape != r.shape or len(s) != 2:
                raise ValueError(f"mask arrays for '{n}' must be 1-D integer idx/rank of equal length and a (rows, width) shape")
            if i.size and (i.min() < 0 or i.max() >= s[0] * s[1] or np.any(np.diff(i) <= 0)):
                raise ValueError(f"mask indices for '{n}' must be strictly increasing within [0, {s[0] * s[1]})")
            idx[n], rk[n], shp[n] = torch.from_numpy(i.astype(np.int64)), torch.from_numpy(r.astype(np.int64)), s
        norms = {}
        for key in arrays:
            if key.endswith(".norm"):
                v = np.asarray(arrays[key])
                if v.dtype.kind != "f" or v.ndim < 1 or not np.isfinite(v).all() or (v < 0).any():
                    raise ValueError(f"mask array '{key}' must be finite, non-negative activation norms")
                norms[key[:-5]] = torch.from_numpy(np.array(v, copy=True))
        return cls(idx, rk, shp, norms or None)


def budget_entries(budget: float, backbone_params: int, eligible_entries: int, rows: int = 0,
                   per_neuron: float = 0.0) -> int:
    """Turn a budget (fraction of backbone parameters, or absolute count) into an entry count; `per_neuron` > 0
    (entries per output neuron of the `rows` eligible neurons) replaces it: a budget that means the same on
    every model size (the paper's 0.1 % of ViT-B/16 is ~1 per neuron; 2 % of the embedded ViT ~1.8)."""
    if per_neuron > 0:
        count = int(round(per_neuron * rows))
        if count == 0:
            raise ValueError(f"per_neuron={per_neuron} over {rows} output neurons rounds to 0 entries; raise it")
        budget = f"{per_neuron:g} per neuron"
    elif isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
        raise ValueError(f"budget must be > 0 (fraction in (0, 1) or count >= 1), got {budget!r}")
    else:
        count = int(round(budget * backbone_params)) if budget < 1 else int(budget)
    if per_neuron <= 0 and budget < 1 and count == 0:
        raise ValueError(f"budget={budget} of {backbone_params} backbone parameters rounds to 0 entries; raise it")
    if count > eligible_entries:
        raise ValueError(f"budget={budget!r} asks for {count} entries but the eligible modules hold only "
                         f"{eligible_entries}; use a smaller budget or more target modules")
    return count


def allocate(scores: dict[str, torch.Tensor], count: int, mode: str = "neuron", col_cap: float = 1.0) -> Mask:
    """Pick `count` entries from (rows, width) score matrices (modules in sorted-name order).

    mode: "neuron" (TaskEdge), "neuron-cap" (neuron level with a per-column cap, see
    `_neuron_capped`; `col_cap` is its factor) or "global" (top-k over everything).
    """
    names = sorted(scores)
    total = sum(scores[n].numel() for n in names)
    if not 0 < count <= total:
        raise ValueError(f"count must be in [1, {total}], got {count}")
    if mode == "neuron":
        chosen = _neuron_level(scores, names, count)
    elif mode == "neuron-cap":
        chosen = _neuron_capped(scores, names, count, col_cap)
    elif mode == "global":
        chosen = _global_topk(scores, names, count)
    else:
        raise ValueError(f"allocation must be 'neuron', 'neuron-cap' or 'global', got {mode!r}")
    idx, rk, shp = {}, {}, {}
    for n in names:
        flat, rank = chosen[n]
        order = torch.argsort(flat)
        idx[n], rk[n] = flat[order], rank[order]
        shp[n] = tuple(scores[n].shape)
    return Mask(idx, rk, shp)


def _neuron_level(scores, names, count):
    rows_total = sum(scores[n].shape[0] for n in names)
    depth_guess = count // rows_total + 1
    depth = {n: min(scores[n].shape[1], depth_guess) for n in names}
    while True:
        # Top-`depth` per row, sorted; if leftover budget would need deeper ranks, widen.
        tops = [torch.topk(scores[n].float(), depth[n], dim=1, sorted=True) for n in names]
        rank, score, mod, row, col = _candidates(tops)
        if rank.numel() >= count or all(depth[n] == scores[n].shape[1] for n in names):
            covered = _covered(rank, depth, names, mod, scores)
            if covered >= count:
                break
        depth = {n: min(scores[n].shape[1], depth[n] * 2) for n in names}
    return _take_in_order(scores, names, count, rank, score, mod, row, col)


def column_cap(rows: int, width: int, depth: int, factor: float = 1.0) -> int:
    """Most rows that may pick one input column when every row takes `depth` entries."""
    return max(1, math.ceil(factor * rows * depth / width - 1e-9))


def _capped_rows(s: torch.Tensor, depth: int, cap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, `depth` columns by descending score, no column taken by more than `cap` rows.

    Rank by rank: every row still without its r-th entry proposes its best column that it has
    not taken yet and that still has room; each column accepts its highest-scoring proposals
    (ties: lower row) up to its room; rejected rows propose again. A row whose remaining columns
    are all full (possible only at the tightest caps) takes its best remaining column anyway.
    Returns (cols, vals), each (rows, depth), in rank order.
    """
    rows, width = s.shape
    s = s.float()
    taken = torch.zeros(rows, width, dtype=torch.bool)
    used = torch.zeros(width, dtype=torch.long)
    cols = torch.zeros(rows, depth, dtype=torch.long)
    vals = torch.zeros(rows, depth)
    neg = float("-inf")
    for r in range(depth):
        pending = torch.arange(rows)
        while pending.numel():
            free = used < cap
            cand = s[pending].masked_fill(taken[pending] | ~free[None, :], neg)
            best_val, best_col = cand.max(1)
            stuck = ~(cand > neg).any(1)
            if stuck.any():  # nothing with room left for these rows: best remaining column regardless of the cap
                rest = s[pending[stuck]].masked_fill(taken[pending[stuck]], neg)
                best_val[stuck], best_col[stuck] = rest.max(1)
            # within each proposed column, rank the proposals by score (desc), then row (asc)
            order = torch.from_numpy(np.lexsort((pending.numpy(), -best_val.double().numpy(), best_col.numpy())))
            col_sorted = best_col[order]
            start = torch.ones_like(col_sorted, dtype=torch.bool)
            start[1:] = col_sorted[1:] != col_sorted[:-1]
            idx = torch.arange(len(order))
            pos = idx - torch.cummax(torch.where(start, idx, torch.zeros_like(idx)), 0).values
            room = (cap - used).clamp(min=0)[col_sorted]
            ok = torch.zeros(len(order), dtype=torch.bool)
            ok[order] = (pos < room) | stuck[order]
            acc_rows, acc_cols = pending[ok], best_col[ok]
            cols[acc_rows, r], vals[acc_rows, r] = acc_cols, best_val[ok]
            taken[acc_rows, acc_cols] = True
            used += torch.bincount(acc_cols, minlength=width)
            pending = pending[~ok]
    return cols, vals


def _neuron_capped(scores, names, count, factor):
    """Neuron level with a column cap: TaskEdge's k-per-row rule, entries spread over input columns.

    depth = ceil(count / rows): every row gets `depth` capped candidates (`_capped_rows`, cap =
    `column_cap(rows, width, depth, factor)` per module); then, as in `_neuron_level`, entries are
    taken in the order (rank asc, score desc, module, row, column), so all rows get depth - 1
    entries and the leftover goes to the rows whose next candidate scores highest.
    """
    rows_total = sum(scores[n].shape[0] for n in names)
    depth_all = -(-count // rows_total)
    per_module = []
    for n in names:
        r, w = scores[n].shape
        d = min(w, depth_all)
        cols, vals = _capped_rows(scores[n], d, column_cap(r, w, d, factor))
        per_module.append((vals, cols))
    rank, score, mod, row, col = _candidates(per_module)
    if rank.numel() < count:  # narrow modules saturated: fall back to the uncapped order for the rest
        return _neuron_level(scores, names, count)
    return _take_in_order(scores, names, count, rank, score, mod, row, col)


def _take_in_order(scores, names, count, rank, score, mod, row, col) -> dict:
    """The first `count` candidates in the total order — rank asc, score desc, then module, row, column
    (np.lexsort: last key is primary) — as (flat index, rank) per module."""
    order = np.lexsort((col.numpy(), row.numpy(), mod.numpy(), -score.double().numpy(), rank.numpy()))
    take = torch.from_numpy(order[:count])
    out = {}
    for mi, n in enumerate(names):
        sel = take[mod[take] == mi]
        out[n] = (row[sel] * scores[n].shape[1] + col[sel], rank[sel])
    return out


def _candidates(per_module: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    """Flatten each module's per-row (scores, columns) of shape (rows, d) into one candidate list:
    (within-row rank, score, module index, row, column)."""
    ranks, scores, mods, rows, cols = [], [], [], [], []
    for mi, (vals, col) in enumerate(per_module):
        r, d = vals.shape
        ranks.append(torch.arange(d).repeat(r))
        scores.append(vals.reshape(-1))
        mods.append(torch.full((r * d,), mi))
        rows.append(torch.arange(r).repeat_interleave(d))
        cols.append(col.reshape(-1))
    return tuple(torch.cat(t) for t in (ranks, scores, mods, rows, cols))


def _covered(rank, depth, names, mod, scores):
    """Entries guaranteed correct in the order: all ranks below the smallest unsaturated depth."""
    unsat = [depth[n] for n in names if depth[n] < scores[n].shape[1]]
    if not unsat:
        return rank.numel()
    return int((rank < min(unsat)).sum())


def _global_topk(scores, names, count):
    flat = torch.cat([scores[n].reshape(-1).float() for n in names])
    mod = torch.cat([torch.full((scores[n].numel(),), i) for i, n in enumerate(names)])
    offs = torch.cat([torch.arange(scores[n].numel()) for n in names])
    top = torch.topk(flat, count, sorted=True).indices
    out = {}
    for mi, n in enumerate(names):
        sel = top[mod[top] == mi]
        flat_idx = offs[sel]
        width = scores[n].shape[1]
        # within-row rank among the chosen entries (by score) keeps Mask.subset meaningful
        rows = flat_idx // width
        ranks = torch.zeros_like(flat_idx)
        if flat_idx.numel():
            order = np.lexsort((-flat[sel].double().numpy(), rows.numpy()))
            sorted_rows = rows[order]
            first = torch.ones_like(sorted_rows, dtype=torch.bool)
            first[1:] = sorted_rows[1:] != sorted_rows[:-1]
            start = torch.cummax(torch.where(first, torch.arange(len(order)), torch.zeros_like(sorted_rows)), 0).values
            ranks[torch.from_numpy(order)] = torch.arange(len(order)) - start
        out[n] = (flat_idx, ranks)
    return out


def nm_keep(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool (rows, width) mask keeping the N highest scores in each group of M consecutive inputs.

    Ties go to the lower input index (a stable sort, not topk's implementation-defined order), so
    every node derives the same pattern from the same scores, whatever its platform.
    """
    rows, width = scores.shape
    if width % m:
        raise ValueError(f"N:M sparsity needs the input width ({width}) to be a multiple of M={m}")
    groups = scores.reshape(rows, width // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    order = torch.sort(groups, dim=2, descending=True, stable=True).indices
    keep.scatter_(2, order[:, :, :n], True)
    return keep.reshape(rows, width)
