"""A user's image data: an ImageFolder, a saved Hugging Face Dataset / DatasetDict, or (online) a hub name.

    info = inspect_data("my_images/")     # layout, class names, split sizes: no torch, no image decoded
    x, y, class_names = load_data("my_images/", "train", resolve_preprocess("resnet18"))

`inspect_data` reads only the layout (folders, json metadata, arrow row counts; no torch, no images), so
check_config can answer a wrong path, a folder without class sub-folders, an empty class or a single class
in well under a second, with one line (`DataError`) naming the path and the expected layout.
`load_data` reads one split as tensors with the model's preprocessing (`common/preprocess.py`).

Splits: the ones a dataset has are used — a DatasetDict's `train` / `validation` (or `val`, `valid`) / `test`,
an ImageFolder's `train/`, `val/` (or `validation/`, `valid/`), `test/` sub-trees. What is missing is carved
once, deterministically (seed 0 by default: the same on every node and on the server), from the training
pool: from a single pool 20 % test and 10 % validation; from a train split without validation, 10 % of it.
Classes: an ImageFolder's sub-folder names (sorted; those of `train/` when it has splits), a dataset's
`ClassLabel` names (else its label values as text). Every image is converted to RGB (grayscale, RGBA and
palette images alike); files that are not images by extension are ignored and counted (`DataInfo.ignored`),
an image that cannot be decoded is skipped and counted (`Split.corrupt`, `Split.bad`), and a split with no
readable image is an error naming the first bad file.

(About 440 lines, kept in one file on purpose: loading re-reads the layout that inspection found, through the
same private helpers for split folders, image listing and carving sizes, which a split would have to export.)
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
SPLIT_NAMES = {"train": ("train",), "val": ("val", "validation", "valid"), "test": ("test",)}
TEST_FRACTION, VAL_FRACTION, SEED = 0.2, 0.1, 0
IMAGE_COLUMNS, LABEL_COLUMNS = ("image", "img", "pixel_values"), ("label", "labels", "fine_label")
LAYOUT = ("an ImageFolder (<path>/<class>/<images>, optionally under train/ val/ test/) or a saved Hugging Face "
          "dataset folder")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class DataError(ValueError):
    """A data-path that cannot be used, in one line naming the path and the expected layout."""


@dataclass(frozen=True)
class DataInfo:
    path: str
    kind: str                     # "imagefolder" | "hf-saved" | "hf-hub"
    class_names: tuple[str, ...]
    splits: dict[str, int] = field(default_factory=dict)   # "train"/"val"/"test" -> examples (carved included)
    sources: dict[str, str] = field(default_factory=dict)  # where each split is read (or carved) from
    carved: tuple[str, ...] = ()  # splits carved from the training pool (train too, when it gives some away)
    ignored: int = 0              # files that are not images, by extension (ImageFolder)
    class_counts: dict[str, int] = field(default_factory=dict)  # images per class, all splits (ImageFolder)


class Split(tuple):
    """(x, y, class_names) — unpacks as three — with `corrupt` (images skipped because they could not be
    decoded), `bad` (those files / rows) and `items` (each kept example's file path, or row index)."""

    def __new__(cls, x, y, class_names, corrupt: int = 0, bad=(), items=()):
        self = super().__new__(cls, (x, y, list(class_names)))
        self.corrupt, self.bad, self.items = int(corrupt), list(bad), list(items)
        return self

    def __reduce__(self):  # pickles (Ray, multiprocessing) with its extras
        return (Split, (*self, self.corrupt, self.bad, self.items))

    x = property(lambda self: self[0])            # float32 (n, 3, s, s), preprocessed
    y = property(lambda self: self[1])            # int64 (n,), indices into class_names
    class_names = property(lambda self: self[2])


# ---------------------------------------------------------------------------------------------- layout
def _is_hf_saved(path: Path) -> bool:
    return any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _subdirs(path: Path) -> list[Path]:
    return sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith((".", "__")))


def _images(folder: Path) -> tuple[list[Path], int]:
    """Image files under `folder` (by extension, sorted) and how many other files it holds."""
    files = sorted(f for f in folder.rglob("*") if f.is_file() and not f.name.startswith("."))
    images = [f for f in files if f.suffix.lower() in IMAGE_EXTENSIONS]
    return images, len(files) - len(images)


def _split_dirs(path: Path) -> dict[str, Path]:
    subs = {d.name.lower(): d for d in _subdirs(path)}
    return {split: subs[n] for split, names in SPLIT_NAMES.items() for n in names if n in subs}


def _carved_sizes(n: int, has_val: bool, has_test: bool, val_fraction: float, test_fraction: float) -> dict:
    n_test = 0 if has_test else int(round(n * test_fraction))
    n_val = 0 if has_val else int(round(n * val_fraction))
    return {"train": n - n_test - n_val, "val": n_val, "test": n_test}


def _check_classes(path, names: list[str]) -> None:
    if len(names) < 2:
        raise DataError(f"data-path '{path}': {'one class only (' + repr(names[0]) + ')' if names else 'no classes'}; "
                        f"a classifier needs at least 2 (expected {LAYOUT})")


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def inspect_data(path: str | os.PathLike, *, hub: bool = True, val_fraction: float = VAL_FRACTION,
                 test_fraction: float = TEST_FRACTION) -> DataInfo:
    """The layout of `path`, its class names and split sizes, from the file system and json / arrow metadata
    only (no torch, no image decoded). `hub=False`: a name that is not a local path and looks like a hub
    dataset ("owner/name") is not looked up (the network may be slow) and comes back as kind "hf-hub" with
    no classes. Raises DataError (one line) for a missing path, a file, no class sub-folders, an empty
    class, a single class, or a dataset without image / label columns."""
    p = Path(path).expanduser()
    if not p.exists():
        text = str(path)
        if _HUB_ID.fullmatch(text) and not Path(text.split("/", 1)[0]).is_dir():
            if _offline():
                raise DataError(f"data-path '{path}': no such file or folder, and HF_HUB_OFFLINE is set so it is not "
                                f"looked up as a hub dataset (expected {LAYOUT})")
            if not hub:
                return DataInfo(text, "hf-hub", ())
            return _inspect_hub(text, val_fraction, test_fraction)
        raise DataError(f"data-path '{path}': no such file or folder (expected {LAYOUT})")
    if not p.is_dir():
        raise DataError(f"data-path '{path}' is a file; expected {LAYOUT}")
    if _is_hf_saved(p):
        return _inspect_hf_saved(p, val_fraction, test_fraction)
    return _inspect_folder(p, path, val_fraction, test_fraction)


def _inspect_folder(p: Path, path, val_fraction: float, test_fraction: float) -> DataInfo:
    splits = _split_dirs(p)
    if splits and "train" not in splits:
        raise DataError(f"data-path '{path}': has {', '.join(d.name + '/' for d in splits.values())} but no train/ "
                        f"(expected {LAYOUT})")
    root = splits.get("train", p)
    classes = _subdirs(root)
    if not classes:
        where = f"'{path}'" + (" train/" if splits else "")
        raise DataError(f"data-path {where}: no class sub-folders (expected {LAYOUT})")
    names = [d.name for d in classes]
    _check_classes(path, names)
    ignored = sum(1 for f in p.iterdir() if f.is_file() and not f.name.startswith("."))  # stray top-level files
    counts, sizes = dict.fromkeys(names, 0), {}
    for split, base in ([("train", root)] + [(s, splits[s]) for s in ("val", "test") if s in splits]):
        n = 0
        if base is not root:
            extra = [d.name for d in _subdirs(base) if d.name not in counts]
            if extra:
                raise DataError(f"data-path '{path}': {base.name}/ has class '{extra[0]}' that train/ does not have "
                                f"(train/ classes: {', '.join(names)})")
            ignored += sum(1 for f in base.iterdir() if f.is_file() and not f.name.startswith("."))
        elif splits:
            ignored += sum(1 for f in base.iterdir() if f.is_file() and not f.name.startswith("."))
        for name in names:
            if not (base / name).is_dir():
                continue
            images, other = _images(base / name)
            ignored += other
            if not images and base is root:
                raise DataError(f"data-path '{path}': class '{name}' has no images "
                                f"(by extension: {', '.join(IMAGE_EXTENSIONS)})")
            counts[name] += len(images)
            n += len(images)
        sizes[split] = n
    cut = _carved_names(splits)
    return DataInfo(str(p), "imagefolder", tuple(names), _sizes(sizes, cut, val_fraction, test_fraction),
                    {s: str(splits.get(s, root)) for s in SPLIT_NAMES}, cut, ignored, counts)


def _sizes(have: dict[str, int], cut: tuple[str, ...], val_fraction: float, test_fraction: float) -> dict[str, int]:
    """Examples per split: those the data has, and the carved ones from the training pool."""
    carved = _carved_sizes(have.get("train", 0), "val" not in cut, "test" not in cut, val_fraction, test_fraction)
    return {s: carved[s] if s in cut else have[s] for s in SPLIT_NAMES}


def _carved_names(have) -> tuple[str, ...]:
    missing = tuple(s for s in ("val", "test") if s not in have)
    return ("train", *missing) if missing else ()


def _features(info_file: Path) -> dict:
    try:
        return json.loads(info_file.read_text()).get("features") or {} if info_file.is_file() else {}
    except (OSError, ValueError):
        return {}


def _hf_label_names(feats: dict) -> list[str] | None:
    for col in LABEL_COLUMNS:
        f = feats.get(col)
        if isinstance(f, dict) and f.get("_type") == "ClassLabel" and f.get("names"):
            return [str(n) for n in f["names"]]
    return None


def _rows(split_dir: Path) -> int:
    """Rows of a saved dataset from its arrow files' record batches (memory-mapped, no data read)."""
    import pyarrow as pa

    state = json.loads((split_dir / "state.json").read_text())
    n = 0
    for entry in state.get("_data_files", []):
        with pa.memory_map(str(split_dir / entry["filename"])) as src:
            n += sum(b.num_rows for b in pa.ipc.open_stream(src))
    return n


def _inspect_hf_saved(p: Path, val_fraction: float, test_fraction: float) -> DataInfo:
    if (p / "dataset_dict.json").is_file():
        names = json.loads((p / "dataset_dict.json").read_text()).get("splits", [])
        found = {split: n for split, options in SPLIT_NAMES.items() for n in options if n in names}
        if "train" not in found:
            raise DataError(f"data-path '{p}': a DatasetDict without a 'train' split (has {', '.join(names)})")
        dirs = {s: p / n for s, n in found.items()}
    else:
        dirs = {"train": p}
    feats = _features(dirs["train"] / "dataset_info.json")
    if feats and not any(c in feats for c in IMAGE_COLUMNS):
        raise DataError(f"data-path '{p}': no image column ({', '.join(IMAGE_COLUMNS)}) among {', '.join(feats)}")
    if feats and not any(c in feats for c in LABEL_COLUMNS):
        raise DataError(f"data-path '{p}': no label column ({', '.join(LABEL_COLUMNS)}) among {', '.join(feats)}")
    labels = _hf_label_names(feats)
    if labels is None:  # labels without names: their values are the names (reads the label column once)
        labels = _hf_value_names(p)
    _check_classes(p, labels)
    try:
        sizes = {s: _rows(d) for s, d in dirs.items()}
    except (OSError, ValueError, KeyError):
        sizes = {}
    cut = _carved_names(dirs)
    return DataInfo(str(p), "hf-saved", tuple(labels), _sizes(sizes, cut, val_fraction, test_fraction) if sizes else {},
                    {s: str(dirs.get(s, dirs["train"])) for s in SPLIT_NAMES}, cut)


def _inspect_hub(name: str, val_fraction: float, test_fraction: float) -> DataInfo:
    import datasets

    try:
        builder = datasets.load_dataset_builder(name)
    except Exception as exc:  # noqa: BLE001 - no connection, no such dataset, gated: one line either way
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise DataError(f"data-path '{name}': no such local folder, and not usable as a Hugging Face hub dataset "
                        f"({reason})") from None
    names = _label_names_from_features(builder.info.features)
    if names is None:
        raise DataError(f"data-path '{name}': the hub dataset has no ClassLabel column ({', '.join(LABEL_COLUMNS)})")
    _check_classes(name, names)
    have = {k: v.num_examples for k, v in (builder.info.splits or {}).items()}
    found = {s: next((n for n in options if n in have), "") for s, options in SPLIT_NAMES.items()}
    if not found["train"]:
        raise DataError(f"data-path '{name}': the hub dataset has no 'train' split (has {', '.join(have)})")
    cut = _carved_names({s for s in found if found[s]})
    sizes = {s: have[found[s]] or 0 for s in found if found[s]}
    return DataInfo(name, "hf-hub", tuple(names), _sizes(sizes, cut, val_fraction, test_fraction),
                    {s: found[s] or found["train"] for s in SPLIT_NAMES}, cut)


def _label_names_from_features(features) -> list[str] | None:
    import datasets

    for col in LABEL_COLUMNS:
        f = (features or {}).get(col)
        if isinstance(f, datasets.ClassLabel):
            return list(f.names)
    return None


def _hf_value_names(p: Path) -> list[str]:
    import datasets

    ds = datasets.load_from_disk(str(p))
    ds = ds["train"] if isinstance(ds, datasets.DatasetDict) else ds
    col = next((c for c in LABEL_COLUMNS if c in ds.column_names), None)
    if col is None:
        raise DataError(f"data-path '{p}': no label column ({', '.join(LABEL_COLUMNS)}) in {ds.column_names}")
    return [str(v) for v in sorted(set(ds[col]))]


# ---------------------------------------------------------------------------------------------- loading
def _carve(n: int, split: str, has_val: bool, has_test: bool, val_fraction: float, test_fraction: float,
           seed: int) -> list[int]:
    """Indices of `split` in a pool of n that lacks the missing splits (one permutation per seed: the
    carved parts are disjoint and the same on every node)."""
    import numpy as np

    order = np.random.RandomState(seed).permutation(n).tolist()
    sizes = _carved_sizes(n, has_val, has_test, val_fraction, test_fraction)
    parts = {"test": order[:sizes["test"]], "val": order[sizes["test"]:sizes["test"] + sizes["val"]],
             "train": order[sizes["test"] + sizes["val"]:]}
    return sorted(parts[split])


def load_data(path: str | os.PathLike, split: str, preprocess, *, val_fraction: float = VAL_FRACTION,
              test_fraction: float = TEST_FRACTION, seed: int = SEED) -> Split:
    """One split ("train", "val", "test", or "all": every example, nothing carved) of a user's data as
    preprocessed tensors, `(x, y, class_names)` with `.corrupt` / `.bad` / `.items` (see Split).

    A split the data has is used as it is; a missing val / test split is carved from the training pool
    (`val_fraction`, `test_fraction` of it, shuffled with `seed`), so train, val and test never overlap."""
    if split not in (*SPLIT_NAMES, "all"):
        raise ValueError(f"split must be one of {', '.join(SPLIT_NAMES)} or all, got {split!r}")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"need 0 <= val_fraction, test_fraction and their sum < 1, got {val_fraction}, {test_fraction}")
    info = inspect_data(path, val_fraction=val_fraction, test_fraction=test_fraction)
    src = info.sources
    if split == "all":
        parts = [(source, None) for source in dict.fromkeys(src[s] for s in SPLIT_NAMES)]
    elif split not in info.carved:
        parts = [(src[split], None)]
    else:
        carve = (split, "val" not in info.carved, "test" not in info.carved, val_fraction, test_fraction, seed)
        parts = [(src["train"], carve)]
    loaded = [(_load_folder if info.kind == "imagefolder" else _load_hf)(info, source, preprocess, carve)
              for source, carve in parts]
    if len(loaded) == 1:
        return loaded[0]
    import torch

    return Split(torch.cat([s.x for s in loaded]), torch.cat([s.y for s in loaded]), list(info.class_names),
                 sum(s.corrupt for s in loaded), [b for s in loaded for b in s.bad],
                 [i for s in loaded for i in s.items])


def _open(item):
    """A PIL image from a path, a datasets Image dict ({"bytes", "path"}) or an image already decoded."""
    import io

    from PIL import Image

    if isinstance(item, (str, Path)):
        return Image.open(item)
    if isinstance(item, dict):
        if item.get("bytes"):
            return Image.open(io.BytesIO(item["bytes"]))
        return Image.open(item["path"])
    if isinstance(item, Image.Image):
        return item
    from common.preprocess import to_pil

    return to_pil(item)


def _decode(items: list, preprocess, where: str, names: list | None = None):
    """(preprocessed tensor of the images that decode, their positions, the bad ones as 'name: reason').
    Each image is resized and cropped as soon as it is decoded (only the small crops are kept)."""
    from PIL import Image

    from common.preprocess import geometric, to_batch, to_pil

    run, crops, kept, bad = geometric(preprocess), [], [], []
    for i, item in enumerate(items):
        name = str(names[i]) if names is not None else str(item)
        try:
            with _open(item) as im:
                crops.append(run(to_pil(im)))  # RGB: grayscale, RGBA, palette, CMYK converted
            kept.append(i)
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
            bad.append(f"{name}: {type(exc).__name__}" + (f": {str(exc).splitlines()[0][:120]}" if str(exc) else ""))
    if items and not crops:
        raise DataError(f"data-path '{where}': no readable image among {len(items)} (first: {bad[0]})")
    return to_batch(preprocess, crops), kept, bad


def _load_folder(info: DataInfo, source: str, preprocess, carve) -> Split:
    import torch

    root, names = Path(source), list(info.class_names)
    files, labels = [], []
    for k, name in enumerate(names):
        if (root / name).is_dir():  # a class may be absent from a val/ or test/ split
            images, _ = _images(root / name)
            files += images
            labels += [k] * len(images)
    if carve is not None:
        keep = _carve(len(files), *carve)
        files, labels = [files[i] for i in keep], [labels[i] for i in keep]
    x, kept, bad = _decode(files, preprocess, info.path)
    return Split(x, torch.tensor([labels[i] for i in kept], dtype=torch.int64), names, len(bad), bad,
                 [str(files[i]) for i in kept])


def _load_hf(info: DataInfo, source: str, preprocess, carve) -> Split:
    import datasets

    if info.kind == "hf-hub":
        ds = datasets.load_dataset(info.path, split=source if source != info.path else "train")
    else:
        ds = datasets.load_from_disk(source)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"]
    index = None if carve is None else _carve(len(ds), *carve)
    return dataset_tensors(ds, preprocess, list(info.class_names), index=index, where=info.path)


def dataset_tensors(ds, preprocess, class_names: list[str] | None = None, *, index: list[int] | None = None,
                    where: str = "dataset") -> Split:
    """A Hugging Face `Dataset` (rows `index`, default all) as a Split: an image column (PIL images, decoded
    here one by one so a corrupt one is skipped; uint8 arrays as images; float arrays taken as already
    preprocessed (n, 3, h, w) and resized to the size) and a label column (ClassLabel, or values whose text
    is in `class_names`)."""
    import datasets
    import numpy as np
    import torch

    image_col = next((c for c in IMAGE_COLUMNS if c in ds.column_names), None)
    label_col = next((c for c in LABEL_COLUMNS if c in ds.column_names), None)
    if image_col is None or label_col is None:
        raise DataError(f"data-path '{where}': need an image ({', '.join(IMAGE_COLUMNS)}) and a label "
                        f"({', '.join(LABEL_COLUMNS)}) column, found {', '.join(ds.column_names)}")
    index = list(range(len(ds))) if index is None else list(index)
    raw = ds.select(index) if len(index) != len(ds) or index != list(range(len(ds))) else ds
    feature = ds.features[label_col]
    names = list(class_names) if class_names is not None else (
        list(feature.names) if isinstance(feature, datasets.ClassLabel) else [str(v) for v in sorted(set(raw[label_col]))])
    labels = list(raw[label_col])
    if not isinstance(feature, datasets.ClassLabel):  # values are the names (see inspect_data)
        labels = [names.index(str(v)) for v in labels]
    if isinstance(ds.features[image_col], datasets.Image):
        raw = raw.cast_column(image_col, datasets.Image(decode=False))  # decoded here, one at a time
        x, kept, bad = _decode(list(raw[image_col]), preprocess, where, [f"row {i}" for i in index])
    else:
        arr = np.asarray(raw.with_format("numpy")[image_col])
        if arr.dtype == np.uint8:  # images as arrays (n, h, w[, c])
            x, kept, bad = _decode(list(arr), preprocess, where, [f"row {i}" for i in index])
        else:  # already preprocessed (n, 3, h, w): only resized to the model's size
            x = torch.from_numpy(arr.astype(np.float32, copy=False))
            if x.ndim != 4 or x.shape[1] != 3:
                raise DataError(f"data-path '{where}': column {image_col!r} holds arrays of shape {tuple(x.shape[1:])}; "
                                f"expected images, or float arrays (3, h, w)")
            if tuple(x.shape[-2:]) != (preprocess.img_size,) * 2:
                x = torch.nn.functional.interpolate(x, size=(preprocess.img_size,) * 2, mode="bilinear",
                                                    align_corners=False)
            kept, bad = list(range(len(x))), []
    y = torch.tensor([int(labels[i]) for i in kept], dtype=torch.int64)
    return Split(x, y, names, len(bad), bad, [index[i] for i in kept])
