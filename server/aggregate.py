"""Masked aggregation: a sample-weighted mean per entry over the clients that trained it.

A client with a smaller budget trains a nested subset of the global mask, so its reply covers
only some positions of the global value vector. Every entry is therefore averaged with its own
denominator (the summed weights of the clients that trained it). An untrained entry never
counts as zero, and an entry nobody trained keeps its previous value. Dense arrays (the head,
or every array of the baselines) are the special case "positions = everything".

`masked_mean` is used only with heterogeneous (nested) budgets: when every node trains the whole mask, the
per-entry mean is Flower's FedAvg mean, which `weighted_mean` computes in one pass per reply
(server/strategy.py's `TaskEdgeFedAvg.aggregate_train`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

Arrays = dict[str, np.ndarray]


@dataclass
class Update:
    """One client's contribution: arrays keyed like the global state.

    positions[key] gives, for a partial array, where its entries sit in the (flattened) global
    array; keys absent from `positions` are full-size.
    """

    arrays: Arrays
    weight: float
    positions: dict[str, np.ndarray] = field(default_factory=dict)


def masked_mean(current: Arrays, updates: Sequence[Update]) -> tuple[Arrays, dict[str, np.ndarray]]:
    """(average, weight sum per entry). Entries with zero total weight keep `current`.

    Vectorised: full-size replies of a key go through one weighted matrix product, partial
    replies through an indexed add each (positions within a reply are unique).
    """
    avg: Arrays = {}
    den_out: dict[str, np.ndarray] = {}
    for key, cur in current.items():
        flat_cur = np.asarray(cur).reshape(-1)
        num = np.zeros(flat_cur.size, dtype=np.float64)
        den = np.zeros(flat_cur.size, dtype=np.float64)
        full = [u for u in updates if key in u.arrays and key not in u.positions]
        if full:
            w = np.array([u.weight for u in full], dtype=np.float64)
            if w.sum() > 0:
                stack = np.stack([np.asarray(u.arrays[key], dtype=np.float32).reshape(-1) for u in full])
                num += w @ stack
                den += w.sum()
        for u in updates:
            if key in u.arrays and key in u.positions and u.weight > 0:
                pos = u.positions[key]
                num[pos] += u.weight * np.asarray(u.arrays[key], dtype=np.float64).reshape(-1)
                den[pos] += u.weight
        out = flat_cur.astype(np.float64, copy=True)
        hit = den > 0
        out[hit] = num[hit] / den[hit]
        avg[key] = out.astype(np.asarray(cur).dtype).reshape(np.shape(cur))
        den_out[key] = den.reshape(np.shape(cur))
    return avg, den_out


def masked_robust(current: Arrays, updates: Sequence[Update], how: str = "median", beta: float = 0.2) -> Arrays:
    """Per-entry coordinate-wise median or trimmed mean over the clients that trained each entry.

    Unweighted, like Flower's FedMedian / FedTrimmedAvg (an example count is itself a claim an
    attacker makes). Clients with weight 0 do not count; entries nobody trained keep `current`.
    `trimmed` cuts int(beta * k) values at each end of the k trainers of an entry.
    """
    if how not in ("median", "trimmed"):
        raise ValueError(f"how must be 'median' or 'trimmed', got {how!r}")
    out: Arrays = {}
    live = [u for u in updates if u.weight > 0]
    for key, cur in current.items():
        flat_cur = np.asarray(cur).reshape(-1)
        rows = np.full((len(live), flat_cur.size), np.nan, dtype=np.float64)
        for i, u in enumerate(live):
            if key in u.arrays:
                vals = np.asarray(u.arrays[key], dtype=np.float64).reshape(-1)
                rows[i, u.positions[key] if key in u.positions else slice(None)] = vals
        k = np.sum(~np.isnan(rows), axis=0)
        res = flat_cur.astype(np.float64, copy=True)
        hit = k > 0
        if hit.any():
            if how == "median":
                res[hit] = np.nanmedian(rows[:, hit], axis=0)
            else:
                srt = np.sort(rows[:, hit], axis=0)  # NaN sort last
                kk = k[hit]
                cut = (beta * kk).astype(np.int64)
                idx = np.arange(len(live))[:, None]
                keep = (idx >= cut) & (idx < kk - cut)
                res[hit] = np.where(keep, srt, 0.0).sum(axis=0) / keep.sum(axis=0)
        out[key] = res.astype(np.asarray(cur).dtype).reshape(np.shape(cur))
    return out


WEIGHT_GROUPS = 8  # at most this many distinct weights are summed per group (one running sum each)


def weighted_mean(arrays: Sequence[Arrays], weights: Sequence[float]) -> Arrays:
    """FedAvg's weighted mean Σ_i (w_i / W) v_i of full-size float32 replies, in one pass over each reply.

    Why not Flower's `aggregate_arrayrecords`: it copies every reply out of its record, multiplies into a new
    temporary and adds (three passes and two allocations per reply), which made the server path 8x slower
    than a plain sum at 1,000 replies (benchmarks/bench_server_agg.py). Here replies of equal weight (every
    node of a fleet holds the same example count; DP and SecAgg+ runs use weight 1) are added in place into
    one running sum per weight, scaled once at the end; with more than WEIGHT_GROUPS distinct weights each
    reply is scaled into one reused buffer and added. Same value as Flower's up to float32 rounding order.
    """
    total = float(sum(weights))
    if not arrays or total <= 0:
        raise ValueError("weighted_mean needs at least one reply of positive weight")
    grouped = len(set(weights)) <= WEIGHT_GROUPS
    out: Arrays = {}
    for key in arrays[0]:
        first = np.asarray(arrays[0][key])
        res = np.zeros(first.shape, dtype=first.dtype)
        if grouped:
            sums: dict[float, np.ndarray] = {}
            for a, w in zip(arrays, weights):
                if w in sums:
                    sums[w] += a[key]
                else:
                    sums[w] = np.array(a[key], dtype=first.dtype)  # the group's running sum (a copy)
            for w, s in sums.items():
                s *= first.dtype.type(w / total)
                res += s
        else:
            buf = np.empty_like(res)
            for a, w in zip(arrays, weights):
                np.multiply(a[key], first.dtype.type(w / total), out=buf)
                res += buf
        out[key] = res
    return out
