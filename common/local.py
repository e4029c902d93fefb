"""What one node computes, as plain functions (no Flower imports): statistics, vote, train, eval.

The ClientApp handlers only unpack messages, call these and pack the replies, so the same code
runs in simulation, in deployment and in the in-process federation of tests and benchmarks; the
server's centralised evaluation uses `local_eval` too.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from common.taskedge.config import TaskEdgeConfig
from common.taskedge.stats import arrays_to_norms, collect_stats, stats_to_arrays
from common.train import batches, evaluate, train_epochs
from common.taskedge.tuner import build_mask, find_head, target_modules


def local_stats(model: nn.Module, tcfg: TaskEdgeConfig, x_calib: torch.Tensor, batch_size: int) -> dict[str, np.ndarray]:
    """Calibration pass through the frozen backbone: '<module>.ss' (float64) and '<module>.n' (int64)."""
    chunks = [x_calib[i:i + batch_size] for i in range(0, len(x_calib), batch_size)]
    return stats_to_arrays(collect_stats(model, target_modules(model, tcfg), chunks))


def local_gradients(model: nn.Module, tcfg: TaskEdgeConfig, x_calib: torch.Tensor, y_calib: torch.Tensor,
                    batch_size: int) -> dict[str, np.ndarray]:
    """score='gradient': signed Σ dL/dW over the local calibration data through a locally probed head,
    '<module>.g' (rows, width) float32 for the target modules only (common.taskedge.gradient_score): half the
    bytes of float64 and no precision lost (autograd accumulated them in float32); the server adds up in float64."""
    from common.taskedge.gradient_score import calibration_gradients

    grads = calibration_gradients(model, target_modules(model, tcfg), find_head(model, tcfg.head),
                                  batches(x_calib, y_calib, batch_size, shuffle=False), signed=True)
    return {f"{n}.g": g.numpy() for n, g in grads.items()}


def local_vote(model: nn.Module, tcfg: TaskEdgeConfig, stats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This node's own top-k mask ('<module>.idx'), for `vote` reconciliation."""
    mask = build_mask(model, tcfg, arrays_to_norms(stats))
    return {f"{n}.idx": mask.indices[n].numpy().astype(np.int64) for n in mask.names()}


def local_train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, batch_size: int,
                lr: float, seed: int, head_lr: float | None = None) -> dict[str, float]:
    """E local epochs of AdamW on what the method left trainable (values + head for taskedge).

    `head_lr` is the dense head's rate; None = the rate `method_model` attached to the model
    (the run config's `head-lr`), else `lr`."""
    torch.manual_seed(seed)
    return train_epochs(model, x, y, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, head_lr=head_lr)


def local_eval(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    return evaluate(model, x, y) if len(x) else {"loss": 0.0, "acc": 0.0, "examples": 0}
