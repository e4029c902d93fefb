"""Checks of a user's model, weights and data before anything trains or any Flower process starts.

Each returns an error line (naming the key or option, the value and the expected form) or "" when fine;
`simulations/check_config.py` and `simulations/finetune.py` print it and exit 2. The file and folder
checks import no torch (answered in well under a second); `model_fits` builds the model on the meta
device and compares the weights file's keys and shapes with it (torch + timm, a few seconds).
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path


def weights_file(path: str | os.PathLike, key: str = "weights-path") -> str:
    """The file exists and is a safetensors file or a torch state dict (zip or legacy pickle format)."""
    p = Path(path).expanduser()
    if p.is_dir():
        return f"{key} '{path}' is a folder (expected a .safetensors file or a .pth state dict)"
    if not p.is_file():
        return f"{key} '{path}': no such file (expected a .safetensors file or a .pth state dict)"
    with open(p, "rb") as fh:
        head = fh.read(16)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch.save: zip archive, or the legacy pickle
        return ""
    if len(head) >= 9:
        n = struct.unpack("<Q", head[:8])[0]
        if 2 <= n <= 100 * 2**20 and head[8:9] == b"{":  # safetensors: 8-byte header length, then its JSON
            try:
                with open(p, "rb") as fh:
                    fh.seek(8)
                    json.loads(fh.read(n))
                return ""
            except ValueError:
                pass
    kind = "an image" if head[:4] in (b"\x89PNG", b"\xff\xd8\xff\xe0", b"\xff\xd8\xff\xe1") or head[:3] == b"GIF" \
        else "not a weights file"
    return f"{key} '{path}': {kind} (expected a .safetensors file or a torch state dict saved with torch.save)"


def data_path(path: str, key: str = "data-path") -> str:
    """The data's layout and classes (common.userdata.inspect_data, no torch). A name that is no local path
    but looks like a hub dataset ("owner/name") is not looked up here (the network may be slow or absent;
    loading it names the problem), unless HF_HUB_OFFLINE is set (then it is an error)."""
    from common.userdata import DataError, inspect_data

    try:
        inspect_data(path, hub=False)
    except DataError as exc:
        return str(exc).replace("data-path", key, 1)
    return ""


def model_name(name: str, key: str = "model") -> str:
    """An embedded model or a timm architecture name (imports timm)."""
    import timm

    from common.architectures import EMBEDDED_MODELS

    if name in EMBEDDED_MODELS or ":" in name or timm.is_model(name):
        return ""
    import difflib

    close = difflib.get_close_matches(name, timm.list_models(), n=3)
    return (f"{key} '{name}': neither an embedded model ({', '.join(EMBEDDED_MODELS)}) nor a timm model name"
            + (f" (close: {', '.join(close)})" if close else ""))


def model_fits(name: str, weights: str, img_size: int = 0, key: str = "weights-path", model_key: str = "model") -> str:
    """The weights file's keys and shapes against the model built on the meta device (no memory, no init):
    counts and the first few mismatches, never the whole key list. The classifier head may differ."""
    import torch

    import timm

    from common.methods import takes_img_size
    from common.models import read_state_dict, resolve_name, weights_mismatch
    from common.taskedge.tuner import find_head

    kw = {"img_size": img_size} if img_size and takes_img_size(name) else {}
    try:
        with torch.device("meta"):
            model = timm.create_model(resolve_name(name), num_classes=2, **kw)
    except Exception as exc:  # noqa: BLE001 - e.g. an image size the architecture cannot take: one line
        return f"{model_key} '{name}': cannot be built{' at img-size ' + str(img_size) if kw else ''} " \
               f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})"
    try:
        sd = read_state_dict(Path(weights).expanduser())
    except (ValueError, OSError) as exc:
        return f"{key} '{weights}': {exc}"
    own, head = model.state_dict(), find_head(model)
    in_head = lambda k: head is not None and (k == head or k.startswith(head + "."))  # noqa: E731
    if "pos_embed" in sd and "pos_embed" in own:
        sd = {k: v for k, v in sd.items() if k != "pos_embed"}  # resampled to the model's grid when loaded
        own = {k: v for k, v in own.items() if k != "pos_embed"}
    problem = weights_mismatch({k: v for k, v in sd.items() if not in_head(k)},
                               {k: v for k, v in own.items() if not in_head(k)})
    return f"{key} '{weights}' does not fit {name}: {problem}" if problem else ""

