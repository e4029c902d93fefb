"""Images that were not generated here, as a task's tensors; and tensors as a Hugging Face dataset.

Thin wrappers of ``common.userdata`` (the one loader of a user's data) that resize and normalise like
a built-in task, so a user's folder or a Hugging Face dataset can replace the generated data without
touching the model; ``to_hf_dataset``/``from_hf_dataset`` let flwr-datasets partitioners split tensors.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from common.data.tasks import DEFAULT_TASK, TaskSpec, as_spec

__all__ = ["from_hf_dataset", "load_hf_dataset", "load_image_folder", "task_preprocess", "to_hf_dataset"]


def to_hf_dataset(x: torch.Tensor, y: torch.Tensor, class_names: list[str] | None = None):
    """Wrap tensors as a ``datasets.Dataset`` so flwr-datasets partitioners can split them."""
    import datasets

    x_np = np.ascontiguousarray(torch.as_tensor(x).detach().cpu().numpy(), dtype=np.float32)
    y_np = torch.as_tensor(y).detach().cpu().numpy().astype(np.int64)
    if class_names is None:
        num_classes = int(y_np.max()) + 1 if y_np.size else 1
        label = datasets.ClassLabel(num_classes=num_classes)
    else:
        label = datasets.ClassLabel(names=list(class_names))
    features = datasets.Features(
        {"image": datasets.Array3D(shape=tuple(x_np.shape[1:]), dtype="float32"), "label": label}
    )
    return datasets.Dataset.from_dict({"image": x_np, "label": y_np}, features=features)


def from_hf_dataset(ds, image_column: str = "image", label_column: str = "label"):
    """Inverse of :func:`to_hf_dataset`: (float32 images, int64 labels)."""
    import datasets

    if isinstance(ds.features.get(image_column), datasets.Image):
        raise ValueError("PIL image columns need resizing/normalising: use load_image_folder() instead")
    cols = ds.with_format("numpy", columns=[image_column, label_column])[:]  # one batched read: `ds[col]` is
    x = torch.from_numpy(np.asarray(cols[image_column], dtype=np.float32))  # a lazy column formatted row by row
    y = torch.from_numpy(np.asarray(cols[label_column]).astype(np.int64))
    return x, y


def task_preprocess(task: str | TaskSpec = DEFAULT_TASK):
    """A task's preprocessing as a `common.preprocess.Preprocess`: its size and mean/std, squashed (bilinear)."""
    from common.preprocess import Preprocess

    spec = as_spec(task)
    return Preprocess(spec.image_size, tuple(spec.mean), tuple(spec.std), "bilinear", 1.0, "squash")


def _own_data(path: Path, task: str | TaskSpec, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`split` of a dataset that has its own splits (HF names too: "validation"), else all of it
    (common.userdata.load_data: RGB conversion, corrupt images skipped, one-line DataError for a bad layout)."""
    from common.userdata import SPLIT_NAMES, inspect_data, load_data

    key = next((s for s, names in SPLIT_NAMES.items() if split in names), split)
    own_splits = len(inspect_data(path).carved) < 3
    x, y, _ = load_data(path, key if own_splits and key in SPLIT_NAMES else "all", task_preprocess(task))
    return x, y


def load_hf_dataset(name: str, task: str | TaskSpec = DEFAULT_TASK, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """A Hugging Face image dataset by hub name (needs the network) or a `save_to_disk` folder (offline),
    resized and normalised like `task`."""
    if Path(name).expanduser().is_dir():
        return _own_data(Path(name).expanduser(), task, split)
    import datasets

    from common.userdata import dataset_tensors

    x, y, _ = dataset_tensors(datasets.load_dataset(name, split=split), task_preprocess(task), where=name)
    return x, y


def load_image_folder(
    path: str | os.PathLike, task: str | TaskSpec = DEFAULT_TASK, split: str = "train"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring-your-own data: an ImageFolder tree or a HF ``save_to_disk`` folder, as `task`'s images.

    Images are resized to the task's image size and normalised like the task, so they can replace the
    generated data without touching the model. A thin wrapper of `common.userdata.load_data` (which
    takes a model's own preprocessing instead): `split` of data with its own splits, else all of it.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {path}")
    return _own_data(path, task, split)
