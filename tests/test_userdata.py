"""A user's data (common/userdata.py): layouts, classes, split sizes, existing splits used and missing ones
carved, RGB conversion, corrupt images skipped and counted, one-line errors naming the path."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.preprocess import Preprocess, apply, resolve_preprocess
from common.userdata import DataError, inspect_data, load_data

ROOT = Path(__file__).resolve().parents[1]
PRE = Preprocess(16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bilinear", 1.0, "squash")


def folder(root: Path, counts: dict, size=(12, 10), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


def saved_dataset(path: Path, splits: dict, names=("no", "yes"), label_values=None):
    import datasets

    rng = np.random.default_rng(0)
    feats = datasets.Features({"image": datasets.Image(),
                               "label": datasets.ClassLabel(names=list(names)) if label_values is None
                               else datasets.Value("string")})
    parts = {}
    for split, n in splits.items():
        labels = [i % len(names) for i in range(n)] if label_values is None else \
            [label_values[i % len(label_values)] for i in range(n)]
        imgs = [Image.fromarray(rng.integers(0, 255, (10, 14, 3), dtype=np.uint8)) for _ in range(n)]
        parts[split] = datasets.Dataset.from_dict({"image": imgs, "label": labels}, features=feats)
    ds = parts["train"] if list(parts) == ["train"] else datasets.DatasetDict(parts)  # one split: a Dataset
    ds.save_to_disk(str(path))
    return path


# ------------------------------------------------------------------------------------------------ inspect
def test_inspect_an_image_folder(tmp_path):
    data = folder(tmp_path / "imgs", {"cat": 12, "ant": 10, "bee": 8})
    (data / "README.txt").write_text("stray")
    (data / "cat" / "notes.csv").write_text("stray")
    (data / ".DS_Store").write_text("hidden: not counted")
    info = inspect_data(data)
    assert info.kind == "imagefolder" and info.class_names == ("ant", "bee", "cat")
    assert info.class_counts == {"ant": 10, "bee": 8, "cat": 12}
    assert info.splits == {"train": 21, "val": 3, "test": 6}  # 30: 20 % test, 10 % validation carved
    assert info.carved == ("train", "val", "test") and info.ignored == 2


def test_inspect_uses_a_folders_own_splits(tmp_path):
    folder(tmp_path / "d" / "train", {"a": 5, "b": 5})
    folder(tmp_path / "d" / "val", {"a": 2, "b": 1})
    folder(tmp_path / "d" / "test", {"a": 3})  # a class may be absent from a split
    info = inspect_data(tmp_path / "d")
    assert info.class_names == ("a", "b") and info.splits == {"train": 10, "val": 3, "test": 3}
    assert info.carved == () and info.sources["val"] == str(tmp_path / "d" / "val")
    folder(tmp_path / "e" / "train", {"a": 10, "b": 10})
    folder(tmp_path / "e" / "test", {"a": 2, "b": 2})
    info = inspect_data(tmp_path / "e")
    assert info.splits == {"train": 18, "val": 2, "test": 4} and info.carved == ("train", "val")


def test_inspect_saved_datasets_from_their_metadata(tmp_path):
    dd = saved_dataset(tmp_path / "dd", {"train": 20, "validation": 4, "test": 6})
    info = inspect_data(dd)
    assert info.kind == "hf-saved" and info.class_names == ("no", "yes")
    assert info.splits == {"train": 20, "val": 4, "test": 6} and info.carved == ()
    ds = saved_dataset(tmp_path / "ds", {"train": 20})
    assert inspect_data(ds).splits == {"train": 14, "val": 2, "test": 4}
    strings = saved_dataset(tmp_path / "str", {"train": 6}, label_values=["dog", "cat"])
    assert inspect_data(strings).class_names == ("cat", "dog")  # no ClassLabel: the values, sorted


def test_inspect_imports_no_torch(tmp_path):
    """check_config answers layout mistakes without torch (importing it alone takes seconds)."""
    data = folder(tmp_path / "imgs", {"a": 2, "b": 2})
    dd = saved_dataset(tmp_path / "dd", {"train": 4, "test": 2})
    code = ("import sys; from common.userdata import inspect_data; "
            f"print(inspect_data({str(data)!r}).class_names, inspect_data({str(dd)!r}).splits); "
            "print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[:2] == ["('a', 'b') {'train': 4, 'val': 0, 'test': 2}", "False"], proc.stdout


@pytest.mark.parametrize("make, words", [
    (lambda d: d / "missing", "no such file or folder"),
    (lambda d: folder(d / "x", {"a": 1}) / "a" / "0.png", "is a file"),
    (lambda d: (d / "flat").mkdir() or Image.new("RGB", (4, 4)).save(d / "flat" / "x.png") or d / "flat",
     "no class sub-folders"),
    (lambda d: folder(d / "one", {"only": 3}), "one class only ('only')"),
    (lambda d: (folder(d / "empty", {"a": 2, "b": 2}) / "c").mkdir() or d / "empty", "class 'c' has no images"),
    (lambda d: folder(d / "s" / "val", {"a": 2, "b": 2}).parent, "has val/ but no train/"),
    (lambda d: folder(d / "t" / "test", {"zebra": 1}).parent if folder(d / "t" / "train", {"a": 2, "b": 2}) else None,
     "test/ has class 'zebra' that train/ does not have"),
])
def test_layout_mistakes_are_one_line_naming_the_path(tmp_path, make, words):
    path = make(tmp_path)
    with pytest.raises(DataError) as exc:
        inspect_data(path)
    msg = str(exc.value)
    assert msg.startswith(f"data-path '{path}'") and words in msg and "\n" not in msg, msg
    assert isinstance(exc.value, ValueError)


def test_a_hub_like_name_is_not_looked_up_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="'someone/images': no such file or folder, and HF_HUB_OFFLINE is set"):
        inspect_data("someone/images")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    assert inspect_data("someone/images", hub=False).kind == "hf-hub"  # preflight: not looked up
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()  # a typo in a local path is not taken for a hub name
    with pytest.raises(DataError, match="'data/imgs': no such file or folder"):
        inspect_data("data/imgs")


# ------------------------------------------------------------------------------------------------ load
def test_carved_splits_are_exact_disjoint_complete_and_deterministic(tmp_path):
    data = folder(tmp_path / "imgs", {"ant": 10, "bee": 10, "cat": 10})
    parts = {s: load_data(data, s, PRE) for s in ("train", "val", "test")}
    assert {s: len(p.x) for s, p in parts.items()} == {"train": 21, "val": 3, "test": 6}
    items = {s: set(p.items) for s, p in parts.items()}
    assert not (items["train"] & items["val"]) and not (items["train"] & items["test"]) \
        and not (items["val"] & items["test"])
    assert set.union(*items.values()) == {str(f) for f in data.rglob("*.png")}
    for s, p in parts.items():  # labels follow the files' class folders
        assert [p.class_names[k] for k in p.y.tolist()] == [Path(f).parent.name for f in p.items]
        assert p.x.shape[1:] == (3, 16, 16) and p.class_names == ["ant", "bee", "cat"]
    again = load_data(data, "test", PRE)
    assert again.items == parts["test"].items and torch.equal(again.x, parts["test"].x)
    assert load_data(data, "test", PRE, seed=1).items != parts["test"].items
    assert len(load_data(data, "val", PRE, val_fraction=0.3).x) == 9
    x, y, names = load_data(data, "all", PRE)  # unpacks as three
    assert len(x) == 30 and names == ["ant", "bee", "cat"] and y.tolist() == [0] * 10 + [1] * 10 + [2] * 10
    import pickle  # travels to other processes (Ray) with its extras

    back = pickle.loads(pickle.dumps(parts["test"]))
    assert back.items == parts["test"].items and torch.equal(back.x, parts["test"].x) and back.corrupt == 0


def test_a_folders_own_splits_are_used_as_they_are(tmp_path):
    folder(tmp_path / "d" / "train", {"a": 5, "b": 5})
    folder(tmp_path / "d" / "val", {"a": 2, "b": 1}, seed=1)
    folder(tmp_path / "d" / "test", {"b": 3}, seed=2)
    test = load_data(tmp_path / "d", "test", PRE)
    assert test.y.tolist() == [1, 1, 1] and all("/test/b/" in f for f in test.items)
    assert len(load_data(tmp_path / "d", "train", PRE).x) == 10 and len(load_data(tmp_path / "d", "val", PRE).x) == 3


def test_a_dataset_dicts_splits_are_used_and_a_missing_validation_carved(tmp_path):
    dd = saved_dataset(tmp_path / "dd", {"train": 20, "test": 8})
    tr, va, te = (load_data(dd, s, PRE) for s in ("train", "val", "test"))
    assert (len(tr.x), len(va.x), len(te.x)) == (18, 2, 8)
    assert te.items == list(range(8)) and te.y.tolist() == [0, 1] * 4 and te.class_names == ["no", "yes"]
    assert not set(tr.items) & set(va.items) and sorted(tr.items + va.items) == list(range(20))
    full = saved_dataset(tmp_path / "full", {"train": 6, "validation": 3, "test": 2})
    assert [len(load_data(full, s, PRE).x) for s in ("train", "val", "test")] == [6, 3, 2]
    strings = saved_dataset(tmp_path / "str", {"train": 10}, label_values=["dog", "cat"])
    x, y, names = load_data(strings, "all", PRE)
    assert names == ["cat", "dog"] and y.tolist() == [1, 0] * 5


def test_images_become_rgb_with_the_models_preprocessing(tmp_path):
    rng = np.random.default_rng(3)
    base = Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
    modes = {"gray": base.convert("L"), "rgba": base.convert("RGBA"), "palette": base.convert("P"),
             "rgb": base}
    for name, im in modes.items():
        (tmp_path / "m" / name).mkdir(parents=True)
        im.save(tmp_path / "m" / name / "0.png")
    (tmp_path / "m" / "cmyk").mkdir()
    base.convert("CMYK").save(tmp_path / "m" / "cmyk" / "0.jpg")
    pre = resolve_preprocess("resnet18", 24)
    x, y, names = load_data(tmp_path / "m", "all", pre)
    assert names == ["cmyk", "gray", "palette", "rgb", "rgba"] and x.shape == (5, 3, 24, 24)
    for k, name in enumerate(names):
        if name != "cmyk":
            ref = pre.transform()(Image.open(tmp_path / "m" / name / "0.png").convert("RGB"))
            assert torch.equal(x[k], ref), name
    gray = x[names.index("gray")] * torch.tensor(pre.std).view(3, 1, 1) + torch.tensor(pre.mean).view(3, 1, 1)
    assert torch.allclose(gray[0], gray[1], atol=1e-5) and torch.allclose(gray[1], gray[2], atol=1e-5)


def test_corrupt_images_are_skipped_and_counted_or_refused_when_all_are(tmp_path):
    data = folder(tmp_path / "c", {"a": 4, "b": 4})
    (data / "a" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (data / "b" / "empty.jpg").write_bytes(b"")
    split = load_data(data, "all", PRE)
    assert len(split.x) == 8 and split.corrupt == 2
    assert [b.split(":")[0] for b in split.bad] == [str(data / "a" / "bad.png"), str(data / "b" / "empty.jpg")]
    assert str(data / "a" / "bad.png") not in split.items
    bad = tmp_path / "allbad"
    for cls in ("a", "b"):
        (bad / cls).mkdir(parents=True)
        (bad / cls / "x.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=rf"data-path '{bad}': no readable image among 2 \(first: {bad}/a/x.png"):
        load_data(bad, "all", PRE)


def test_a_corrupt_row_of_a_saved_dataset_is_skipped(tmp_path):
    import datasets

    good = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    ds = datasets.Dataset.from_dict({"image": [good, good, good], "label": [0, 1, 1]}, features=feats)
    ds = ds.cast_column("image", datasets.Image(decode=False))
    rows = ds.to_dict()
    rows["image"][1] = {"bytes": b"garbage", "path": None}
    datasets.Dataset.from_dict(rows, features=feats).save_to_disk(str(tmp_path / "hf"))
    split = load_data(tmp_path / "hf", "all", PRE)
    assert split.y.tolist() == [0, 1] and split.items == [0, 2] and split.corrupt == 1 and split.bad[0].startswith("row 1")


def test_load_image_folder_stays_a_thin_wrapper(tmp_path):
    """common.data.loading.load_image_folder (README, benchmarks): all of a folder as the task's images; the split
    of data that has its own."""
    from common.data.loading import load_image_folder, task_preprocess
    from common.data.splits import normalize
    from common.data.tasks import get_task

    flat = folder(tmp_path / "flat", {"cat": 3, "dog": 2}, size=(40, 48))
    x, y = load_image_folder(flat)
    ref = load_data(flat, "all", task_preprocess())
    assert x.shape == (5, 3, 32, 32) and y.tolist() == [0, 0, 0, 1, 1] and torch.equal(x, ref.x)
    im = Image.open(flat / "cat" / "0.png")  # the old path: a bilinear resize to the square, the task's mean/std
    old = normalize(np.asarray(im.resize((32, 32), Image.BILINEAR)).transpose(2, 0, 1)[None], get_task())
    assert torch.allclose(x[0], old[0], atol=1e-6)
    folder(tmp_path / "s" / "train", {"a": 4, "b": 4})
    folder(tmp_path / "s" / "test", {"a": 1, "b": 2})
    assert load_image_folder(tmp_path / "s", split="test")[1].tolist() == [0, 1, 1]
    dd = saved_dataset(tmp_path / "dd", {"train": 6, "validation": 3})
    assert len(load_image_folder(dd, split="validation")[0]) == 3
    with pytest.raises(FileNotFoundError, match="nope"):
        load_image_folder(tmp_path / "nope")


def test_float_array_datasets_are_taken_as_preprocessed(tmp_path):
    from common.data.loading import to_hf_dataset

    x = torch.rand(6, 3, 16, 16)
    to_hf_dataset(x, torch.tensor([0, 1, 0, 1, 0, 1]), ["p", "q"]).save_to_disk(str(tmp_path / "hf"))
    got = load_data(tmp_path / "hf", "all", PRE)
    assert torch.allclose(got.x, x) and got.class_names == ["p", "q"]
    assert load_data(tmp_path / "hf", "all", resolve_preprocess("resnet18", 24)).x.shape == (6, 3, 24, 24)


def test_apply_matches_load_data(tmp_path):
    data = folder(tmp_path / "imgs", {"a": 2, "b": 2}, size=(30, 20))
    split = load_data(data, "all", PRE)
    assert torch.equal(split.x, apply(PRE, [Image.open(f) for f in split.items]))
