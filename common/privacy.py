"""What one node contributes to a secure sum or a private statistic, and how the server reads the sum.

No Flower here: the layouts are plain lists of numpy arrays, written once and used by the client
(`client/privacy.py`, before Flower's SecAgg+ quantizes and masks them) and by the server
(`server/secure.py`, after Flower's SecAgg+ has unmasked their sum).

Every entry of a contribution lies in [-c, c], c = the SecAgg+ clipping range, so Flower's
quantizer never clips a real value. The server learns only sums over the surviving nodes.

Training contribution (`train_contribution`), for an update d = trained - received, clipped to
norm <= `bound`, and the node's weight w in (0, 1] (num-examples / max-weight, or 1 with uniform
weights):

    [w * d_k for every array k of the record]          the weighted update (|entry| <= bound <= c)
    + [c * w * onehot(slot, num_slots)]                the weights, one slot per budget rank
    + [c * clipped, c * w * min(loss, L) / L, c * w * acc]   clipped count and weighted metrics

The two vectors (weighted values, weights) give exact per-entry denominators for nested budgets:
the server knows which packed entries each budget rank trains, so entry j's denominator is
the sum of the slot weights of the ranks that train j (`train_mean`).

Statistics contribution (`stats_contribution`): per module the per-column mean square
ms = ss / n, times w = n / N (N = calib-size x rows per example, public) when `weighted`, the
whole vector clipped to norm <= `bound`; then [c * w per module] and [c * clipped]. Weighted and
unclipped, the sum gives exactly the pooled sum of squares / N and rows / N (`stats_pooled`);
unweighted (differential privacy), each node's contribution has norm <= bound whatever its data.

Gradient contribution (`grad_contribution`, score='gradient'): the node's signed calibration-gradient
sums divided by N = calib-size (public: the node's mean over a full calibration set), the whole vector
(all target modules) clipped to norm <= G = `grad-clip-norm`, in every mode. In a secure sum it is
scaled by c / G (entries in [-c, c], the full quantizer range) and followed by [c * clipped]. Its own
bound makes it a second Gaussian release beside the statistics (server/privacy.py accounts both).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

LOSS_BOUND = 100.0  # train-loss above this counts as this in the securely averaged metric


def clip_norm(vectors: list[np.ndarray], bound: float) -> tuple[list[np.ndarray], bool]:
    """Scale the concatenation of `vectors` to L2 norm <= bound; (scaled, whether it was clipped)."""
    norm = float(np.sqrt(sum(float(np.square(v, dtype=np.float64).sum()) for v in vectors)))
    if bound <= 0 or norm <= bound * (1 + 1e-6):  # already clipped upstream (float32 rounding): not counted
        return vectors, False
    return [v * (bound / norm) for v in vectors], True


def train_contribution(received: Mapping[str, np.ndarray], trained: Mapping[str, np.ndarray], weight: float,
                       bound: float, c: float, slot: int = 0, num_slots: int = 1, loss: float = 0.0,
                       acc: float = 0.0) -> list[np.ndarray]:
    """A training reply as the vectors a node feeds into the secure sum (float64)."""
    if not 0.0 < weight <= 1.0:
        raise ValueError(f"weight must be in (0, 1], got {weight}")
    if not 0 <= slot < num_slots:
        raise ValueError(f"weight slot {slot} outside [0, {num_slots})")
    update = [np.asarray(trained[k], np.float64) - np.asarray(received[k], np.float64) for k in received]
    update, clipped = clip_norm(update, bound)
    slots = np.zeros(num_slots, np.float64)
    slots[slot] = c * weight
    aux = np.array([c * float(clipped), c * weight * min(max(float(loss), 0.0), LOSS_BOUND) / LOSS_BOUND,
                    c * weight * min(max(float(acc), 0.0), 1.0)], np.float64)
    return [weight * u for u in update] + [slots, aux]


def merge_ranks(ranks: Mapping[int, int], min_group: int = 3) -> dict[int, int]:
    """Budget ranks for a secure sum in which every rank group has >= `min_group` nodes.

    Each rank's weights are summed in a slot of their own, so a lone node of a rank would be readable
    from its slot and from the entries only its rank trains. A group that is too small joins the next
    larger rank (a smaller sub-mask, which any node can train); a too-small group left at the largest
    rank pulls the group below it up. Nodes are never moved to a smaller rank (a larger sub-mask than
    the device's budget). With fewer than `min_group` nodes in all, everyone gets the largest rank."""
    order = sorted(set(ranks.values()))
    groups: list[tuple[int, list[int]]] = []
    pending: list[int] = []
    for r in order:
        pending += sorted(n for n, rr in ranks.items() if rr == r)
        if len(pending) >= min_group:
            groups.append((r, pending))
            pending = []
    if pending:
        last = max(ranks[n] for n in pending)
        members = pending + (groups.pop()[1] if groups else [])
        groups.append((last, members))
    return {n: r for r, members in groups for n in members}


def train_shapes(arrays: Mapping[str, np.ndarray], num_slots: int) -> list[tuple[int, ...]]:
    """The shapes of a training contribution (what the server checks masked vectors against)."""
    return [tuple(np.shape(v)) for v in arrays.values()] + [(num_slots,), (3,)]


def train_mean(current: Mapping[str, np.ndarray], sums: Sequence[np.ndarray], c: float,
               slot_positions: Sequence[np.ndarray | None], packed: str = "values") -> tuple[dict, dict]:
    """The new global arrays from the summed contributions: current + per-entry weighted mean update.

    slot_positions[s]: packed entries the nodes of slot s train (None: all). An entry no node trained
    keeps its value (its denominator is 0; it is never averaged as a zero update).
    Returns (arrays, info): the summed weight (and the smallest of an entry), the clipped count and the
    weighted mean loss / accuracy."""
    keys = list(current)
    parts, aux = sums[:len(keys)], np.asarray(sums[-1]) / c
    slots = np.asarray(sums[len(keys)], np.float64) / c
    total = float(slots.sum())
    out, min_weight = {}, total
    for k, s in zip(keys, parts):
        cur = np.asarray(current[k])
        if k == packed and any(p is not None for p in slot_positions):
            denom = np.zeros(cur.size, np.float64)
            for w, pos in zip(slots, slot_positions):
                if pos is None:
                    denom += w
                else:
                    denom[pos] += w
            mean = np.divide(np.asarray(s, np.float64).reshape(-1), denom, out=np.zeros(cur.size), where=denom > 0)
            if (denom > 0).any():
                min_weight = min(min_weight, float(denom[denom > 0].min()))
            out[k] = (cur.astype(np.float64) + mean.reshape(cur.shape)).astype(cur.dtype)
        else:
            step = np.asarray(s, np.float64) / total if total > 0 else 0.0
            out[k] = (cur.astype(np.float64) + step).astype(cur.dtype)
    info = {"weight": total, "min-weight": min_weight, "clipped": int(round(float(aux[0]))),
            "train-loss": float(aux[1] * LOSS_BOUND / total) if total > 0 else 0.0,
            "train-acc": float(aux[2] / total) if total > 0 else 0.0}
    return out, info


def mean_squares(stats: Mapping[str, np.ndarray], modules: Sequence[str]) -> list[np.ndarray]:
    """Per-column mean squares ss / n of every module (wire form of common.taskedge.stats)."""
    return [np.asarray(stats[f"{m}.ss"], np.float64) / int(np.asarray(stats[f"{m}.n"]).reshape(-1)[0])
            for m in modules]


def stats_contribution(stats: Mapping[str, np.ndarray], modules: Sequence[str], max_rows: Mapping[str, int],
                       bound: float, c: float, weighted: bool) -> list[np.ndarray]:
    """A statistics reply as the vectors a node feeds into the secure (or private) sum."""
    ms = mean_squares(stats, modules)
    w = np.array([min(int(np.asarray(stats[f"{m}.n"]).reshape(-1)[0]) / max_rows[m], 1.0) if weighted else 1.0
                  for m in modules], np.float64)
    parts, clipped = clip_norm([wm * v for wm, v in zip(w, ms)], bound)
    return parts + [c * w, np.array([c * float(clipped)])]


def clip_stats(stats: Mapping[str, np.ndarray], modules: Sequence[str], max_rows: Mapping[str, int],
               bound: float) -> tuple[dict[str, np.ndarray], bool]:
    """One node's statistics with the clip of `stats_contribution` (weighted): its vector of n/N x mean
    squares scaled to norm <= bound, back in the wire form (ss, n). Under the bound: returned unchanged,
    so pooling honest nodes stays exact; over it, one node's pull on the pooled statistic is at most
    `bound` per module set, whatever sums of squares it claims."""
    parts = stats_contribution(stats, modules, max_rows, bound, 1.0, weighted=True)
    clipped = bool(parts[-1][0])
    if not clipped:
        return dict(stats), False
    out = dict(stats)
    for m, part, w in zip(modules, parts, parts[len(modules)]):
        n = int(np.asarray(stats[f"{m}.n"]).reshape(-1)[0])
        out[f"{m}.ss"] = np.asarray(part, np.float64) / w * n  # w > 0: n >= 1 row
    return out, True


def stats_shapes(shapes: Mapping[str, tuple[int, ...]], modules: Sequence[str]) -> list[tuple[int, ...]]:
    return [tuple(shapes[m]) for m in modules] + [(len(modules),), (1,)]


def stats_pooled(sums: Sequence[np.ndarray], modules: Sequence[str], max_rows: Mapping[str, int], c: float,
                 weighted: bool, noise: Sequence[np.ndarray] | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Pooled statistics in the wire form of common.taskedge.stats ('<m>.ss', '<m>.n') from summed contributions.

    weighted: ss = N * sum(n/N * ms) = the exact pooled sum of squares, n = the pooled row count.
    Unweighted (DP): ss = the (noisy) sum of clipped mean squares, clamped at 0, n = 1 per module:
    the mask depends on the statistic only up to one common factor, so no row count is released."""
    k = len(modules)
    parts, w, aux = sums[:k], np.asarray(sums[k], np.float64) / c, np.asarray(sums[k + 1], np.float64) / c
    out = {}
    for i, m in enumerate(modules):
        s = np.asarray(parts[i], np.float64) + (noise[i] if noise is not None else 0.0)
        if weighted:
            n = max(int(round(w[i] * max_rows[m])), 1)
            out[f"{m}.ss"], out[f"{m}.n"] = np.maximum(s, 0.0) * max_rows[m], np.array([n], np.int64)
        else:
            out[f"{m}.ss"], out[f"{m}.n"] = np.maximum(s, 0.0), np.array([1], np.int64)
    return out, {"clipped": int(round(float(aux[0]))), "weight": float(w.mean()) if k else 0.0}


def quantization_bound(c: float, quantization_range: int, nodes: int, min_weight: float) -> float:
    """Worst-case |error| of one entry of the secure weighted mean from SecAgg+ quantization.

    Each node's stochastic rounding is off by < one step s = 2c / T per entry, so a sum over n nodes
    by < n s, in the weighted values and in the weights alike; the mean S_v / S_w (|mean| <= c) is then
    off by < (n s / W) (1 + |mean| / c) <= 2 n s / W, W the smallest summed weight of an entry."""
    if min_weight <= 0:
        return float("inf")
    return 4.0 * nodes * c / (quantization_range * min_weight)


def grad_contribution(grads: Mapping[str, np.ndarray], modules: Sequence[str], scale: float,
                      bound: float) -> tuple[list[np.ndarray], bool]:
    """One node's gradient sums ('<m>.g') / scale, clipped as one vector to norm <= bound (float64);
    (parts, whether it was clipped). Dividing by the public calib-size keeps the bound model-size free of
    how many examples a node holds: honest nodes of the embedded ViT are at ~1.5 (default bound 10)."""
    return clip_norm([np.asarray(grads[f"{m}.g"], np.float64) / scale for m in modules], bound)


def clip_grads(grads: Mapping[str, np.ndarray], modules: Sequence[str], scale: float,
               bound: float) -> tuple[dict[str, np.ndarray], bool]:
    """One node's gradient sums with the clip of `grad_contribution`, back in the wire form (float64):
    the plain statistics phase bounds one node's pull on |Σ| the same way the private phases do, so a
    run without noise gives the same mask in every mode; honest nodes under the bound are unchanged."""
    parts, clipped = grad_contribution(grads, modules, scale, bound)
    return {f"{m}.g": part * scale if clipped else np.asarray(grads[f"{m}.g"], np.float64)
            for m, part in zip(modules, parts)}, clipped


def grad_secure(grads: Mapping[str, np.ndarray], modules: Sequence[str], scale: float, bound: float,
                c: float) -> list[np.ndarray]:
    """`grad_contribution` as the vectors a node feeds into a secure sum: scaled by c / bound, plus [c * clipped]."""
    if not bound > 0:
        raise ValueError(f"grad-clip-norm must be > 0, got {bound}")
    parts, clipped = grad_contribution(grads, modules, scale, bound)
    return [p * (c / bound) for p in parts] + [np.array([c * float(clipped)])]


def grad_shapes(shapes: Mapping[str, tuple[int, int]], modules: Sequence[str]) -> list[tuple[int, ...]]:
    return [tuple(shapes[m]) for m in modules] + [(1,)]


def grad_pooled(sums: Sequence[np.ndarray], modules: Sequence[str], scale: float, bound: float, c: float,
                noise: Sequence[np.ndarray] | None = None) -> tuple[dict[str, np.ndarray], int]:
    """Pooled gradient sums ('<m>.g', float64) from a secure sum of `grad_secure` vectors (+ noise, in the
    units of `grad_contribution`): exactly Σ_nodes Σ dL/dW when no node was clipped; (sums, clipped count)."""
    out = {}
    for i, m in enumerate(modules):
        s = np.asarray(sums[i], np.float64) * (bound / c) + (noise[i] if noise is not None else 0.0)
        out[f"{m}.g"] = s * scale
    return out, int(round(float(np.asarray(sums[len(modules)]).reshape(-1)[0]) / c))
