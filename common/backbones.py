"""The embedded models' pre-trained backbones: where the shipped weights are, and how they were made.

Each embedded model (``common.architectures``) ships pre-trained weights (``common/weights/``,
safetensors, sha256 in ``EMBEDDED_WEIGHTS``): they come from ``simulations/pretrain_backbone.py``
(pre-training on the procedural ``upstream-mix`` task with the fixed ``RECIPE`` and seed), so the whole
project works offline and a first run does not pre-train. Shipped weights are looked for beside this
module, in ``$TASKEDGE_WEIGHTS_DIR`` and in the installed ``taskedge-fl`` distribution (a Flower app
bundle carries no .safetensors); when none is found the upstream backbone is never re-trained silently (a
re-run gives other bits than the shipped file): it is an error naming ``TASKEDGE_WEIGHTS_DIR``, unless
pre-training is asked for (``simulations/pretrain_backbone.py``, ``allow_pretrain=True`` or
``TASKEDGE_ALLOW_PRETRAIN=1``). Other upstream tasks are pre-trained with the same recipe on first use and
cached under ``$TASKEDGE_CACHE``. ``embedded_backbone`` is the entry point (``common.models.create_model``
calls it for ``pretrained=True``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path

import timm
import torch
from torch import nn

from common.architectures import DEFAULT_MODEL, EMBEDDED_MODELS
from common.data.splits import cache_dir, fingerprint, make_split
from common.data.tasks import UPSTREAM_TASK, TaskSpec, get_task

__all__ = [
    "ALLOW_PRETRAIN_ENV",
    "EMBEDDED_WEIGHTS",
    "MissingWeightsError",
    "RECIPE",
    "WEIGHTS_DIR",
    "WEIGHTS_ENV",
    "embedded_backbone",
    "embedded_info",
    "installed_weights",
    "pretrain",
    "pretrained_weights_path",
    "sha256",
    "shipped_weights",
]

log = logging.getLogger(__name__)

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
DISTRIBUTION = "taskedge-fl"  # the project's installed distribution: where a FAB's apps find the shipped weights
WEIGHTS_ENV = "TASKEDGE_WEIGHTS_DIR"  # a folder holding the shipped weights files (deployments from a FAB)
ALLOW_PRETRAIN_ENV = "TASKEDGE_ALLOW_PRETRAIN"  # "1": missing shipped weights may be re-trained in this process
_OWN_WEIGHTS = Path(__file__).resolve().parent / "weights"  # WEIGHTS_DIR as imported (tests may patch WEIGHTS_DIR)


class MissingWeightsError(FileNotFoundError):
    """An embedded model's shipped weights are nowhere to be found (and pre-training was not asked for)."""



# --------------------------------------------------------------------------
# Embedded pre-training
# --------------------------------------------------------------------------
# fixed recipe: part of the cache key, so changing it re-trains (simulations/pretrain_backbone.py runs it)
RECIPE = {"steps": 8000, "batch_size": 128, "lr": 2e-3, "weight_decay": 0.05, "warmup_steps": 200, "seed": 0,
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

    r, total = RECIPE, RECIPE["steps"]
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
    recipe = hashlib.sha1(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:8]
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
    torch.set_num_threads(RECIPE["threads"])  # one thread: the same bits on every run of one build
    try:
        with torch.random.fork_rng():
            torch.manual_seed(RECIPE["seed"])
            net = timm.create_model(EMBEDDED_MODELS[model], num_classes=spec.num_classes)
            _pretrain(net, x, y, progress, desc=f"pre-training {model} on {spec.name}", device=device)
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - start
    acc = _accuracy(net, *make_split(spec, "test"))
    meta = {"model": model, "task": spec.name, "upstream_test_acc": f"{acc:.4f}",
            "pretrain_seconds": f"{seconds:.1f}", "recipe": json.dumps(RECIPE), "torch": torch.__version__,
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

