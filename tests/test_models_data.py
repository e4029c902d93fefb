"""Tests for the embedded offline default: procedural data (common.data) and the model factory (common.models,
common.backbones)."""

from __future__ import annotations

import hashlib
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may touch the network

import numpy as np
import pytest
import timm
import torch
from torch import nn

from common import backbones as B
from common.architectures import DEFAULT_MODEL
from common.data.loading import from_hf_dataset, load_image_folder, to_hf_dataset
from common.data.splits import cache_dir, make_split
from common.data.tasks import SPLITS, SUITE, TASKS, get_task
from common import models as M
from common.taskedge.tuner import find_head


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """Private cache for tests that only need generated data (never the pre-trained backbone)."""
    monkeypatch.setenv("TASKEDGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _hashes(x: torch.Tensor) -> set[str]:
    return {hashlib.sha1(row.numpy().tobytes()).hexdigest() for row in x}


# ------------------------------------------------------------------ data
def test_tasks_are_listed_and_unknown_names_fail():
    assert set(TASKS) == {"shapes-upstream", "glyphs-upstream", "upstream-mix", *SUITE}
    assert get_task().name == "shapes-downstream"
    with pytest.raises(ValueError, match="no-such-task") as err:
        get_task("no-such-task")
    assert "shapes-upstream" in str(err.value)  # lists the allowed names


def test_up_and_downstream_classes_differ():
    up, down = get_task("shapes-upstream"), get_task("shapes-downstream")
    assert not set(up.class_names) & set(down.class_names)
    assert up.image_size == down.image_size == 32


@pytest.mark.parametrize("task", ["shapes-upstream", "shapes-downstream"])
def test_split_shapes_dtypes_labels(tmp_cache, task):
    spec = get_task(task)
    x, y = make_split(task, "train", n=120)
    assert x.shape == (120, 3, spec.image_size, spec.image_size) and x.dtype == torch.float32
    assert y.shape == (120,) and y.dtype == torch.int64
    assert 0 <= int(y.min()) and int(y.max()) < spec.num_classes
    assert len(torch.unique(y)) == spec.num_classes  # class-balanced
    assert -1.0 - 1e-6 <= float(x.min()) and float(x.max()) <= 1.0 + 1e-6  # mean=std=0.5 normalisation


def test_generation_is_deterministic_and_seeded(tmp_cache):
    import shutil

    a = make_split(get_task(), "train", 64, seed=3)
    shutil.rmtree(cache_dir() / "data")  # drawn again, not read back from the cache
    b = make_split(get_task(), "train", 64, seed=3)
    c = make_split(get_task(), "train", 64, seed=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_smaller_n_is_a_prefix(tmp_cache):
    x_small, y_small = make_split("shapes-downstream", "test", n=50)
    x_big, y_big = make_split("shapes-downstream", "test", n=700)
    assert torch.equal(x_small, x_big[:50]) and torch.equal(y_small, y_big[:50])


def test_splits_are_disjoint(tmp_cache):
    hashes = {s: _hashes(make_split("shapes-downstream", s, n=200)[0]) for s in SPLITS}
    assert not hashes["train"] & hashes["calib"]
    assert not hashes["train"] & hashes["test"]
    assert not hashes["calib"] & hashes["test"]


def test_cache_is_npz_and_reused(tmp_cache):
    first = make_split("shapes-upstream", "calib", n=40)
    files = list((tmp_cache / "data").glob("*.npz"))
    assert len(files) == 1
    with np.load(files[0], allow_pickle=False) as z:  # plain arrays, no pickle
        assert z["x"].dtype == np.uint8 and z["x"].shape == (40, 3, 32, 32)
    second = make_split("shapes-upstream", "calib", n=40)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_bad_split_arguments(tmp_cache):
    with pytest.raises(ValueError, match="validation"):
        make_split("shapes-downstream", "validation")
    with pytest.raises(ValueError, match="nope"):
        make_split("nope", "train")


def test_hf_round_trip(tmp_cache):
    x, y = make_split("shapes-downstream", "calib", n=30)
    ds = to_hf_dataset(x, y, class_names=get_task().class_names)
    assert ds.column_names == ["image", "label"]
    assert ds.features["label"].names[0] == "hexagon"
    x2, y2 = from_hf_dataset(ds)
    assert torch.equal(x, x2) and torch.equal(y, y2)


def test_hf_dataset_works_with_flwr_partitioner(tmp_cache):
    from flwr_datasets.partitioner import IidPartitioner

    x, y = make_split("shapes-downstream", "calib", n=40)
    part = IidPartitioner(num_partitions=4)
    part.dataset = to_hf_dataset(x, y)
    sizes = [len(from_hf_dataset(part.load_partition(i))[1]) for i in range(4)]
    assert sizes == [10, 10, 10, 10]


def test_load_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "imgs" / cls / f"{i}.png")
    x, y = load_image_folder(tmp_path / "imgs")
    assert x.shape == (6, 3, 32, 32) and x.dtype == torch.float32
    assert y.tolist() == [0, 0, 0, 1, 1, 1]


def test_load_hf_saved_folder(tmp_path):
    x, y = torch.rand(8, 3, 16, 16), torch.arange(8) % 2
    to_hf_dataset(x, y).save_to_disk(str(tmp_path / "hf"))
    x2, y2 = load_image_folder(tmp_path / "hf")
    assert x2.shape == (8, 3, 32, 32) and torch.equal(y2, y)


def test_load_image_folder_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_image_folder(tmp_path / "does-not-exist")


# ------------------------------------------------------------------ models
def test_embedded_vit_has_taskedge_targets():
    model = M.create_model("taskedge-vit-tiny", num_classes=7)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 7)
    assert find_head(model) == "head"
    linear = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert {"qkv", "proj", "fc1", "fc2", "head"} <= linear


def test_embedded_models_are_registered_with_timm():
    assert all(timm.is_model(n) for n in ("taskedge_vit_tiny", "taskedge_resnet_tiny", "taskedge_mobilenetv2_tiny"))
    model = M.create_model("taskedge_vit_tiny", num_classes=2)  # timm spelling works too
    assert model.patch_embed.proj.kernel_size == (8, 8) and len(model.blocks) == 4


def test_embedded_cnns_are_timm_classes():
    from timm.models.efficientnet import EfficientNet
    from timm.models.resnet import ResNet

    resnet = M.create_model("taskedge-resnet-tiny", num_classes=4)
    assert isinstance(resnet, ResNet) and find_head(resnet) == "fc"
    assert resnet(torch.zeros(2, 3, 32, 32)).shape == (2, 4)
    assert all(c.groups == 1 for c in resnet.modules() if isinstance(c, nn.Conv2d))
    # stages at 16, 8, 4, 2 pixels: the stem's max-pool is dropped
    assert resnet.forward_features(torch.zeros(1, 3, 32, 32)).shape[-1] == 2

    mnv2 = M.create_model("taskedge-mobilenetv2-tiny", num_classes=4)
    assert isinstance(mnv2, EfficientNet) and find_head(mnv2) == "classifier"
    assert mnv2(torch.zeros(2, 3, 32, 32)).shape == (2, 4)
    convs = [m for m in mnv2.modules() if isinstance(m, nn.Conv2d)]
    assert any(c.groups == c.in_channels > 1 for c in convs)  # depthwise
    assert any(c.kernel_size == (1, 1) for c in convs)  # pointwise
    assert sum(p.numel() for p in mnv2.parameters()) < sum(p.numel() for p in resnet.parameters())


def test_any_timm_name_works():
    model = M.create_model("resnet18", num_classes=3).eval()
    assert find_head(model) == "fc"
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 3)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="definitely-not-a-model") as err:
        M.create_model("definitely-not-a-model", num_classes=2)
    assert "timm.list_models" in str(err.value)


def test_pretrained_and_weights_are_exclusive(tmp_path):
    with pytest.raises(ValueError, match="either"):
        M.create_model("taskedge-vit-tiny", num_classes=2, pretrained=True, weights=tmp_path / "w.pth")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_round_trip(tmp_path, suffix):
    torch.manual_seed(0)
    src = M.create_model("taskedge-vit-tiny", num_classes=5).eval()
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    else:
        torch.save(src.state_dict(), path)
    torch.manual_seed(1)  # a different init, so equality comes from the loaded weights
    dst = M.create_model("taskedge-vit-tiny", num_classes=5, weights=path).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))


def test_head_is_reinitialised_on_class_mismatch(tmp_path):
    src = M.create_model("taskedge-vit-tiny", num_classes=10)
    torch.save(src.state_dict(), tmp_path / "w.pth")
    dst = M.create_model("taskedge-vit-tiny", num_classes=3, weights=tmp_path / "w.pth")
    assert dst.head.weight.shape == (3, dst.head.in_features)
    own, ref = dst.state_dict(), src.state_dict()
    assert all(torch.equal(own[k], ref[k]) for k in own if not k.startswith("head."))


def test_non_head_mismatch_is_an_error(tmp_path):
    sd = M.create_model("taskedge-vit-tiny", num_classes=10).state_dict()
    sd.pop("blocks.0.attn.qkv.weight")
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"does not fit VisionTransformer: of \d+ model tensors, 1 missing "
                                         r"\(e.g. blocks.0.attn.qkv.weight\)$"):
        M.create_model("taskedge-vit-tiny", num_classes=10, weights=tmp_path / "broken.pth")
    # another architecture: one line with counts and the first three of each kind, not thousands of characters
    torch.save(timm.create_model("resnet10t", num_classes=10).state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(ValueError) as err:
        M.create_model("taskedge-vit-tiny", num_classes=10, weights=tmp_path / "resnet.pth")
    assert len(str(err.value)) < 600 and "\n" not in str(err.value) and "missing" in str(err.value)


def test_vit_weights_of_another_image_size_are_resampled(tmp_path):
    """64-px ViT weights into a 32-px ViT (img-size): timm's pos_embed resampling, no size-mismatch error."""
    src = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=1, num_classes=4)
    torch.save(src.state_dict(), tmp_path / "vit64.pth")
    dst = M.create_model("vit_tiny_patch16_224", img_size=32, depth=1, num_classes=4, weights=tmp_path / "vit64.pth")
    assert dst.pos_embed.shape == (1, 1 + 4, 192)
    assert torch.equal(dst.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    with pytest.raises(FileNotFoundError):
        M.create_model("taskedge-vit-tiny", num_classes=10, weights=tmp_path / "missing.pth")


def test_pth_loading_refuses_pickled_objects(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": object()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match=r"evil\.pth holds pickled Python objects; only plain tensors"):
        M.load_weights(M.create_model("taskedge-vit-tiny", num_classes=2), tmp_path / "evil.pth")


# ------------------------------------------------------------------ pre-trained backbone (real cache)
@pytest.mark.slow
def test_embedded_backbone_is_pretrained_and_cached():
    path = B.embedded_backbone(progress=False)  # pre-trains on first use (~1-3 min), then cached
    assert path.endswith(".safetensors") and B.embedded_backbone(progress=False) == path
    info = B.embedded_info(path)
    assert float(info["upstream_test_acc"]) > 0.85
    model = M.create_embedded(num_classes=4)
    assert model.head.out_features == 4
    from safetensors.torch import load_file

    saved = load_file(path)
    own = model.state_dict()
    assert all(torch.equal(own[k], saved[k]) for k in own if not k.startswith("head."))


def test_shipped_weights_are_found_outside_the_package(tmp_path, monkeypatch):
    """A Flower app bundle has no .safetensors beside the code: $TASKEDGE_WEIGHTS_DIR points at them."""
    import shutil

    shipped = B.shipped_weights()
    assert shipped is not None and B.sha256(shipped) == B.EMBEDDED_WEIGHTS[DEFAULT_MODEL][1]
    monkeypatch.setattr(B, "WEIGHTS_DIR", tmp_path / "fab" / "common" / "weights")  # as inside a FAB
    monkeypatch.delenv("TASKEDGE_WEIGHTS_DIR", raising=False)
    assert B.shipped_weights() is None
    shutil.copy(shipped, tmp_path / shipped.name)
    monkeypatch.setenv("TASKEDGE_WEIGHTS_DIR", str(tmp_path))
    assert B.shipped_weights() == tmp_path / shipped.name


def test_an_impossible_dirichlet_split_is_named_with_the_fix():
    from common.partition import load_local_data

    with pytest.raises(ValueError, match=r"partitioner='dirichlet': could not split task 'count' .* into 100 "
                                         r"partitions .*partitioner='iid'"):
        load_local_data("count", 0, 100, partitioner="dirichlet", alpha=0.5)
