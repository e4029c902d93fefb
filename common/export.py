"""A fine-tuned model as one safetensors file that says how to use it: model name, classes, preprocessing.

`save_model` writes the merged (plain) model's weights with metadata; `load_model` is the one call that
gives it back as a timm model in eval mode together with the eval transform it was trained with and its
class names. Both the federation's `final_model.safetensors` and `finetune`'s saved model use it.

    model, transform, class_names = load_model("runs/<run>/final_model.safetensors")
    probs = model(transform(pil_image).unsqueeze(0)).softmax(-1)
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from common.preprocess import Preprocess

FORMAT = "taskedge-fl/1"


def save_model(model, path: str | os.PathLike, *, model_name: str, class_names: list[str],
               preprocess: Preprocess, extra: dict | None = None, extra_meta: dict | None = None) -> Path:
    """A plain (merged) model or its state dict, with metadata (strings, as safetensors wants): format, model
    (the name `load_model` rebuilds it from: embedded or timm), num-classes, class-names (JSON), preprocess
    (JSON), and `extra` / `extra_meta` (method, rounds, ...; JSON for what is not a string). Written
    atomically; the parent folder is created."""
    from safetensors.torch import save_file

    state_dict = model.state_dict() if hasattr(model, "state_dict") else model
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    given = {**(extra or {}), **(extra_meta or {})}
    meta = {**{str(k): v if isinstance(v, str) else json.dumps(v) for k, v in given.items()},
            "format": FORMAT, "model": model_name, "num-classes": str(len(class_names)),
            "class-names": json.dumps(list(class_names)), "preprocess": preprocess.to_json()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_model(path: str | os.PathLike):
    """(timm model in eval mode with the saved weights, its eval transform, its class names).

    The model is rebuilt by name (`common.models.create_model`: an embedded model or any timm architecture;
    a ViT at the image size it was trained at), its weights loaded strictly; the transform is timm's eval
    transform for the stored preprocessing (PIL image -> float tensor (3, s, s)); `stored_preprocess(path)`
    gives the `Preprocess` itself, for `common.preprocess.apply` on a batch."""
    from safetensors.torch import load_file

    from common.methods import takes_img_size
    from common.models import create_model

    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a model saved by taskedge-fl (metadata format {meta.get('format')!r})")
    names, pre = json.loads(meta["class-names"]), Preprocess.from_json(meta["preprocess"])
    kw = {"img_size": pre.img_size} if takes_img_size(meta["model"]) else {}
    model = create_model(meta["model"], num_classes=int(meta["num-classes"]), **kw)
    model.load_state_dict(load_file(str(path)))
    return model.eval(), pre.transform(), names


def stored_preprocess(path: str | os.PathLike) -> Preprocess:
    """The preprocessing a saved model was trained with."""
    return Preprocess.from_json(read_metadata(path)["preprocess"])
