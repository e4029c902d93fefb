"""Model factory: any timm model by name, plus the embedded offline default, and the backbone check.

``create_model`` builds a timm model or an embedded one (``common.architectures``; its pre-trained weights
come from ``common.backbones``), loads a local state dict (``load_weights``: strict, except a classifier
head of another shape) and gives every downstream model a genuinely fresh classifier head (seeded, so every
federated node builds the same one): the upstream head is never reused. ``backbone_fingerprint`` hashes the
frozen backbone as loaded: the server sends its fingerprint with the statistics query and a node holding
another backbone refuses.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import weakref
from pathlib import Path

import timm
import torch
from torch import nn

from common.architectures import DEFAULT_MODEL, EMBEDDED_MODELS
from common.backbones import embedded_backbone
from common.taskedge.tuner import find_head

__all__ = [
    "BACKBONE_KEY",
    "BackboneMismatch",
    "backbone_fingerprint",
    "create_embedded",
    "create_model",
    "fresh_head",
    "load_weights",
    "read_state_dict",
    "resolve_name",
    "weights_mismatch",
]

log = logging.getLogger(__name__)

HEAD_SEED = 0  # seed of the fresh downstream head (the same head on every node)
BACKBONE_KEY = "backbone-sha256"  # statistics-query config key: the server's backbone_fingerprint()


class BackboneMismatch(RuntimeError):
    """This process holds another frozen backbone than the server's."""



# --------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------
def resolve_name(name: str) -> str:
    timm_name = EMBEDDED_MODELS.get(name, name)
    if timm_name.startswith(("hf-hub:", "hf_hub:", "local-dir:")) or timm.is_model(timm_name):
        return timm_name
    raise ValueError(
        f"unknown model {name!r}: not an embedded model {sorted(EMBEDDED_MODELS)} nor a timm model; "
        f"see timm.list_models('*{name.split('.')[0][:12]}*') for available names"
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path), device="cpu")
    else:
        try:  # weights_only: never unpickle arbitrary objects (they can run code when loaded)
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(f"{path} holds pickled Python objects; only plain tensors (a state dict) are "
                             f"accepted: re-save it with torch.save(model.state_dict(), ...) or as .safetensors") from e
        for key in ("state_dict", "model"):
            if isinstance(sd, dict) and isinstance(sd.get(key), dict):
                sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_weights(model: nn.Module, path: str | os.PathLike, *, skip_head: bool = False) -> list[str]:
    """Load a local state dict strictly, except a classifier head of a different shape.

    A checkpoint for another number of classes is the normal transfer case: its
    head tensors are skipped, so the model keeps its freshly initialised head.
    ``skip_head=True`` skips the checkpoint's head whatever its shape (a backbone for a new task).
    Returns the skipped head keys; any other mismatch raises.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    sd, own, head = read_state_dict(path), model.state_dict(), find_head(model)
    in_head = lambda k: k.startswith(head + ".")  # noqa: E731
    skipped = [k for k in sd if in_head(k) and (skip_head or k not in own or own[k].shape != sd[k].shape)]
    skipped += [k for k in own if in_head(k) and k not in sd]
    sd = {k: v for k, v in sd.items() if k not in skipped}
    if "pos_embed" in sd and "pos_embed" in own and sd["pos_embed"].shape != own["pos_embed"].shape:
        sd["pos_embed"] = _resample_pos_embed(model, sd["pos_embed"])  # ViT weights trained at another size
    problem = weights_mismatch({k: v for k, v in sd.items() if not in_head(k)},
                               {k: v for k, v in own.items() if not in_head(k)})
    if problem:
        raise ValueError(f"weights-path '{path}' does not fit {type(model).__name__}: {problem}")
    model.load_state_dict(sd, strict=False)
    if skipped:
        log.info("%s: classifier head %r re-initialised (shape differs)", path.name, head)
    return sorted(set(skipped))


def weights_mismatch(sd: dict, own: dict, show: int = 3) -> str:
    """'' when every key of `own` is in `sd` with its shape and `sd` has nothing else; else one line with the
    counts and the first few of each kind (a state dict of another architecture lists hundreds of keys)."""
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    parts = [f"{len(v)} {what} (e.g. {', '.join(v[:show])})" for what, v in
             (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)) if v]
    return f"of {len(own)} model tensors, " + "; ".join(parts) if parts else ""


def _resample_pos_embed(model: nn.Module, pos: torch.Tensor) -> torch.Tensor:
    """A ViT's absolute position embedding for the model's grid (timm's own resampling, as for pretrained
    weights at another image size); unchanged if the model has no such grid."""
    from timm.layers import resample_abs_pos_embed

    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is None:
        return pos
    prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 0)
    return resample_abs_pos_embed(pos, new_size=list(grid), num_prefix_tokens=prefix)


def fresh_head(model: nn.Module, seed: int = HEAD_SEED) -> nn.Module:
    """Re-initialise the classifier head from ``seed`` (nn.Linear's default init), in place."""
    head = model.get_submodule(find_head(model))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for m in head.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    return model


def create_model(
    name: str = DEFAULT_MODEL,
    *,
    num_classes: int,
    pretrained: bool = False,
    weights: str | os.PathLike | None = None,
    **kwargs,
) -> nn.Module:
    """Create any timm model (or an embedded one) by name.

    pretrained=True uses the Hugging Face hub for timm models and the shipped (or
    cached) upstream pre-training for embedded models, always with a fresh seeded
    head; ``weights`` loads a local .safetensors/.pth state dict instead (see
    :func:`load_weights`).
    """
    timm_name = resolve_name(name)
    if pretrained and weights is not None:
        raise ValueError("pass either pretrained=True or weights=..., not both")
    public = {v: k for k, v in EMBEDDED_MODELS.items()}.get(timm_name)
    embedded = public is not None
    if pretrained and embedded:
        weights = embedded_backbone(model=public)
    model = timm.create_model(timm_name, pretrained=pretrained and not embedded, num_classes=num_classes, **kwargs)
    if weights is not None:
        load_weights(model, weights, skip_head=pretrained and embedded)
    if pretrained and embedded:
        fresh_head(model)
    return model


def create_embedded(num_classes: int, *, model: str = DEFAULT_MODEL, **kw) -> nn.Module:
    """The embedded backbone with upstream weights and a fresh head for ``num_classes``."""
    return create_model(model, num_classes=num_classes, pretrained=True, **kw)


# --------------------------------------------------------------------------
# Backbone fingerprint: do the server and a node hold the same frozen backbone?
# --------------------------------------------------------------------------
_FINGERPRINTS: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, str]]" = weakref.WeakKeyDictionary()


def backbone_fingerprint(model: nn.Module) -> str:
    """sha256 of the frozen backbone as loaded: every state-dict entry but the classifier head's, in sorted
    key order, each as its key, dtype, shape and raw bytes (parameters and buffers alike).

    Equal on two builds of the same weights (whatever the head size), different when any entry changes.
    Cached per model object; the cache is checked against every tensor's storage and in-place version
    counter, so a model changed in place (load_state_dict, an optimizer step) is hashed again."""
    head = find_head(model)
    sd = {k: v for k, v in model.state_dict().items() if not (k == head or k.startswith(head + "."))}
    key = tuple((k, v.data_ptr(), v._version) for k, v in sorted(sd.items()))
    hit = _FINGERPRINTS.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().to("cpu").contiguous()
        h.update(f"{k}\0{str(t.dtype).removeprefix('torch.')}\0{tuple(t.shape)}\0{t.numel()}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    digest = h.hexdigest()
    _FINGERPRINTS[model] = (key, digest)
    return digest
