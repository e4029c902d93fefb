"""Checkpoints and exports as safetensors (never pickle): atomic writes, strict reads.

A checkpoint holds everything needed to continue a run: the global arrays, the mask (with
ranks, for heterogeneous budgets), the server-optimizer state, the last complete round and
the mask version, plus the run config as JSON metadata.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from common.taskedge.allocation import Mask

FORMAT = "taskedge-fl-checkpoint-1"


@dataclass
class Checkpoint:
    round: int
    method: str
    arrays: dict[str, np.ndarray]
    mask: Mask | None = None
    mask_version: int = 0
    opt_state: dict[str, np.ndarray] = field(default_factory=dict)
    config: dict = field(default_factory=dict)


def _atomic_save(tensors: dict[str, np.ndarray], path: Path, metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def save_checkpoint(ck: Checkpoint, path: str | os.PathLike) -> Path:
    tensors = {f"global/{k}": v for k, v in ck.arrays.items()}
    if ck.mask is not None:
        tensors.update({f"mask/{k}": v for k, v in ck.mask.to_arrays().items()})
    tensors.update({f"opt/{k}": v for k, v in ck.opt_state.items()})
    meta = {"format": FORMAT, "round": str(ck.round), "method": ck.method, "mask_version": str(ck.mask_version),
            "order": json.dumps(list(ck.arrays)), "config": json.dumps(ck.config, sort_keys=True)}
    path = Path(path)
    _atomic_save(tensors, path, meta)
    return path


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint file or the `checkpoint.safetensors` of a run folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "checkpoint.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not a {FORMAT} file (format={meta.get('format')!r})")
        groups: dict[str, dict[str, np.ndarray]] = {"global": {}, "mask": {}, "opt": {}}
        for key in f.keys():
            group, _, name = key.partition("/")
            if group not in groups:
                raise ValueError(f"{path}: unexpected tensor '{key}'")
            groups[group][name] = f.get_tensor(key)
    order = json.loads(meta["order"])
    arrays = {k: groups["global"][k] for k in order}
    mask = Mask.from_arrays(groups["mask"]) if groups["mask"] else None
    return Checkpoint(int(meta["round"]), meta["method"], arrays, mask, int(meta["mask_version"]),
                      groups["opt"], json.loads(meta["config"]))
