"""A model's own preprocessing (common/preprocess.py): timm's data config per model, the embedded models' own,
and `apply` giving exactly timm's eval transform's numbers."""
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

from common.preprocess import Preprocess, apply, resolve_preprocess


def _images():
    rng = np.random.default_rng(0)
    rgb = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((20, 30), (64, 48), (90, 61))]
    return rgb + [rgb[0].convert("L"), rgb[1].convert("RGBA"), rgb[2].convert("P")]


@pytest.mark.parametrize("name, size, mean, crop_pct", [
    ("resnet18", 224, (0.485, 0.456, 0.406), 0.95),
    ("vit_tiny_patch16_224", 224, (0.5, 0.5, 0.5), 0.9),
    ("inception_v3", 299, (0.5, 0.5, 0.5), 0.875),
])
def test_timm_models_get_their_data_config(name, size, mean, crop_pct):
    pre = resolve_preprocess(name)
    cfg = resolve_data_config(model=timm.create_model(name))  # timm's own answer for the built model
    assert pre.input_size == cfg["input_size"] == (3, size, size)
    assert pre.mean == pytest.approx(cfg["mean"]) and pre.mean == pytest.approx(mean)
    assert pre.std == pytest.approx(cfg["std"]) and pre.interpolation == cfg["interpolation"] == "bicubic"
    assert pre.crop_pct == pytest.approx(cfg["crop_pct"]) == crop_pct and pre.crop_mode == "center"
    assert resolve_preprocess(name, model=timm.create_model(name)) == pre
    assert resolve_preprocess(name, 48).img_size == 48 and resolve_preprocess(name, 48).mean == pre.mean


def test_a_vit_built_for_another_size_is_fed_that_size():
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32)
    assert resolve_preprocess("vit_tiny_patch16_224", model=vit).img_size == 32
    assert resolve_preprocess("vit_tiny_patch16_224", 64, model=vit).img_size == 64  # the override wins


def test_embedded_models_keep_the_task_suites_preprocessing():
    from common.data.tasks import get_task

    spec = get_task()
    for name in ("taskedge-vit-tiny", "taskedge-resnet-tiny", "taskedge_vit_tiny"):
        pre = resolve_preprocess(name)
        assert (pre.img_size, pre.mean, pre.std) == (spec.image_size, tuple(spec.mean), tuple(spec.std)) \
            == (32, (0.5,) * 3, (0.5,) * 3)
        assert pre.crop_mode == "squash" and pre.crop_pct == 1.0
    assert resolve_preprocess("taskedge-vit-tiny", 48).img_size == 48


def test_an_unknown_model_name_is_refused():
    with pytest.raises(ValueError, match="'resnet181': not a timm model name"):
        resolve_preprocess("resnet181")


@pytest.mark.parametrize("name, img_size", [("resnet18", None), ("vit_tiny_patch16_224", None), ("resnet18", 40),
                                            ("taskedge-vit-tiny", None)])
def test_apply_equals_timms_eval_transform(name, img_size):
    """Grayscale, RGBA and palette images converted to RGB; resize + centre crop + normalise as timm does it,
    bit for bit (the batched scaling reproduces ToTensor + Normalize)."""
    pre = resolve_preprocess(name, img_size)
    if img_size is None and not name.startswith("taskedge"):
        ref_t = create_transform(**resolve_data_config(model=timm.create_model(name)))  # timm, independently
    else:
        ref_t = pre.transform()
    images = _images()
    x = apply(pre, images)
    ref = torch.stack([ref_t(im.convert("RGB")) for im in images])
    assert x.shape == (len(images), *pre.input_size) and x.dtype == torch.float32
    assert torch.equal(x, ref)


def test_apply_takes_uint8_arrays_and_single_images():
    pre = resolve_preprocess("resnet18", 32)
    rng = np.random.default_rng(1)
    batch = rng.integers(0, 255, (3, 20, 26, 3), dtype=np.uint8)
    ref = torch.stack([pre.transform()(Image.fromarray(a)) for a in batch])
    assert torch.equal(apply(pre, batch), ref)                         # (N, H, W, 3)
    assert torch.equal(apply(pre, batch[0]), ref[:1])                  # one (H, W, 3)
    assert torch.equal(apply(pre, Image.fromarray(batch[1])), ref[1:2])  # one PIL image
    gray = batch[..., 0]
    assert torch.equal(apply(pre, list(gray)), apply(pre, [Image.fromarray(g).convert("RGB") for g in gray]))
    with pytest.raises(TypeError, match="uint8"):
        apply(pre, [batch[0].astype(np.float32)])


def test_centre_crop_keeps_the_aspect_ratio_and_squash_does_not():
    """A wide image: the centre crop drops its sides (aspect kept), squash keeps them (the embedded models)."""
    img = np.zeros((32, 96, 3), np.uint8)
    img[:, :16] = 255  # a white band on the left edge
    center = Preprocess(32, (0.0,) * 3, (1.0,) * 3, "bilinear", 1.0, "center")
    squash = Preprocess(32, (0.0,) * 3, (1.0,) * 3, "bilinear", 1.0, "squash")
    assert float(apply(center, img)[0, :, :, :4].max()) == 0.0       # cropped away
    assert float(apply(squash, img)[0, :, :, :4].min()) == 1.0       # squashed in


def test_preprocess_round_trips_through_dict_and_json():
    pre = resolve_preprocess("resnet18", 64)
    assert Preprocess.from_dict(pre.to_dict()) == pre and Preprocess.from_json(pre.to_json()) == pre
    assert pre.to_dict() == {"img_size": 64, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                             "interpolation": "bicubic", "crop_pct": 0.95, "crop_mode": "center"}
    with pytest.raises(AttributeError):  # frozen
        pre.img_size = 3
