"""A user's image data: an ImageFolder, a saved Hugging Face Dataset / DatasetDict, or (online) a hub name.

`inspect_data` reads only the layout (folders, json metadata; no torch, no images), so check_config can
answer a wrong path, a folder without class sub-folders or a single class in well under a second.
`load_data` reads one split as tensors with the model's preprocessing (`common/preprocess.py`).

Splits: the ones a dataset has are used — a DatasetDict's `train` / `validation` (or `val`) / `test`, an
ImageFolder's `train/`, `val/` (or `validation/`), `test/` sub-trees. What is missing is carved once,
deterministically (seed 0, the same on every node and on the server): from a single pool, 20 % test and 10 %
validation; from a train split without validation, 10 % of it. Classes: an ImageFolder's sub-folder names,
a dataset's `ClassLabel` names (else its label values as text). Every image is converted to RGB (grayscale,
RGBA and palette images alike); files that are not images by extension are ignored and counted, an image
that cannot be decoded is skipped and counted, and a split with no readable image is an error naming the
first bad file.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
SPLIT_NAMES = {"train": ("train",), "val": ("val", "validation", "valid"), "test": ("test",)}
TEST_FRACTION, VAL_FRACTION = 0.2, 0.1


class DataError(ValueError):
    """A data-path that cannot be used, in one line naming the path and the expected layout."""


@dataclass(frozen=True)
class DataInfo:
    path: str
    kind: str                     # "imagefolder" | "hf-saved" | "hf-hub"
    class_names: tuple[str, ...]
    splits: dict[str, str] = field(default_factory=dict)  # "train"/"val"/"test" -> where it is ("" = carved)
    ignored: int = 0              # files that are not images, by extension


class Split(NamedTuple):
    x: "object"                   # float32 tensor (n, 3, s, s), preprocessed
    y: "object"                   # int64 tensor (n,), indices into class_names
    class_names: list[str]
    corrupt: int                  # images skipped because they could not be decoded


LAYOUT = ("an ImageFolder (<path>/<class>/<images>, optionally under train/ val/ test/) or a saved Hugging Face "
          "dataset folder")


def _is_hf_saved(path: Path) -> bool:
    return any((path / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _class_dirs(path: Path) -> list[Path]:
    return sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))


def _images(folder: Path) -> tuple[list[Path], int]:
    files = sorted(f for f in folder.rglob("*") if f.is_file() and not f.name.startswith("."))
    images = [f for f in files if f.suffix.lower() in IMAGE_EXTENSIONS]
    return images, len(files) - len(images)


def _split_dirs(path: Path) -> dict[str, Path]:
    subs = {d.name.lower(): d for d in _class_dirs(path)}
    return {split: subs[n] for split, names in SPLIT_NAMES.items() for n in names if n in subs}


def _hf_label_names(info_file: Path) -> list[str] | None:
    feats = json.loads(info_file.read_text()).get("features", {}) if info_file.is_file() else {}
    for col in ("label", "labels", "fine_label"):
        f = feats.get(col)
        if isinstance(f, dict) and f.get("_type") == "ClassLabel" and f.get("names"):
            return [str(n) for n in f["names"]]
    return None


def _check_classes(path: Path, names: list[str]) -> None:
    if len(names) < 2:
        raise DataError(f"data-path '{path}': {'one class only (' + repr(names[0]) + ')' if names else 'no classes'}; "
                        f"a classifier needs at least 2")


def inspect_data(path: str | os.PathLike) -> DataInfo:
    """The layout of `path` and its class names, from the file system and json metadata only."""
    p = Path(path).expanduser()
    if not p.exists():
        if not str(path).startswith(("/", ".", "~")) and "/" in str(path) and not os.environ.get("HF_HUB_OFFLINE"):
            return _inspect_hub(str(path))
        raise DataError(f"data-path '{path}': no such file or folder (expected {LAYOUT})")
    if not p.is_dir():
        raise DataError(f"data-path '{path}' is a file; expected {LAYOUT}")
    if _is_hf_saved(p):
        return _inspect_hf_saved(p)
    splits = _split_dirs(p)
    root = splits.get("train", p)
    classes = _class_dirs(root)
    if not classes:
        raise DataError(f"data-path '{path}': no class sub-folders (expected {LAYOUT})")
    names = [d.name for d in classes]
    ignored = 0
    for d in classes:
        images, other = _images(d)
        ignored += other
        if not images:
            raise DataError(f"data-path '{path}': class '{d.name}' has no images ({', '.join(IMAGE_EXTENSIONS)})")
    _check_classes(p, names)
    return DataInfo(str(p), "imagefolder", tuple(names),
                    {s: str(splits[s]) if s in splits else "" for s in SPLIT_NAMES}, ignored)


def _inspect_hf_saved(p: Path) -> DataInfo:
    if (p / "dataset_dict.json").is_file():
        names = json.loads((p / "dataset_dict.json").read_text()).get("splits", [])
        found = {split: n for split, options in SPLIT_NAMES.items() for n in names if n in options}
        if "train" not in found:
            raise DataError(f"data-path '{p}': a DatasetDict without a 'train' split (has {', '.join(names)})")
        labels = _hf_label_names(p / found["train"] / "dataset_info.json")
        splits = {s: str(p / found[s]) if s in found else "" for s in SPLIT_NAMES}
    else:
        labels, splits = _hf_label_names(p / "dataset_info.json"), {s: "" for s in SPLIT_NAMES}
    if labels is None:  # labels without names: their values are the names (reads the label column once)
        labels = _hf_value_names(p)
    _check_classes(p, labels)
    return DataInfo(str(p), "hf-saved", tuple(labels), splits)


def _inspect_hub(name: str) -> DataInfo:
    import datasets

    builder = datasets.load_dataset_builder(name)
    names = _hf_label_names_from_features(builder.info.features)
    if names is None:
        raise DataError(f"data-path '{name}': the hub dataset has no ClassLabel column 'label'")
    _check_classes(Path(name), names)
    have = set(builder.info.splits or {})
    return DataInfo(name, "hf-hub", tuple(names),
                    {s: next((n for n in options if n in have), "") for s, options in SPLIT_NAMES.items()})


def _hf_label_names_from_features(features) -> list[str] | None:
    import datasets

    for col in ("label", "labels", "fine_label"):
        f = (features or {}).get(col)
        if isinstance(f, datasets.ClassLabel):
            return list(f.names)
    return None


def _hf_value_names(p: Path) -> list[str]:
    import datasets

    ds = datasets.load_from_disk(str(p))
    ds = ds["train"] if isinstance(ds, datasets.DatasetDict) else ds
    col = next((c for c in ("label", "labels", "fine_label") if c in ds.column_names), None)
    if col is None:
        raise DataError(f"data-path '{p}': no label column (label, labels or fine_label) in {ds.column_names}")
    return [str(v) for v in sorted(set(ds[col]))]


# ---------------------------------------------------------------------------------------------- loading
def _carve(n: int, split: str, has_val: bool, has_test: bool) -> list[int]:
    """Indices of `split` in a pool of n that lacks the missing splits (seed 0: the same everywhere)."""
    import numpy as np

    order = np.random.RandomState(0).permutation(n).tolist()
    n_test = 0 if has_test else int(round(n * TEST_FRACTION))
    n_val = 0 if has_val else int(round(n * VAL_FRACTION))
    parts = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
    return sorted(parts[split])


def load_data(path: str | os.PathLike, split: str, preprocess) -> Split:
    """One split ("train", "val" or "test") of a user's data as preprocessed tensors."""
    if split not in SPLIT_NAMES:
        raise ValueError(f"split must be one of {', '.join(SPLIT_NAMES)}, got {split!r}")
    info = inspect_data(path)
    where = info.splits.get(split, "")
    has_val, has_test = bool(info.splits.get("val")), bool(info.splits.get("test"))
    source = where or (info.splits.get("train") if info.splits.get("train") else info.path)
    carve = None if where else (split, has_val, has_test)
    if info.kind == "imagefolder":
        return _load_folder(Path(source), list(info.class_names), preprocess, carve)
    return _load_hf(info, source, preprocess, carve)


def _decode(files: list, preprocess) -> tuple[list, list[int], int]:
    """Preprocessed tensors of the images that decode, their positions, and how many did not."""
    from PIL import Image, UnidentifiedImageError

    transform, out, kept, bad = preprocess.transform(), [], [], []
    for i, f in enumerate(files):
        try:
            with (Image.open(f) if isinstance(f, (str, Path)) else f) as im:
                out.append(transform(im.convert("RGB")))
            kept.append(i)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
            bad.append(f)
    if files and not out:
        raise DataError(f"no readable image: {bad[0] if isinstance(bad[0], (str, Path)) else 'row 0'} and "
                        f"{len(bad) - 1} more could not be decoded")
    return out, kept, len(bad)


def _load_folder(root: Path, names: list[str], preprocess, carve) -> Split:
    import torch

    files, labels = [], []
    for k, name in enumerate(names):
        d = root / name
        if not d.is_dir():
            continue  # a class absent from this split
        images, _ = _images(d)
        files += images
        labels += [k] * len(images)
    if carve is not None:
        keep = _carve(len(files), *carve)
        files, labels = [files[i] for i in keep], [labels[i] for i in keep]
    tensors, kept, corrupt = _decode(files, preprocess)
    y = torch.tensor([labels[i] for i in kept], dtype=torch.int64)
    x = torch.stack(tensors) if tensors else torch.zeros(0, 3, preprocess.img_size, preprocess.img_size)
    return Split(x, y, names, corrupt)


def _load_hf(info: DataInfo, source: str, preprocess, carve) -> Split:
    import datasets
    import numpy as np
    import torch

    if info.kind == "hf-hub":
        ds = datasets.load_dataset(info.path, split=source if source != info.path else "train")
    else:
        ds = datasets.load_from_disk(source)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"]
    image_col = next((c for c in ("image", "img", "pixel_values") if c in ds.column_names), None)
    label_col = next((c for c in ("label", "labels", "fine_label") if c in ds.column_names), None)
    if image_col is None or label_col is None:
        raise DataError(f"data-path '{info.path}': need an image and a label column, found {ds.column_names}")
    index = list(range(len(ds))) if carve is None else _carve(len(ds), *carve)
    names = list(info.class_names)
    raw = ds.select(index)
    labels = list(raw[label_col])
    if _hf_label_names_from_features(ds.features) is None:  # values are the names (see inspect_data)
        labels = [names.index(str(v)) for v in labels]
    if isinstance(ds.features[image_col], datasets.Image):
        tensors, kept, corrupt = _decode(list(raw[image_col]), preprocess)
        x = torch.stack(tensors) if tensors else torch.zeros(0, 3, preprocess.img_size, preprocess.img_size)
    else:  # arrays already: resized to the model's size, taken as normalised
        x = torch.from_numpy(np.asarray(raw.with_format("numpy")[image_col], dtype=np.float32))
        if x.shape[-1] != preprocess.img_size:
            x = torch.nn.functional.interpolate(x, size=(preprocess.img_size,) * 2, mode="bilinear",
                                                align_corners=False)
        kept, corrupt = list(range(len(x))), 0
    return Split(x, torch.tensor([int(labels[i]) for i in kept], dtype=torch.int64), names, corrupt)
