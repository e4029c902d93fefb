"""Reconciliation: from the clients' statistics (or votes) to one global TaskEdge mask.

`stats` (default) is exact: |W| is identical on every client (same pre-trained model) and the
activation statistic is a sum, so summing the clients' (ss, n) and building the mask on the
server's own copy of the model gives exactly the mask that pooled calibration data would give.

`vote`: every client sends its local top-k mask; an entry's score is its vote count, ties
broken by the summed local score |W| * sum_c ||X_j||_c (importance is linear in the norm).
The allocation (k per row, leftovers by score) is then the usual neuron-level one.

Heterogeneous budgets use the nested property of the allocation: a client with budget rank
k_c trains `mask.subset(k_c)` (see `common.wire`).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from common.taskedge.allocation import Mask, allocate
from common.taskedge.config import TaskEdgeConfig
from common.taskedge.stats import arrays_to_norms, median_stats, sum_stats
from common.taskedge.tuner import build_mask, mask_size, score_modules


def stats_mask(model: nn.Module, tcfg: TaskEdgeConfig, stats: Sequence[dict[str, np.ndarray]],
               pooling: str = "sum") -> Mask:
    """Global mask from the clients' statistics: exact with `sum`; `median` bounds each client's pull.

    score='gradient': the '<module>.g' signed gradient sums are added up over clients (also under
    `median`, which bounds the activation statistics only) and the score is |Σ|."""
    pool = {"sum": sum_stats, "median": median_stats}[pooling]
    pooled = pool(stats) if stats else None
    norms = arrays_to_norms(pooled) if pooled else None
    grads = ({k[:-2]: torch.from_numpy(np.abs(v)).float() for k, v in pooled.items() if k.endswith(".g")}
             if pooled else None)
    return build_mask(model, tcfg, norms, grads or None)


def vote_mask(model: nn.Module, tcfg: TaskEdgeConfig, stats: Sequence[dict[str, np.ndarray]],
              votes: Sequence[dict[str, np.ndarray]]) -> Mask:
    """Per-entry vote count over the clients' local top-k; ties by summed local score."""
    if not votes:
        raise ValueError("vote reconciliation needs at least one client's votes")
    norm_sum: dict[str, torch.Tensor] | None = None
    if stats:
        norm_sum = {}
        for st in stats:
            for name, norm in arrays_to_norms(st).items():
                norm_sum[name] = norm_sum[name] + norm if name in norm_sum else norm.clone()
    summed = score_modules(model, tcfg, norm_sum)
    top = max(float(s.max()) for s in summed.values())
    combined = {}
    for name, s in summed.items():
        count = np.zeros(s.numel(), dtype=np.float64)
        for v in votes:
            count[np.asarray(v[f"{name}.idx"], dtype=np.int64)] += 1.0
        tie = (s.double() / top * 0.5 if top > 0 else torch.zeros_like(s, dtype=torch.float64)).reshape(-1)
        combined[name] = (torch.from_numpy(count) + tie).reshape(s.shape)
    return allocate(combined, mask_size(model, tcfg, combined), tcfg.allocation)
