"""Masked aggregation: a sample-weighted mean per entry over the clients that trained it.

A client with a smaller budget trains a nested subset of the global mask, so its reply covers
only some positions of the global value vector. Every entry is therefore averaged with its own
denominator (the summed weights of the clients that trained it). An untrained entry never
counts as zero, and an entry nobody trained keeps its previous value. Dense arrays (the head,
or every array of the baselines) are the special case "positions = everything".

The server optimizer is a separate seam: aggregation yields (average, coverage) and
`ServerOptimizer.step` turns that into the next global state (FedAvg = take the average;
FedAvgM = momentum on the pseudo-gradient, as in Hsu et al. 2019; FedAdam would slot in here).
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


class ServerOptimizer:
    """Seam for server-side optimizers: next global = step(current, average, coverage)."""

    def step(self, current: Arrays, average: Arrays, coverage: dict[str, np.ndarray]) -> Arrays:
        raise NotImplementedError

    def state(self) -> Arrays:
        """Arrays to checkpoint (e.g. momentum buffers), keyed by global key."""
        return {}

    def load_state(self, arrays: Arrays) -> None:
        """Restore from `state()` (resume)."""

    def reset(self) -> None:
        """Forget buffers (the global vector changed meaning, e.g. after re-reconciliation)."""


class FedAvgOpt(ServerOptimizer):
    """Plain FedAvg: the new global is the (masked) average."""

    def step(self, current, average, coverage):
        return {k: average[k] for k in current}


class FedAvgMOpt(ServerOptimizer):
    """Server momentum on the pseudo-gradient current - average, only where someone trained."""

    def __init__(self, lr: float = 1.0, momentum: float = 0.9):
        self.lr, self.momentum = lr, momentum
        self.buf: Arrays = {}

    def step(self, current, average, coverage):
        new = {}
        for k, cur in current.items():
            hit = coverage[k] > 0
            prev = self.buf.get(k)
            if prev is None or prev.shape != cur.shape:
                prev = np.zeros(cur.shape, np.float32)
            buf = np.where(hit, self.momentum * prev + (cur - average[k]), prev).astype(np.float32)
            self.buf[k] = buf
            new[k] = np.where(hit, cur - self.lr * buf, cur).astype(cur.dtype)
        return new

    def state(self):
        return {k: v.copy() for k, v in self.buf.items()}

    def load_state(self, arrays):
        self.buf = {k: np.asarray(v, dtype=np.float32).copy() for k, v in arrays.items()}

    def reset(self):
        self.buf = {}


def make_server_optimizer(name: str, lr: float = 1.0, momentum: float = 0.9) -> ServerOptimizer:
    if name == "fedavg":
        return FedAvgOpt()
    if name == "fedavgm":
        return FedAvgMOpt(lr, momentum)
    raise ValueError(f"unknown server optimizer {name!r}")
