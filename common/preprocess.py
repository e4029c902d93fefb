"""The preprocessing a model expects: image size, normalisation, interpolation and crop, from timm.

A timm model states what it was trained with in its pretrained config (`input_size`, `mean`, `std`,
`interpolation`, `crop_pct`, `crop_mode`); timm's own `resolve_data_config` / `create_transform` turn that
into the eval transform, and this module only carries the result around: it is stored in the run
folder and in an exported model's metadata, so the model can be loaded back with the transform it was
trained with (`common/export.py`). The embedded models keep theirs (32 px, mean/std 0.5, images squashed
to the square, as the offline task suite is drawn). `img_size` overrides the size for any model.

    pre = resolve_preprocess("resnet18")            # 224 px, ImageNet mean/std, bicubic, crop_pct 0.95
    x = apply(pre, [pil_image, uint8_array])        # float32 (2, 3, 224, 224), = timm's eval transform

No torch at import time: `Preprocess` can be stored and read back where torch is not loaded.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

# The embedded models' preprocessing: the offline task suite's (common.data.tasks.TaskSpec: image_size 32,
# mean/std 0.5; tests check they agree), images squashed to the square with a bilinear resize.
EMBEDDED_SIZE, EMBEDDED_MEAN, EMBEDDED_STD = 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
_CHUNK = 256  # images converted to float per step in apply() (bounds the temporaries)


@dataclass(frozen=True)
class Preprocess:
    """What a model's eval transform does: resize with `interpolation` to `img_size / crop_pct`, crop
    `img_size` (crop_mode "center": shortest edge, aspect kept; "squash": both edges), scale to [0, 1],
    normalise with `mean` / `std` (per RGB channel)."""

    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_pct: float = 1.0
    crop_mode: str = "center"

    @property
    def input_size(self) -> tuple[int, int, int]:
        return (3, self.img_size, self.img_size)

    def to_dict(self) -> dict:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @staticmethod
    def from_dict(d: dict) -> "Preprocess":
        return Preprocess(int(d["img_size"]), tuple(float(v) for v in d["mean"]),
                          tuple(float(v) for v in d["std"]), str(d.get("interpolation", "bicubic")),
                          float(d.get("crop_pct", 1.0)), str(d.get("crop_mode", "center")))

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @staticmethod
    def from_json(text: str) -> "Preprocess":
        return Preprocess.from_dict(json.loads(text))

    def transform(self):
        """timm's eval transform for this preprocessing: PIL image -> normalised float tensor (3, s, s)."""
        from timm.data import create_transform

        return create_transform(input_size=self.input_size, is_training=False,
                                interpolation=self.interpolation, mean=self.mean, std=self.std,
                                crop_pct=self.crop_pct, crop_mode=self.crop_mode)


def _embedded(model_name: str) -> bool:
    from common.architectures import EMBEDDED_MODELS

    return model_name in EMBEDDED_MODELS or model_name in EMBEDDED_MODELS.values()


def embedded_preprocess(img_size: int | None = None) -> Preprocess:
    return Preprocess(img_size or EMBEDDED_SIZE, EMBEDDED_MEAN, EMBEDDED_STD, "bilinear", 1.0, "squash")


def resolve_preprocess(model_name: str, img_size: int | None = None, *, model=None) -> Preprocess:
    """The preprocessing of a model: the embedded models' own, else timm's data config for `model` (a built
    timm model: its `pretrained_cfg`, and a ViT's built input size) or for the name (its pretrained config;
    a `name.tag` picks that tag's). `img_size` (> 0) overrides the size. ValueError for an unknown name."""
    from timm.data import resolve_data_config

    if _embedded(model_name):
        return embedded_preprocess(img_size)
    if model is not None:
        cfg = resolve_data_config(model=model)
        built = getattr(getattr(model, "patch_embed", None), "img_size", None)  # a ViT built for another size
        size = img_size or (int(built[-1]) if built else int(cfg["input_size"][-1]))
    else:
        import timm
        from timm.models import get_pretrained_cfg

        from common.architectures import EMBEDDED_MODELS

        if not timm.is_model(model_name):
            raise ValueError(f"model {model_name!r}: not a timm model name (see timm.list_models()) nor an embedded "
                             f"model ({', '.join(sorted(EMBEDDED_MODELS))}); for hf-hub: names pass the built model")
        pcfg = get_pretrained_cfg(model_name)
        cfg = resolve_data_config(pretrained_cfg=pcfg.to_dict() if pcfg is not None else {})
        size = img_size or int(cfg["input_size"][-1])
    return Preprocess(int(size), tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"]),
                      str(cfg.get("interpolation") or "bicubic"), float(cfg.get("crop_pct") or 1.0),
                      str(cfg.get("crop_mode") or "center"))


def to_pil(image):
    """A PIL image or a uint8 array (H, W), (H, W, 1|3|4) as an RGB PIL image (grayscale, RGBA, palette
    and CMYK images converted; an RGBA image's alpha is dropped, as PIL's convert does)."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        import numpy as np

        a = np.asarray(image)
        if a.dtype != np.uint8:
            raise TypeError(f"expected a PIL image or a uint8 array, got an array of {a.dtype}")
        if a.ndim == 3 and a.shape[-1] == 1:
            a = a[..., 0]
        if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
            raise ValueError(f"expected an image array (H, W) or (H, W, 3|4), got shape {a.shape}")
        image = Image.fromarray(a)
    return image if image.mode == "RGB" else image.convert("RGB")


def geometric(preprocess: Preprocess):
    """The resize-and-crop part of timm's eval transform: RGB PIL image -> uint8 array (s, s, 3)."""
    import numpy as np
    from torchvision.transforms import Normalize

    *steps, to_tensor, normalize = preprocess.transform().transforms
    if type(to_tensor).__name__ != "MaybeToTensor" or not isinstance(normalize, Normalize):
        raise RuntimeError(f"timm's eval transform changed shape ({preprocess.transform()}); update common/preprocess")

    def run(image):
        for step in steps:
            image = step(image)
        return np.asarray(image, dtype=np.uint8)

    return run


def to_batch(preprocess: Preprocess, arrays: list):
    """uint8 arrays (s, s, 3) -> float32 (N, 3, s, s): timm's ToTensor (/255) and Normalize, over the batch."""
    import numpy as np
    import torch

    mean = torch.tensor(preprocess.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.std, dtype=torch.float32).view(1, 3, 1, 1)
    out = torch.empty(len(arrays), *preprocess.input_size, dtype=torch.float32)
    for s in range(0, len(arrays), _CHUNK):
        u8 = torch.from_numpy(np.stack(arrays[s:s + _CHUNK])).permute(0, 3, 1, 2)
        out[s:s + len(u8)] = u8.to(torch.float32).div(255).sub_(mean).div_(std)
    return out


def apply(preprocess: Preprocess, images):
    """A float32 batch (N, 3, s, s) from PIL images or uint8 arrays (one image, a list, or a stacked
    (N, H, W[, C]) uint8 array), converted to RGB: timm's eval transform (`preprocess.transform()`), the
    same numbers; the resize and crop run per image in PIL, the scaling and normalisation over the batch."""
    import numpy as np
    from PIL import Image

    if isinstance(images, Image.Image) or (isinstance(images, np.ndarray) and (
            images.ndim == 2 or (images.ndim == 3 and images.shape[-1] in (1, 3, 4)))):
        images = [images]
    run = geometric(preprocess)
    return to_batch(preprocess, [run(to_pil(im)) for im in images])
