"""Streaming input-activation statistics (Wanda's per-feature norm), summable across devices.

For every eligible module we keep the sum over all rows (tokens / spatial positions) of the
square of each input feature, and the row count. Nothing else is stored: activations are
reduced inside the forward hook. Sums (not means) travel between clients, so the pooled
statistic of a federation is the plain sum of the clients' statistics.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class FeatureStats:
    """Sum of squares per input feature of one Linear / Conv2d, plus the number of rows.

    Linear: ss has shape (in_features,). Conv2d: ss has shape (in_channels, kh, kw): entry
    (c, u, v) is the squared norm of the unfolded input feature that weight W[:, c', u, v]
    multiplies (exact, computed from shifted strided views, never unfolding).
    """

    def __init__(self, module: nn.Module):
        if isinstance(module, nn.Linear):
            shape: tuple[int, ...] = (module.in_features,)
        elif isinstance(module, nn.Conv2d):
            shape = (module.in_channels, *module.kernel_size)
        else:
            raise TypeError(f"FeatureStats supports nn.Linear and nn.Conv2d, got {type(module).__name__}")
        self.module = module
        self._ss = torch.zeros(shape, dtype=torch.float64)
        self._maps: dict[tuple[int, int], torch.Tensor] = {}  # Conv2d: input (H, W) -> pending summed map
        self._out: dict[tuple[int, int], tuple[int, int]] = {}  # Conv2d: input (H, W) -> output (Ho, Wo)
        self._linear = isinstance(module, nn.Linear)
        self.n = 0

    @property
    def ss(self) -> torch.Tensor:
        """Sums of squares per feature (float64); folds in any pending Conv2d maps first."""
        if self._maps:
            self._flush()
        return self._ss

    @ss.setter
    def ss(self, value: torch.Tensor) -> None:
        self._maps.clear()
        self._ss = value

    def _flush(self) -> None:
        """Conv2d: turn each pending batch-summed (C, H, W) map of squares into the (C, kh, kw)
        sums: pad it, then sum the kh*kw shifted strided views (the output grid seen from each
        kernel offset). A map is batch-size times smaller than the activations it summarises,
        and it is reduced once per input shape, not once per batch."""
        m = self.module
        (kh, kw), (sh, sw), (dh, dw) = m.kernel_size, m.stride, m.dilation
        pad = m._reversed_padding_repeated_twice
        for key, s in self._maps.items():
            s = F.pad(s, pad) if any(pad) else s
            ho, wo = self._out_hw(key)
            out = torch.stack([s[:, u * dh: u * dh + sh * (ho - 1) + 1: sh, v * dw: v * dw + sw * (wo - 1) + 1: sw].sum((1, 2))
                               for u in range(kh) for v in range(kw)], 1)
            self._ss += out.reshape(m.in_channels, kh, kw).cpu()
        self._maps.clear()

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        if self._linear:
            x2 = x.detach().reshape(-1, x.shape[-1]).double()  # float64 sums: pooled == central, to the bit
            self._ss += torch.square(x2).sum(0).cpu()
            self.n += x2.shape[0]
            return
        x = x.detach()
        if x.dim() == 3:
            x = x.unsqueeze(0)
        # Conv2d: a float64 (C, H, W) map per input shape; the per-offset sums over that
        # batch-size times smaller map are taken once, when `ss` is read (_flush), instead of
        # re-reading the whole batch kh*kw times per batch. (torch.linalg.vector_norm over dim 0
        # would avoid the x**2 temporary but is ~15x slower on CPU.) Zero padding adds zeros either way.
        key = (x.shape[2], x.shape[3])
        s = torch.square(x.float()).sum(0)
        acc = self._maps.get(key)
        if acc is None:
            self._maps[key] = s.double()
        else:
            acc += s
        ho, wo = self._out_hw(key)
        self.n += x.shape[0] * ho * wo

    def _out_hw(self, key: tuple[int, int]) -> tuple[int, int]:
        """The Conv2d's output (height, width) for an unpadded (H, W) input (cached per shape)."""
        hw = self._out.get(key)
        if hw is None:
            m = self.module
            (kh, kw), (sh, sw), (dh, dw) = m.kernel_size, m.stride, m.dilation
            l, r, t, b = m._reversed_padding_repeated_twice
            hw = ((key[0] + t + b - dh * (kh - 1) - 1) // sh + 1, (key[1] + l + r - dw * (kw - 1) - 1) // sw + 1)
            self._out[key] = hw
        return hw

    def norm(self) -> torch.Tensor:
        """Per-feature L2 norm normalised by rows, sqrt(ss / n) (float32)."""
        if self.n == 0:
            raise RuntimeError("no calibration data was seen by this module; run batches through the model first")
        return (self.ss / self.n).sqrt().float()


class StatsCollector:
    """Forward pre-hooks on named modules that feed FeatureStats; use as a context manager."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.stats = {name: FeatureStats(mod) for name, mod in modules.items()}
        self._handles = []
        for name, mod in modules.items():
            st = self.stats[name]
            self._handles.append(mod.register_forward_pre_hook(lambda _m, args, st=st: st.add_batch(args[0])))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> "StatsCollector":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def state(self) -> dict[str, np.ndarray]:
        return stats_to_arrays(self.stats)


def collect_stats(model: nn.Module, modules: dict[str, nn.Module], batches: Iterable) -> dict[str, FeatureStats]:
    """Run calibration batches (tensors or (x, y) pairs) through the model under no_grad."""
    was_training = model.training
    model.eval()
    with StatsCollector(modules) as col, torch.no_grad():
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x)
    model.train(was_training)
    return col.stats


def stats_to_arrays(stats: dict[str, FeatureStats]) -> dict[str, np.ndarray]:
    """Flat wire form: '<name>.ss' float64 arrays and '<name>.n' int64 scalars-as-arrays."""
    out: dict[str, np.ndarray] = {}
    for name in sorted(stats):
        out[f"{name}.ss"] = stats[name].ss.numpy().copy()
        out[f"{name}.n"] = np.array([stats[name].n], dtype=np.int64)
    return out


def sum_stats(arrays: Iterable[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Pool statistics from several devices: element-wise sums of ss and n (same keys required)."""
    total: dict[str, np.ndarray] | None = None
    for i, arr in enumerate(arrays):
        if total is None:
            total = {k: np.array(v, copy=True) for k, v in arr.items()}
            continue
        if set(arr) != set(total):
            raise ValueError(f"statistics #{i} has keys {sorted(set(arr) ^ set(total))[:5]} that the others lack")
        for k, v in arr.items():
            if np.shape(v) != total[k].shape:
                raise ValueError(f"statistics #{i}: '{k}' has shape {np.shape(v)}, expected {total[k].shape}")
            if k.endswith(".n"):  # row counts: exact integer sum, refused rather than wrapped past int64
                n = int(total[k][0]) + int(np.asarray(v).reshape(-1)[0])
                if n > np.iinfo(np.int64).max:
                    raise ValueError(f"statistics #{i}: summed row count of '{k}' exceeds int64")
                total[k] = np.array([n], dtype=np.int64)
            else:
                total[k] = total[k] + v
    if total is None:
        raise ValueError("sum_stats needs at least one set of statistics")
    return total


def median_stats(arrays: Iterable[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Robust pooling: per column, the median over devices of the mean square ss/n, scaled by the
    total row count. One device can move a column's value only within the others' range (with
    three or more devices); with honest, similar devices it is close to `sum_stats`."""
    arrays = list(arrays)
    total = sum_stats(arrays)
    for k in total:
        if k.endswith(".ss"):
            n_key = k[:-3] + ".n"
            ms = np.stack([np.asarray(a[k], np.float64) / int(np.asarray(a[n_key]).reshape(-1)[0]) for a in arrays])
            total[k] = np.median(ms, axis=0) * float(total[n_key][0])
    return total


def arrays_to_norms(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """sqrt(ss / n) per module from the wire form."""
    norms = {}
    for key in arrays:
        if key.endswith(".ss"):
            name = key[:-3]
            n = int(np.asarray(arrays[f"{name}.n"]).reshape(-1)[0])
            if n <= 0:
                raise ValueError(f"statistics for '{name}' have row count {n}; expected > 0")
            norms[name] = torch.from_numpy(np.sqrt(arrays[key] / n)).float()
    return norms
