"""Per-client update-norm clipping as a strategy wrapper (on by default: `clip-factor` 3).

Each valid reply's update (reply - global arrays, over every array of the record) is scaled down
to norm <= bound before the wrapped strategy averages it, so one client's update moves the model
at most `bound / n_clients`. The bound is `clip-norm` when set, else `clip-factor` x the median
update norm of the round — adaptive, so no scale has to be guessed, but an adaptive bound only
holds with at least 3 replies (with 2, the median is the mean of the two). The bound and how many
replies it clipped go into the round's record. Flower's DP wrappers clip too, but with a fixed norm
only and always together with noise; this is the robustness-only part, with Flower's own clip.

In a DP run (`private=True`) the bound is pinned to the fixed `dp-clip-norm` (server/runner.py): a
data-dependent bound in front of the noise would void the sensitivity the accountant assumes (with
norms [1, 1, 1, 10, 10] removing one small client moved a 3 x median bound from 3 to 16.5). Nor does a
private run record how many replies were clipped or the largest norm: both are un-noised functions of
single clients' data.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore.differential_privacy import compute_clip_model_update

from .recorder import RoundLog
from .validate import decoded_view


def _norm(arrays: list[np.ndarray], current: list[np.ndarray]) -> float:
    """L2 norm of the update over all arrays: (a - c) as one float32 temporary, squared and summed by numpy's
    einsum loop (float32, SIMD). Not float64 (a converted copy of every reply tripled the memory traffic: the
    norm was a quarter of the server's time at 1,000 replies; the float32 sum differs in the 7th digit, far
    below what a clipping bound means), not BLAS: Flower's `get_norm` (np.linalg.norm) took ~25 ms a call
    instead of ~0.01 ms once torch's thread pool was running (benchmarks/bench_scale.py)."""
    total = 0.0
    for a, c in zip(arrays, current):
        d = np.subtract(a, c, dtype=np.result_type(a, c, np.float32)).reshape(-1)
        total += float(np.einsum("i,i->", d, d))
    return math.sqrt(total)


class UpdateClipping(Strategy):
    def __init__(self, strategy: Strategy, log: RoundLog, clip_norm: float = 0.0, clip_factor: float = 3.0,
                 private: bool = False):
        if private and not clip_norm > 0:
            raise ValueError("a private (DP) run clips at a fixed bound only: clip_norm must be > 0")
        self.strategy, self.log, self.clip_norm, self.clip_factor = strategy, log, clip_norm, clip_factor
        self.private = private
        self._current: list[np.ndarray] = []

    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._current = arrays.to_numpy_ndarrays()
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        records = [next(iter(r.content.array_records.items())) for r in replies]
        norms = [_norm([decoded_view(a) for a in rec.values()], self._current) for _, rec in records]
        bound = self.clip_norm or (self.clip_factor * float(np.median(norms)) if norms else 0.0)
        clipped = 0
        for reply, (key, rec), norm in zip(replies, records, norms):
            if bound > 0 and norm > bound:
                arrays = rec.to_numpy_ndarrays()
                compute_clip_model_update(arrays, self._current, bound)
                reply.content[key] = ArrayRecord({k: Array(np.asarray(v, dtype=np.float32))
                                                  for k, v in zip(rec.keys(), arrays)})
                clipped += 1
        if self.private:  # the bound is public; counts and norms of single clients are not
            self.log.set(clip_bound=bound)
        else:
            self.log.set(clip_bound=bound, clipped=clipped, update_norm_max=max(norms, default=0.0))
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)
