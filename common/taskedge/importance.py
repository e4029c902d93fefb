"""Per-entry importance scores: TaskEdge's |W| * ||X_j||, a damped variant and the ablations.

`taskedge-sqrt` = |W| * ||X_j||^(1/2): the paper's score shares one ||X_j|| per input column among
all rows, so under neuron-level allocation every row picks the same few high-activation columns;
the square root keeps the activation signal but lets |W| decide more often.

Every score is returned as a (rows, width) matrix over the module's weight viewed as
`weight.reshape(out, -1)`: Linear (out, in); Conv2d (out, in/groups * kh * kw), the order of
`weight.flatten(1)`. Ranking and allocation only ever see this 2-D view.
"""
from __future__ import annotations

import torch
from torch import nn

from .scores import get_score


def row_norms(module: nn.Module, norm: torch.Tensor) -> torch.Tensor:
    """Broadcast per-feature activation norms to the (rows, width) view of the weight.

    Conv2d weight W[o, c', u, v] of group g = o // (out / groups) reads input channel
    g * (in / groups) + c' at kernel offset (u, v).
    """
    if isinstance(module, nn.Linear):
        if norm.shape != (module.in_features,):
            raise ValueError(f"norm has shape {tuple(norm.shape)}, expected ({module.in_features},)")
        return norm.reshape(1, -1).expand(module.out_features, -1)
    if isinstance(module, nn.Conv2d):
        expected = (module.in_channels, *module.kernel_size)
        if tuple(norm.shape) != expected:
            raise ValueError(f"norm has shape {tuple(norm.shape)}, expected {expected}")
        g = module.groups
        per_group = norm.reshape(g, -1)  # (groups, in/groups * kh * kw)
        return per_group.repeat_interleave(module.out_channels // g, dim=0)
    raise TypeError(f"importance supports nn.Linear and nn.Conv2d, got {type(module).__name__}")


def importance(module: nn.Module, norm: torch.Tensor | None, method: str = "taskedge",
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Score matrix (rows, width), float32. `norm` may be None only for magnitude / random."""
    score = get_score(method)
    if score.fn is None:
        raise ValueError(f"score={method!r} is computed from calibration gradients (common.taskedge.gradient_score), "
                         "not from weights and norms")
    w = module.weight.detach().float()
    w2 = w.reshape(w.shape[0], -1).abs()
    act = None
    if score.needs_stats:
        if norm is None:
            raise ValueError(f"score={method!r} needs activation statistics (run calibration batches first)")
        act = row_norms(module, norm.float().to(w2.device))
    return score.fn(w2, act, generator)
