"""The preprocessing a model expects: image size, normalisation, interpolation and crop, from timm.

A timm model states what it was trained with in its pretrained config (`input_size`, `mean`, `std`,
`interpolation`, `crop_pct`, `crop_mode`); timm's own `resolve_data_config` / `create_transform` turn that
into the eval transform, and this module only carries the result around: it is stored in the run
folder and in an exported model's metadata, so the model can be loaded back with the transform it was
trained with (`common/export.py`). The embedded models keep theirs (32 px, mean/std 0.5, images squashed
to the square, as the offline task suite is drawn). `img_size` overrides the size for any model.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Preprocess:
    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_pct: float = 1.0
    crop_mode: str = "center"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> "Preprocess":
        d = json.loads(text)
        return Preprocess(int(d["img_size"]), tuple(d["mean"]), tuple(d["std"]), d["interpolation"],
                          float(d["crop_pct"]), d.get("crop_mode", "center"))

    def transform(self):
        """timm's eval transform for this preprocessing: PIL image -> normalised float tensor (3, s, s)."""
        from timm.data import create_transform

        return create_transform(input_size=(3, self.img_size, self.img_size), is_training=False,
                                interpolation=self.interpolation, mean=self.mean, std=self.std,
                                crop_pct=self.crop_pct, crop_mode=self.crop_mode)


def resolve_preprocess(model_name: str, img_size: int | None = None) -> Preprocess:
    """The preprocessing of a model by name (project or timm name); `img_size` overrides its size."""
    from timm.data import resolve_data_config
    from timm.models import get_pretrained_cfg

    from common.models import EMBEDDED_MODELS

    if model_name in EMBEDDED_MODELS:  # drawn at their size: squash, no crop (what the offline suite does)
        size = img_size or 32
        return Preprocess(size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear", 1.0, "squash")
    import timm

    if not timm.is_model(model_name):
        raise ValueError(f"model {model_name!r}: not a timm model name (see timm.list_models()) nor an embedded "
                         f"model ({', '.join(sorted(EMBEDDED_MODELS))})")
    pcfg = get_pretrained_cfg(model_name)
    cfg = resolve_data_config(pretrained_cfg=pcfg.to_dict() if pcfg is not None else {})  # the training size
    size = img_size or int(cfg["input_size"][-1])
    return Preprocess(size, tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"]),
                      str(cfg.get("interpolation", "bicubic")), float(cfg.get("crop_pct", 1.0)),
                      str(cfg.get("crop_mode", "center")))
