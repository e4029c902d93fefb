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


def save_model(state_dict: dict, path: str | os.PathLike, *, model_name: str, class_names: list[str],
               preprocess: Preprocess, extra: dict | None = None) -> Path:
    """Weights + metadata (strings, as safetensors wants): format, model, num-classes, class-names (JSON),
    preprocess (JSON), and `extra` (method, rounds, ...). Written atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    meta = {"format": FORMAT, "model": model_name, "num-classes": str(len(class_names)),
            "class-names": json.dumps(list(class_names)), "preprocess": preprocess.to_json(),
            **{str(k): str(v) for k, v in (extra or {}).items()}}
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_model(path: str | os.PathLike):
    """(timm model in eval mode with the saved weights, its eval transform, its class names)."""
    from safetensors.torch import load_file

    from common.models import create_model

    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a model saved by taskedge-fl (metadata format {meta.get('format')!r})")
    names = json.loads(meta["class-names"])
    model = create_model(meta["model"], num_classes=int(meta["num-classes"]))
    model.load_state_dict(load_file(str(path)))
    return model.eval(), Preprocess.from_json(meta["preprocess"]).transform(), names
