"""Generated splits and where they are kept: ``make_split`` renders a task's split once and caches it.

The cache holds uint8 ``.npz`` arrays (never pickles) under ``$TASKEDGE_CACHE`` (default
``~/.cache/taskedge-fl``), keyed by the task's ``fingerprint``; the pre-trained weights of other
upstream tasks are cached there too (``common.backbones``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from common.data.render import generate, generate_node
from common.data.tasks import DEFAULT_TASK, SPLITS, TaskSpec, as_spec

__all__ = ["DATA_VERSION", "cache_dir", "fingerprint", "make_split", "normalize"]

DATA_VERSION = 2


def cache_dir() -> Path:
    """Where generated data and pre-trained weights live (``$TASKEDGE_CACHE``)."""
    return Path(os.environ.get("TASKEDGE_CACHE") or Path.home() / ".cache" / "taskedge-fl").expanduser()


def fingerprint(spec: TaskSpec) -> str:
    return hashlib.sha1(f"{DATA_VERSION}:{spec!r}".encode()).hexdigest()[:10]


def normalize(images_u8: np.ndarray | torch.Tensor, spec: TaskSpec) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32, normalised with the task's mean/std."""
    x = torch.as_tensor(np.asarray(images_u8)).float().div_(255.0)
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    return (x - mean) / std


def make_split(
    task: str | TaskSpec = DEFAULT_TASK, split: str = "train", n: int | None = None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic (images, labels) for one split; cached as npz after the first call.

    Splits draw from disjoint seed streams, so train/calib/test never share samples.
    """
    spec = as_spec(task)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {list(SPLITS)}")
    n = spec.split_size(split) if n is None else int(n)
    if n <= 0 or seed < 0:
        raise ValueError(f"need n > 0 and seed >= 0, got n={n}, seed={seed}")
    path = cache_dir() / "data" / f"{spec.name}-{fingerprint(spec)}-{split}-s{seed}-n{n}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            x, y = z["x"], z["y"]
    else:
        x, y = generate(spec, split, n, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, x=x, y=y)
        os.replace(tmp, path)  # atomic: concurrent clients never read a partial file
    return normalize(x, spec), torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))



def node_split(task: str | TaskSpec, node: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Node `node`'s own `n` training examples (common.data.render.generate_node), normalised; not cached:
    at fleet scale a node is sampled once in many rounds, and rendering them takes milliseconds."""
    spec = as_spec(task)
    x, y = generate_node(spec, int(node), int(n), int(seed))
    return normalize(x, spec), torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
