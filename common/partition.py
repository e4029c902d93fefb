"""A node's local data: its partition (simulation) or its own folder (deployment); the server's test split.

Simulation partitions the task's training split with a flwr-datasets partitioner (IID or
Dirichlet label skew), exactly as a Flower example would with a hub dataset, but over the
offline embedded task (`partitioner.dataset = hf_dataset`). Each partition is then split into
local train / test, and the first `calib-size` local training samples are the calibration
batches of the statistics round (a device calibrates on its own data).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache

import torch

from common.settings import AppConfig
from common.data import from_hf_dataset, get_task, load_image_folder, make_split, to_hf_dataset


@dataclass
class LocalData:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    calib_size: int

    @property
    def x_calib(self) -> torch.Tensor:
        return self.x_train[: self.calib_size]

    @property
    def y_calib(self) -> torch.Tensor:
        return self.y_train[: self.calib_size]


def _split(x: torch.Tensor, y: torch.Tensor, test_fraction: float, seed: int) -> tuple[torch.Tensor, ...]:
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(x) * test_fraction))
    te, tr = order[:n_test], order[n_test:]
    return x[tr], y[tr], x[te], y[te]


def _partitioner(kind: str, num_partitions: int, alpha: float, seed: int):
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    if kind == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    return DirichletPartitioner(num_partitions=num_partitions, partition_by="label", alpha=alpha,
                                min_partition_size=10, self_balancing=True, seed=seed)


@lru_cache(maxsize=4)
def _partitioned(task: str, kind: str, num_partitions: int, alpha: float, seed: int):
    """One partitioner per federation setting, cached per process (Ray actors serve many nodes)."""
    x, y = make_split(task, "train")  # the data itself is fixed; `seed` only moves the partitioning
    part = _partitioner(kind, num_partitions, alpha, seed)
    part.dataset = to_hf_dataset(x, y, list(get_task(task).class_names))
    return part


def partition_labels(task: str, kind: str, num_partitions: int, alpha: float, seed: int) -> list[list[int]]:
    """Labels of every partition (for tests and reports of the label skew)."""
    part = _partitioned(task, kind, num_partitions, float(alpha), seed)
    return [list(part.load_partition(i)["label"]) for i in range(num_partitions)]


@lru_cache(maxsize=64)
def _partition_tensors(task: str, kind: str, num_partitions: int, alpha: float, seed: int,
                       partition_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A partition's tensors, cached per process: a simulated node is asked for its data every round."""
    part = _partitioned(task, kind, num_partitions, alpha, seed)
    try:
        with warnings.catch_warnings():  # one line per failed Dirichlet draw otherwise; the error below says it all
            warnings.filterwarnings("ignore", message="The specified min_partition_size")
            ds = part.load_partition(partition_id)
    except ValueError as exc:  # flwr-datasets' Dirichlet sampler gives up after 10 draws
        raise ValueError(f"partitioner={kind!r}: could not split task {task!r} ({len(part.dataset):,} training "
                         f"examples) into {num_partitions} partitions (alpha={alpha:g}, at least 10 examples each): "
                         f"{exc} Use fewer partitions, a larger alpha, or partitioner='iid'") from None
    return from_hf_dataset(ds)


def load_local_data(task: str, partition_id: int, num_partitions: int, *, partitioner: str = "dirichlet",
                    alpha: float = 0.5, seed: int = 0, test_fraction: float = 0.2, calib_size: int = 64,
                    data_path: str = "") -> LocalData:
    """The node's data. `data_path` (deployment) wins over the simulated partition."""
    if data_path:
        x, y = load_image_folder(data_path, task, "train")
    else:
        if not 0 <= partition_id < num_partitions:
            raise ValueError(f"partition-id {partition_id} is outside [0, {num_partitions})")
        x, y = _partition_tensors(task, partitioner, num_partitions, float(alpha), seed, partition_id)
    x_tr, y_tr, x_te, y_te = _split(x, y, test_fraction, seed * 7919 + partition_id)
    return LocalData(x_tr, y_tr, x_te, y_te, min(calib_size, len(x_tr)))


def node_data(cfg: AppConfig, node_config: dict) -> LocalData:
    """A node's data from the run config and its node config (`partition-id`, `num-partitions`,
    optional `data-path`); the run config's `num-partitions`, when set, wins over the node's."""
    pid = int(node_config.get("partition-id", 0))
    parts = cfg.num_partitions or int(node_config.get("num-partitions", 1))
    return load_local_data(cfg.task, pid, parts, partitioner=cfg.partitioner, alpha=cfg.alpha, seed=cfg.seed,
                           test_fraction=cfg.test_fraction, calib_size=cfg.calib_size,
                           data_path=str(node_config.get("data-path", "")))


@lru_cache(maxsize=2)
def server_test_split(task: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out split for centralised evaluation (disjoint from every client's data)."""
    return make_split(task, "test", n=n)
