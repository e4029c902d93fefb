"""A node's local data: its partition (simulation) or its own folder (deployment); the server's test split.

Simulation partitions the task's training split with a flwr-datasets partitioner (IID or
Dirichlet label skew), exactly as a Flower example would with a hub dataset, but over the
offline embedded task (`partitioner.dataset = hf_dataset`); `partitioner="generated"` instead lets
every node render its own examples (a fleet of thousands of nodes, no shared split in memory). Each partition is then split into
local train / test, and the first `calib-size` local training samples are the calibration
batches of the statistics round (a device calibrates on its own data).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache

import torch

from common.classes import label_map
from common.data.loading import from_hf_dataset, to_hf_dataset
from common.data.splits import make_split, node_split
from common.data.tasks import get_task
from common.settings import AppConfig


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


def _local(x: torch.Tensor, y: torch.Tensor, test_fraction: float, seed: int, partition_id: int,
           calib_size: int) -> LocalData:
    """A node's examples split into local train / test (seeded per partition); calibration = the first train ones."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed * 7919 + partition_id))
    n_test = int(round(len(x) * test_fraction))
    te, tr = order[:n_test], order[n_test:]
    return LocalData(x[tr], y[tr], x[te], y[te], min(calib_size, len(tr)))


def _partitioner(kind: str, num_partitions: int, alpha: float, seed: int):
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    if kind == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    return DirichletPartitioner(num_partitions=num_partitions, partition_by="label", alpha=alpha,
                                min_partition_size=10, self_balancing=True, seed=seed)


@lru_cache(maxsize=4)
def partitioned(task: str, kind: str, num_partitions: int, alpha: float, seed: int, source: tuple = ()):
    """One partitioner per federation setting, cached per process (Ray actors serve many nodes).
    `source`: (data path, model, img-size) of a user's dataset; () = the built-in task."""
    if source:
        x, y, names = _user_tensors(*source, "train")
    else:
        x, y = make_split(task, "train")  # the data itself is fixed; `seed` only moves the partitioning
        names = list(get_task(task).class_names)
    part = _partitioner(kind, num_partitions, alpha, seed)
    part.dataset = to_hf_dataset(x, y, names)
    return part


@lru_cache(maxsize=4)
def _user_tensors(path: str, model: str, img_size: int, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """A user's dataset split, preprocessed as `model` expects (timm's data config; `img-size` overrides),
    cached per process."""
    from common.preprocess import resolve_preprocess
    from common.userdata import load_data

    x, y, names = load_data(path, split, resolve_preprocess(model, img_size=img_size or None))[:3]
    return x, y, list(names)


def user_split(cfg: AppConfig, path: str, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    return _user_tensors(str(path), cfg.model, cfg.img_size, split)


def node_class_names(cfg: AppConfig, node_config: dict) -> list[str]:
    """The class names of this node's dataset (not only the labels its partition holds)."""
    path = str(node_config.get("data-path", "") or cfg.data_path)
    if path:
        from common.userdata import inspect_data

        return list(inspect_data(path).class_names)
    return list(get_task(cfg.task).class_names)


def node_input_size(cfg: AppConfig, node_config: dict) -> int:
    """The image size this node feeds the model: the model's preprocessing for a user's data (`img-size`
    overrides), the built-in task's own size otherwise. The server probes its statistics shapes with it."""
    if node_config.get("data-path") or cfg.data_path:
        from common.preprocess import resolve_preprocess

        return resolve_preprocess(cfg.model, cfg.img_size or None).img_size
    return cfg.img_size or get_task(cfg.task).image_size


def _to_global(y: torch.Tensor, names: list[str], cfg: AppConfig) -> torch.Tensor:
    """Labels numbered by the dataset's own class list -> the federation's (common.classes)."""
    if names == cfg.classes:
        return y
    return torch.from_numpy(label_map(names, cfg.classes))[y]


def partition_labels(task: str, kind: str, num_partitions: int, alpha: float, seed: int) -> list[list[int]]:
    """Labels of every partition (for tests and reports of the label skew)."""
    part = partitioned(task, kind, num_partitions, float(alpha), seed)
    return [list(part.load_partition(i)["label"]) for i in range(num_partitions)]


@lru_cache(maxsize=64)
def partition_tensors(task: str, kind: str, num_partitions: int, alpha: float, seed: int,
                      partition_id: int, source: tuple = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """A partition's tensors, cached per process: a simulated node is asked for its data every round.
    Public, like `partitioned`, because benchmarks/bench_dp_scale.py clears and resizes both caches."""
    part = partitioned(task, kind, num_partitions, alpha, seed, source)
    try:
        with warnings.catch_warnings():  # one line per failed Dirichlet draw otherwise; the error below says it all
            warnings.filterwarnings("ignore", message="The specified min_partition_size")
            ds = part.load_partition(partition_id)
    except ValueError as exc:  # flwr-datasets' Dirichlet sampler gives up after 10 draws
        what = f"data-path {source[0]!r}" if source else f"task {task!r}"
        raise ValueError(f"partitioner={kind!r}: could not split {what} ({len(part.dataset):,} training "
                         f"examples) into {num_partitions} partitions (alpha={alpha:g}, at least 10 examples each): "
                         f"{exc} Use fewer partitions, a larger alpha, or partitioner='iid'") from None
    return from_hf_dataset(ds)


def load_local_data(task: str, partition_id: int, num_partitions: int, *, partitioner: str = "dirichlet",
                    alpha: float = 0.5, seed: int = 0, test_fraction: float = 0.2, calib_size: int = 64,
                    source: tuple = ()) -> LocalData:
    """A simulated node's partition of the built-in task, or of a user's dataset (`source`: `partitioned`)."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is outside [0, {num_partitions})")
    x, y = partition_tensors(task, partitioner, num_partitions, float(alpha), seed, partition_id, source)
    return _local(x, y, test_fraction, seed, partition_id, calib_size)


def node_data(cfg: AppConfig, node_config: dict) -> LocalData:
    """A node's data from the run config and its node config (`partition-id`, `num-partitions`, optional
    `data-path`): a node config's data-path is the node's own dataset (its train split, preprocessed for the
    model); else the run config's data-path (or the built-in task) partitioned over the simulated nodes. The
    run config's `num-partitions`, when set, wins over the node's. Labels are mapped onto the federation's
    classes by name."""
    pid = int(node_config.get("partition-id", 0))
    parts = cfg.num_partitions or int(node_config.get("num-partitions", 1))
    own = str(node_config.get("data-path", ""))
    if own:
        x, y, names = user_split(cfg, own, "train")
        return _local(x, _to_global(y, names, cfg), cfg.test_fraction, cfg.seed, pid, cfg.calib_size)
    if cfg.partitioner == "generated":  # the node's own examples: no shared split (fleet-scale simulations)
        x, y = node_split(cfg.task, pid, cfg.examples_per_node, cfg.seed)
        return _local(x, y, cfg.test_fraction, cfg.seed, pid, cfg.calib_size)
    source = (cfg.data_path, cfg.model, cfg.img_size) if cfg.data_path else ()
    data = load_local_data(cfg.task, pid, parts, partitioner=cfg.partitioner, alpha=cfg.alpha, seed=cfg.seed,
                           test_fraction=cfg.test_fraction, calib_size=cfg.calib_size, source=source)
    if source:
        names = user_split(cfg, cfg.data_path, "train")[2]
        data.y_train, data.y_test = _to_global(data.y_train, names, cfg), _to_global(data.y_test, names, cfg)
    return data


@lru_cache(maxsize=2)
def server_test_split(task: str, n: int, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out split for centralised evaluation (disjoint from every client's data); `val` for choosing
    settings, so that nothing is ever chosen on the test split it is reported on."""
    return make_split(task, split, n=n)


def server_test_set(cfg: AppConfig) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The server's own test set: `server-data-path` (its labels mapped onto the federation's classes by name),
    else the built-in task's test split when the nodes hold the built-in task; None: no central evaluation."""
    if cfg.server_data_path:
        x, y, names = user_split(cfg, cfg.server_data_path, "test")
        return x, _to_global(y, names, cfg)
    if cfg.data_path or cfg.class_names or cfg.server_test_size <= 0:
        return None
    return server_test_split(cfg.task, cfg.server_test_size, cfg.server_split)
