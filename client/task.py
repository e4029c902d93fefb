"""What a client computes, as plain functions (no Flower imports): statistics, vote, train, eval.

The ClientApp handlers only unpack messages, call these and pack the replies, so the same
code runs in simulation, in deployment and in the in-process loop of tests and benchmarks.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from common.allocation import Mask
from common.config import TaskEdgeConfig
from common.stats import arrays_to_norms, collect_stats, stats_to_arrays
from common.train import evaluate, train_epochs
from common.tuner import build_mask, target_modules

torch.set_num_threads(1)  # one core per simulated client (client-resources-num-cpus=1)

TCFG_KEYS = ("budget", "score", "allocation", "seed")


def taskedge_config(values: dict) -> TaskEdgeConfig:
    """TaskEdgeConfig from run-config / message-config values (kebab or snake keys)."""
    budget = values["budget"]
    if isinstance(budget, float) and budget >= 1 and budget.is_integer():
        budget = int(budget)
    return TaskEdgeConfig(budget=budget, score=str(values["score"]), allocation=str(values["allocation"]),
                          seed=int(values["seed"]))


def local_stats(model: nn.Module, tcfg: TaskEdgeConfig, x_calib: torch.Tensor, batch_size: int) -> dict[str, np.ndarray]:
    """Calibration pass through the frozen backbone: '<module>.ss' (float64) and '<module>.n' (int64)."""
    batches = [x_calib[i:i + batch_size] for i in range(0, len(x_calib), batch_size)]
    return stats_to_arrays(collect_stats(model, target_modules(model, tcfg), batches))


def local_vote(model: nn.Module, tcfg: TaskEdgeConfig, stats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This client's own top-k mask ('<module>.idx'), for `vote` reconciliation."""
    mask = build_mask(model, tcfg, arrays_to_norms(stats))
    return {f"{n}.idx": mask.indices[n].numpy().astype(np.int64) for n in mask.names()}


def mask_to_wire(mask: Mask) -> dict[str, np.ndarray]:
    """What a client needs of a mask: indices and weight shapes (ranks stay on the server)."""
    out = {}
    for n in mask.names():
        out[f"{n}.idx"] = mask.indices[n].numpy().astype(np.int64)
        out[f"{n}.shape"] = np.asarray(mask.shapes[n], dtype=np.int64)
    return out


def mask_from_wire(arrays: dict[str, np.ndarray]) -> Mask:
    full = dict(arrays)
    for k in list(full):
        if k.endswith(".idx"):
            full[k[:-4] + ".rank"] = np.zeros(np.shape(full[k]), np.int64)
    return Mask.from_arrays(full)  # validates dtype, order and range


def local_train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, batch_size: int,
                lr: float, seed: int) -> dict[str, float]:
    """E local epochs of AdamW on what the method left trainable (values + head for taskedge)."""
    torch.manual_seed(seed)
    return train_epochs(model, x, y, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)


def local_eval(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    return evaluate(model, x, y) if len(x) else {"loss": 0.0, "acc": 0.0, "examples": 0}
