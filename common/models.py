"""Model factory: any timm model by name, plus an embedded offline default.

The embedded default ("taskedge-vit-tiny") is a small timm VisionTransformer
whose Linear layers (qkv / proj / fc1 / fc2) are the TaskEdge targets.  Its
pre-trained weights ship with the package (``common/weights/``, safetensors,
sha256 in ``EMBEDDED_WEIGHTS``): they come from ``simulations/pretrain_backbone.py``
(pre-training on the procedural ``upstream-mix`` task, fixed recipe and seed),
so the whole project works offline and a first run does not pre-train.  Shipped weights are looked
for beside this module, in ``$TASKEDGE_WEIGHTS_DIR`` and in the installed ``taskedge-fl``
distribution (a Flower app bundle carries no .safetensors); when none is found the upstream
backbone is never re-trained silently (a re-run gives other bits than the shipped file): it is
an error naming ``TASKEDGE_WEIGHTS_DIR``, unless pre-training is asked for
(``simulations/pretrain_backbone.py``, ``allow_pretrain=True`` or ``TASKEDGE_ALLOW_PRETRAIN=1``).
Other upstream tasks are pre-trained with the same recipe on first use and cached under
``$TASKEDGE_CACHE``. ``backbone_fingerprint`` hashes the frozen backbone as loaded: the server
sends its fingerprint with the statistics query and a node holding another backbone refuses.
Two timm CNNs built the same way ship too, for the edge benchmark:
``taskedge-resnet-tiny`` (timm ResNet, BasicBlocks) and ``taskedge-mobilenetv2-tiny`` (timm's
MobileNetV2 builder: inverted residuals with depthwise convs).

Every downstream model gets a genuinely fresh classifier head (seeded, so every
federated node builds the same one): the upstream head is never reused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import pickle
import time
import weakref
from pathlib import Path

import timm
import torch
from timm.models import build_model_with_cfg, register_model
from timm.models._efficientnet_builder import decode_arch_def
from timm.models.efficientnet import EfficientNet
from timm.models.resnet import BasicBlock, ResNet
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from common.taskedge.tuner import find_head
from common.data import UPSTREAM_TASK, TaskSpec, cache_dir, fingerprint, get_task, make_split

__all__ = [
    "BACKBONE_KEY",
    "BackboneMismatch",
    "DEFAULT_MODEL",
    "EMBEDDED_MODELS",
    "MissingWeightsError",
    "backbone_fingerprint",
    "create_model",
    "create_embedded",
    "embedded_backbone",
    "embedded_info",
    "installed_weights",
    "load_weights",
    "fresh_head",
]

log = logging.getLogger(__name__)

DEFAULT_MODEL = "taskedge-vit-tiny"
# public (hyphenated) name -> timm registry name (timm entrypoints are Python identifiers)
EMBEDDED_MODELS = {"taskedge-vit-tiny": "taskedge_vit_tiny", "taskedge-resnet-tiny": "taskedge_resnet_tiny",
                   "taskedge-mobilenetv2-tiny": "taskedge_mobilenetv2_tiny"}
PRETRAIN_VERSION = 2
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
# Shipped pre-trained weights: file in WEIGHTS_DIR and its sha256 (README: how to regenerate and verify).
EMBEDDED_WEIGHTS = {
    "taskedge-vit-tiny": ("taskedge-vit-tiny.safetensors",
                          "737dd37701832d9adad957fab2251fdb03abfec17de3b69863c0d078770ce008"),
    "taskedge-resnet-tiny": ("taskedge-resnet-tiny.safetensors",
                             "be0aa49f1d35a73f3162df24c31fe0f2caee66a37178b1ca61c4316e55564537"),
    "taskedge-mobilenetv2-tiny": ("taskedge-mobilenetv2-tiny.safetensors",
                                  "cbe2f759dab136086e8f580befb2b791c623761863828d3b0fd7f809f18f0349"),
}
HEAD_SEED = 0  # seed of the fresh downstream head (the same head on every node)
DISTRIBUTION = "taskedge-fl"  # the project's installed distribution: where a FAB's apps find the shipped weights
WEIGHTS_ENV = "TASKEDGE_WEIGHTS_DIR"  # a folder holding the shipped weights files (deployments from a FAB)
ALLOW_PRETRAIN_ENV = "TASKEDGE_ALLOW_PRETRAIN"  # "1": missing shipped weights may be re-trained in this process
BACKBONE_KEY = "backbone-sha256"  # statistics-query config key: the server's backbone_fingerprint()
_OWN_WEIGHTS = Path(__file__).resolve().parent / "weights"  # WEIGHTS_DIR as imported (tests may patch WEIGHTS_DIR)


class MissingWeightsError(FileNotFoundError):
    """An embedded model's shipped weights are nowhere to be found (and pre-training was not asked for)."""


class BackboneMismatch(RuntimeError):
    """This process holds another frozen backbone than the server's."""


# --------------------------------------------------------------------------
# Embedded architectures, registered with timm
# --------------------------------------------------------------------------
def _cfg(**kw) -> dict:
    """Pretrained-cfg without a URL: weights come from embedded_backbone(), never the hub."""
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "classifier": "head",
        **kw,
    }


# read by timm's register_model (it looks up ``default_cfgs`` in the defining module)
default_cfgs = {
    "taskedge_vit_tiny": _cfg(first_conv="patch_embed.proj"),
    "taskedge_resnet_tiny": _cfg(first_conv="conv1", classifier="fc"),
    "taskedge_mobilenetv2_tiny": _cfg(first_conv="conv_stem", classifier="classifier"),
}


def _taskedge_vit_tiny(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT for 32x32 inputs: 16 patch tokens (8x8), 4 blocks of width 64, mean-pooled (~0.21 M parameters).

    Width 64 (was 128 up to PRETRAIN_VERSION 1) keeps a training step of batch 32 near 20 ms on one
    CPU core, which is what lets the federated benchmark run 6 tasks x 3 seeds x 2 partitions x 9
    methods x 10 rounds within an hour on 2 cores. 8x8 patches and mean pooling (no class token)
    keep pre-training short.
    """
    args = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, mlp_ratio=4.0,
                class_token=False, global_pool="avg")
    return build_model_with_cfg(VisionTransformer, "taskedge_vit_tiny", pretrained, **dict(args, **kwargs))


def _taskedge_resnet_tiny(pretrained: bool = False, **kwargs) -> ResNet:
    """timm ResNet for 32x32 inputs: BasicBlock stages [1, 1, 1, 1] of widths 16-32-64-128 (~0.33 M
    parameters, Conv2d targets only). timm's 7x7 stride-2 stem is kept, its max-pool dropped, so the
    stages run at 16, 8, 4 and 2 pixels instead of collapsing to 1x1 on 32x32 images."""
    args = {"block": BasicBlock, "layers": (1, 1, 1, 1), "channels": (16, 32, 64, 128), "stem_width": 16}
    model = build_model_with_cfg(ResNet, "taskedge_resnet_tiny", pretrained, **dict(args, **kwargs))
    model.maxpool = nn.Identity()
    return model


# MobileNetV2's inverted-residual stages (timm's block-string notation), shortened and narrowed for
# 32x32 inputs: expansion 4 instead of 6, five stages ending at 2x2.
_MOBILENETV2_TINY_ARCH = [["ds_r1_k3_s1_c16"], ["ir_r2_k3_s2_e4_c24"], ["ir_r2_k3_s2_e4_c32"],
                          ["ir_r2_k3_s1_e4_c64"], ["ir_r1_k3_s2_e4_c96"]]


def _taskedge_mobilenetv2_tiny(pretrained: bool = False, **kwargs) -> EfficientNet:
    """timm's MobileNetV2 (EfficientNet class, ReLU6, BatchNorm) with a small arch for 32x32 inputs
    (~0.15 M parameters): standard stem/head convs, depthwise 3x3 and pointwise 1x1 convs."""
    args = {"block_args": decode_arch_def(_MOBILENETV2_TINY_ARCH), "num_features": 256, "stem_size": 16,
            "act_layer": nn.ReLU6}
    return build_model_with_cfg(EfficientNet, "taskedge_mobilenetv2_tiny", pretrained, **dict(args, **kwargs))


_ENTRYPOINTS = {"taskedge_vit_tiny": _taskedge_vit_tiny, "taskedge_resnet_tiny": _taskedge_resnet_tiny,
                "taskedge_mobilenetv2_tiny": _taskedge_mobilenetv2_tiny}


def _register() -> None:
    """Register once; re-registering would make timm warn about overwriting."""
    for name, fn in _ENTRYPOINTS.items():
        if not timm.is_model(name):
            fn.__name__ = name  # timm registers the entrypoint under its function name
            register_model(fn)


_register()


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


# --------------------------------------------------------------------------
# Embedded pre-training
# --------------------------------------------------------------------------
# fixed recipe: part of the cache key, so changing it re-trains (simulations/pretrain_backbone.py runs it)
_RECIPE = {"steps": 8000, "batch_size": 128, "lr": 2e-3, "weight_decay": 0.05, "warmup_steps": 200, "seed": 0,
           "threads": 1}


@contextlib.contextmanager
def _file_lock(path: Path):
    """Serialise first-time pre-training across processes (e.g. simulated clients)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        try:
            import fcntl

            fcntl.flock(fh, fcntl.LOCK_EX)
        except ImportError:  # non-POSIX: best effort, the write below is still atomic
            pass
        yield


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    model.eval()
    correct = sum((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum().item()
                  for i in range(0, len(x), batch_size))
    return correct / len(x)


def _pretrain(model: nn.Module, x: torch.Tensor, y: torch.Tensor, progress: bool, desc: str,
              device: str = "cpu") -> None:
    """AdamW + linear warm-up + cosine decay for a fixed number of steps (a fixed time budget)."""
    from tqdm.auto import tqdm

    r, total = _RECIPE, _RECIPE["steps"]
    model.to(device)
    x, y = x.to(device), y.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], weight_decay=r["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / r["warmup_steps"]) * 0.5 * (1 + math.cos(math.pi * s / total))
    )
    gen = torch.Generator().manual_seed(r["seed"])
    order = torch.empty(0, dtype=torch.long)
    model.train()
    for _ in tqdm(range(total), desc=desc, disable=not progress, leave=False, mininterval=1.0):
        if len(order) < r["batch_size"]:  # next epoch
            order = torch.randperm(len(x), generator=gen)
        idx, order = order[: r["batch_size"]], order[r["batch_size"] :]
        idx = idx.to(device)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.to("cpu")


def pretrained_weights_path(model: str, spec: TaskSpec) -> Path:
    recipe = hashlib.sha1(json.dumps(_RECIPE, sort_keys=True).encode()).hexdigest()[:8]
    tag = f"v{PRETRAIN_VERSION}-{fingerprint(spec)}-{recipe}"
    return cache_dir() / "weights" / f"{model}-{spec.name}-{tag}.safetensors"


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def shipped_weights(model: str = DEFAULT_MODEL) -> Path | None:
    """The weights file shipped with the project for an embedded model (None if there is none).

    Looked for next to this module, in `$TASKEDGE_WEIGHTS_DIR` and in the installed `taskedge-fl`
    distribution (:func:`installed_weights`): a Flower app bundle (FAB) carries only source and text files
    (flwr's built-in include list, not overridable), so a ServerApp/ClientApp run from an installed FAB
    finds no .safetensors beside it; run_flwr.sh points the variable at the checkout.
    """
    entry = EMBEDDED_WEIGHTS.get(model)
    if entry is None:
        return None
    for folder in (WEIGHTS_DIR, os.environ.get(WEIGHTS_ENV)):
        if folder and (Path(folder) / entry[0]).is_file():
            return Path(folder) / entry[0]
    return installed_weights(model)


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    """sha256 of a file, cached per (path, size, mtime)."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = sha256(path)
    return _SHA_CACHE[key]


def _distribution_candidates(fname: str) -> list[Path]:
    """Where the installed `taskedge-fl` distribution may hold `common/weights/<fname>`: a file it installed
    (a wheel install lists it in RECORD) and, for a local or editable install, the source checkout that
    `direct_url.json` names."""
    import importlib.metadata as md
    from urllib.parse import unquote, urlparse
    from urllib.request import url2pathname

    try:
        dist = md.distribution(DISTRIBUTION)
    except md.PackageNotFoundError:
        return []
    rel = f"common/weights/{fname}"
    out = [Path(dist.locate_file(f)) for f in (dist.files or []) if f.as_posix() == rel]
    try:
        url = json.loads(dist.read_text("direct_url.json") or "{}").get("url", "")
    except (ValueError, AttributeError):
        url = ""
    if url.startswith("file:"):
        out.append(Path(url2pathname(unquote(urlparse(url).path))) / "common" / "weights" / fname)
    return out


def installed_weights(model: str = DEFAULT_MODEL) -> Path | None:
    """The shipped weights file of the installed `taskedge-fl` distribution, when its sha256 is the one in
    `EMBEDDED_WEIGHTS` (None otherwise).

    For a `common` imported from somewhere else than the installed project, e.g. from a FAB that Flower
    unpacked: the installed distribution (an editable install's checkout, or a wheel's files) still holds
    `common/weights/`. The folder beside this very module is not looked at again."""
    entry = EMBEDDED_WEIGHTS.get(model)
    if entry is None:
        return None
    fname, expected = entry
    for path in _distribution_candidates(fname):
        try:
            if path.resolve().parent == _OWN_WEIGHTS or not path.is_file():
                continue
            if _file_sha256(path) == expected:
                return path
        except OSError:
            continue
        log.warning("%s: %s is not the shipped file (sha256 differs from EMBEDDED_WEIGHTS); not used", model, path)
    return None


def missing_weights_error(model: str) -> MissingWeightsError:
    """The one-line error for an embedded model whose shipped weights are nowhere (what to set, what to run)."""
    fname = EMBEDDED_WEIGHTS[model][0]
    env = os.environ.get(WEIGHTS_ENV)
    return MissingWeightsError(
        f"{model}: shipped weights {fname} not found (looked in {WEIGHTS_DIR}, in {WEIGHTS_ENV}="
        f"{env or '(unset)'} and in the installed {DISTRIBUTION} distribution); a Flower app bundle carries no "
        f".safetensors: set {WEIGHTS_ENV} to a folder holding {fname} (a checkout's common/weights/) for the "
        f"ServerApp and every SuperNode, or install the project (pip install -e <checkout>) where they run; "
        f"pre-training is explicit (python -m simulations.pretrain_backbone, or {ALLOW_PRETRAIN_ENV}=1) and "
        f"gives other bits than the shipped file, so every node would need that same file")


def pretrain_allowed() -> bool:
    """`$TASKEDGE_ALLOW_PRETRAIN` is set to 1/true/yes: missing shipped weights may be re-trained here."""
    return os.environ.get(ALLOW_PRETRAIN_ENV, "").strip().lower() in ("1", "true", "yes")


def pretrain(model: str = DEFAULT_MODEL, task: str = UPSTREAM_TASK, out: str | os.PathLike | None = None,
             progress: bool = True, device: str = "cpu") -> str:
    """Run the fixed pre-training recipe and write safetensors with metadata (upstream accuracy, time).

    device="cuda" runs the same recipe on a GPU (minutes instead of ~10 min of one CPU core); the
    bits then differ from a CPU run, the accuracy does not beyond noise."""
    from safetensors.torch import save_file

    spec = get_task(task)
    path = Path(out) if out is not None else pretrained_weights_path(model, spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    x, y = make_split(spec, "train")
    threads = torch.get_num_threads()
    torch.set_num_threads(_RECIPE["threads"])  # one thread: the same bits on every run of one build
    try:
        with torch.random.fork_rng():
            torch.manual_seed(_RECIPE["seed"])
            net = timm.create_model(EMBEDDED_MODELS[model], num_classes=spec.num_classes)
            _pretrain(net, x, y, progress, desc=f"pre-training {model} on {spec.name}", device=device)
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - start
    acc = _accuracy(net, *make_split(spec, "test"))
    meta = {"model": model, "task": spec.name, "upstream_test_acc": f"{acc:.4f}",
            "pretrain_seconds": f"{seconds:.1f}", "recipe": json.dumps(_RECIPE), "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"}
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)
    log.info("pre-trained %s on %s: test acc %.3f in %.0f s -> %s", model, spec.name, acc, seconds, path)
    return str(path)


def embedded_backbone(task: str = UPSTREAM_TASK, *, model: str = DEFAULT_MODEL, progress: bool = True,
                      allow_pretrain: bool | None = None) -> str:
    """Path to the pre-trained weights of an embedded model: the shipped file when there is one,
    else the cache, pre-training on first use.

    The upstream weights of a model that ships them are never re-trained silently (a deployment that
    misses them would pre-train on every node, each to other bits): without the shipped file this raises
    :class:`MissingWeightsError` unless `allow_pretrain` (default: `$TASKEDGE_ALLOW_PRETRAIN`) is true.
    Other tasks pre-train on first use, as before."""
    if model not in EMBEDDED_MODELS:
        raise ValueError(f"unknown embedded model {model!r}; allowed: {sorted(EMBEDDED_MODELS)}")
    if task == UPSTREAM_TASK and model in EMBEDDED_WEIGHTS:
        shipped = shipped_weights(model)
        if shipped is not None:
            return str(shipped)
        if not (pretrain_allowed() if allow_pretrain is None else allow_pretrain):
            raise missing_weights_error(model)
    spec = get_task(task)
    path = pretrained_weights_path(model, spec)
    if path.exists():
        return str(path)
    with _file_lock(path.with_suffix(".lock")):
        if path.exists():  # another process finished while we waited
            return str(path)
        pretrain(model, task, path, progress)
    return str(path)


def embedded_info(path: str | os.PathLike) -> dict[str, str]:
    """Metadata stored with embedded weights (upstream accuracy, timing, recipe)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


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
