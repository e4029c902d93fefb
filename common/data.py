"""Download-free image tasks: an offline suite in the spirit of VTAB-1k.

The project must run offline, so every task is rendered with numpy from a seed
(or, for ``digits``, from scikit-learn's bundled 8x8 digits) instead of being
downloaded.  ``SUITE`` lists the downstream tasks, each with 1,000 training
examples plus ``val`` (model selection), ``calib`` and ``test`` splits:

- natural-like: ``digits`` (scikit-learn digits, upscaled, placed and coloured
  at random on textured backgrounds), ``textures`` (8 procedural texture families);
- structured: ``count`` (how many objects, 1-6), ``orientation`` (angle of a bar,
  8 bins over 180 degrees);
- distribution shift: ``shapes-shift`` (the upstream shapes inverted, colour-cast
  and noisy);
- unseen classes: ``shapes-downstream`` (10 shapes absent upstream, on textured,
  cluttered backgrounds).

The embedded backbone is pre-trained on ``upstream-mix`` (upstream shapes +
random stroke glyphs, 30 classes), which no suite task shares classes with
except the shifted one, by design.

Images are cached as uint8 ``.npz`` arrays (never pickles) under
``$TASKEDGE_CACHE`` (default ``~/.cache/taskedge-fl``).
"""

from __future__ import annotations

import hashlib
import os
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch

__all__ = [
    "TaskSpec",
    "TASKS",
    "SUITE",
    "DEFAULT_TASK",
    "SPLITS",
    "cache_dir",
    "fingerprint",
    "get_task",
    "make_split",
    "normalize",
    "to_hf_dataset",
    "from_hf_dataset",
    "load_image_folder",
    "load_hf_dataset",
    "task_preprocess",
]

DATA_VERSION = 2
SPLITS = ("train", "calib", "test", "val")  # append only: the index seeds each split's stream
_CHUNK = 500  # samples per seeded chunk: any ``n`` is a prefix of a larger ``n``
_SUPERSAMPLE = 2  # render at 2x and average-pool, for anti-aliased edges

# --------------------------------------------------------------------------
# Shapes: boolean masks over local coordinates (u, v) in about [-1, 1],
# v pointing down.  Keep each one tiny and readable.
# --------------------------------------------------------------------------
Mask = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _polar(u, v):
    return np.hypot(u, v), np.arctan2(v, u)


def _ngon(u, v, n: int, rot: float = -np.pi / 2):
    """Regular n-gon with circumradius 1 and a vertex at angle ``rot``."""
    r, phi = _polar(u, v)
    sector = 2 * np.pi / n
    return r * np.cos(np.mod(phi - rot, sector) - sector / 2) <= np.cos(np.pi / n)


def _plus(u, v, half_width: float = 0.28):
    return ((np.abs(u) <= half_width) & (np.abs(v) <= 1)) | (
        (np.abs(v) <= half_width) & (np.abs(u) <= 1)
    )


def _star(u, v, points: int = 5, inner: float = 0.42):
    r, phi = _polar(u, v)
    t = np.mod(phi + np.pi / 2, 2 * np.pi / points) / (2 * np.pi / points)
    return r <= inner + (1 - inner) * np.abs(2 * t - 1)


def _stripes(u, v):
    inside = (np.abs(u) <= 0.9) & (np.abs(v) <= 0.9)
    return inside & (np.floor((v + 0.9) / 0.36) % 2 == 0)


def _hourglass(u, v):
    return (np.abs(u) <= np.abs(v) * 0.95 + 0.08) & (np.abs(v) <= 0.9)


def _arrow(u, v):
    shaft = (np.abs(v) <= 0.2) & (u >= -1) & (u <= 0.2)
    head = (u >= 0.1) & (u <= 1) & (np.abs(v) <= (1 - u) * 0.85)
    return shaft | head


def _dots(u, v):
    centres = ((-0.55, 0.45), (0.55, 0.45), (0.0, -0.5))
    return np.any([np.hypot(u - a, v - b) <= 0.32 for a, b in centres], axis=0)


SHAPES: dict[str, Mask] = {
    # upstream vocabulary
    "circle": lambda u, v: np.hypot(u, v) <= 0.95,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.78,
    "triangle": lambda u, v: _ngon(u, v, 3),
    "plus": _plus,
    "ring": lambda u, v: (np.hypot(u, v) <= 0.95) & (np.hypot(u, v) >= 0.5),
    "star": _star,
    "stripes": _stripes,
    "diamond": lambda u, v: np.abs(u) + np.abs(v) <= 1,
    "frame": lambda u, v: (np.maximum(np.abs(u), np.abs(v)) <= 0.85)
    & (np.maximum(np.abs(u), np.abs(v)) >= 0.5),
    "half-disk": lambda u, v: (np.hypot(u, v - 0.4) <= 1) & (v <= 0.4),
    # downstream-only vocabulary
    "hexagon": lambda u, v: _ngon(u, v, 6, rot=0.0),
    "ellipse": lambda u, v: (u / 1.0) ** 2 + (v / 0.55) ** 2 <= 1,
    "x-cross": lambda u, v: _plus((u + v) / np.sqrt(2), (u - v) / np.sqrt(2), 0.25),
    "hourglass": _hourglass,
    "arrow": _arrow,
    "l-shape": lambda u, v: (np.maximum(np.abs(u), np.abs(v)) <= 0.8) & ((u <= -0.3) | (v >= 0.3)),
    "t-shape": lambda u, v: ((np.abs(u) <= 0.9) & (v >= -0.9) & (v <= -0.45))
    | ((np.abs(u) <= 0.22) & (np.abs(v) <= 0.9)),
    "crescent": lambda u, v: (np.hypot(u, v) <= 0.95) & (np.hypot(u - 0.4, v) > 0.75),
    "triangle-outline": lambda u, v: _ngon(u, v, 3) & ~_ngon(u / 0.5, v / 0.5, 3),
    "dots": _dots,
}


# --------------------------------------------------------------------------
# Task specs
# --------------------------------------------------------------------------
KINDS = ("shapes", "digits", "textures", "count", "orientation", "glyphs", "mixture")
TEXTURES = ("stripes", "checker", "dots", "rings", "zigzag", "bricks", "blotches", "speckle")
GLYPHS = tuple(f"glyph-{k:02d}" for k in range(20))
DIGITS = tuple(str(d) for d in range(10))


@dataclass(frozen=True)
class TaskSpec:
    """Everything that determines a generated task; its repr keys the cache.

    ``kind`` picks the renderer; ``class_names`` are shape names for ``shapes`` and labels
    otherwise; a ``mixture`` concatenates the label spaces of its ``sources`` (task names).
    """

    name: str
    num_classes: int
    image_size: int
    class_names: tuple[str, ...]
    kind: str = "shapes"
    group: str = ""  # suite group: natural | structured | shift | unseen | upstream
    background: str = "plain"  # "plain" | "texture"
    polarity: str = "light-on-dark"  # "light-on-dark" | "dark-on-light"
    clutter: int = 0  # distractor strokes behind the shape
    texture_strength: float = 0.2  # amplitude of each background colour grating
    max_rotation: float = 20.0  # degrees; small, so plus/x-cross stay distinct
    scale_range: tuple[float, float] = (0.2, 0.32)  # shape radius / image size
    noise: float = 0.03  # pixel noise std (images in [0, 1])
    colour_gain: tuple[float, float, float] = (1.0, 1.0, 1.0)  # per-channel gain (a colour cast)
    sources: tuple[str, ...] = ()  # mixture only
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    train_size: int = 1000
    calib_size: int = 256
    test_size: int = 1000
    val_size: int = 500
    description: str = ""

    def __post_init__(self):
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{self.name}: {self.num_classes} classes but {len(self.class_names)} names")
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: unknown kind {self.kind!r}; known: {KINDS}")
        if self.kind in ("shapes", "count"):
            unknown = [c for c in (self.class_names if self.kind == "shapes" else ()) if c not in SHAPES]
            if unknown:
                raise ValueError(f"{self.name}: unknown shapes {unknown}; known: {sorted(SHAPES)}")
        if self.kind == "mixture" and not self.sources:
            raise ValueError(f"{self.name}: a mixture needs sources")

    def split_size(self, split: str) -> int:
        return {"train": self.train_size, "calib": self.calib_size, "test": self.test_size,
                "val": self.val_size}[split]


_UPSTREAM_SHAPES = ("circle", "square", "triangle", "plus", "ring", "star", "stripes", "diamond", "frame", "half-disk")
_DOWNSTREAM_SHAPES = (
    "hexagon", "ellipse", "x-cross", "hourglass", "arrow", "l-shape", "t-shape", "crescent", "triangle-outline", "dots",
)

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        # ---- upstream (pre-training) ------------------------------------------------------------
        TaskSpec(
            name="shapes-upstream",
            num_classes=len(_UPSTREAM_SHAPES),
            image_size=32,
            class_names=_UPSTREAM_SHAPES,
            group="upstream",
            train_size=12000,
            calib_size=500,
            test_size=1000,
            description="pre-training source: 10 light shapes on plain dark backgrounds",
        ),
        TaskSpec(
            name="glyphs-upstream",
            num_classes=len(GLYPHS),
            image_size=32,
            class_names=GLYPHS,
            kind="glyphs",
            group="upstream",
            background="texture",
            texture_strength=0.12,
            train_size=12000,
            calib_size=500,
            test_size=1000,
            description="pre-training source: 20 random three-stroke glyphs, light on dark textured backgrounds",
        ),
        TaskSpec(
            name="upstream-mix",
            num_classes=len(_UPSTREAM_SHAPES) + len(GLYPHS),
            image_size=32,
            class_names=tuple(f"shape:{c}" for c in _UPSTREAM_SHAPES) + tuple(f"glyph:{c}" for c in GLYPHS),
            kind="mixture",
            sources=("shapes-upstream", "glyphs-upstream"),
            group="upstream",
            train_size=40000,
            calib_size=500,
            test_size=2000,
            description="the embedded backbone's pre-training data: upstream shapes + glyphs, one 30-way label space",
        ),
        # ---- the downstream suite ---------------------------------------------------------------
        TaskSpec(
            name="digits",
            num_classes=10,
            image_size=32,
            class_names=DIGITS,
            kind="digits",
            group="natural",
            background="texture",
            texture_strength=0.15,
            noise=0.05,
            description="scikit-learn's 8x8 digits, upscaled, rotated, placed and coloured at random on textures "
                        "(train/val/test drawn from disjoint source images)",
        ),
        TaskSpec(
            name="textures",
            num_classes=len(TEXTURES),
            image_size=32,
            class_names=TEXTURES,
            kind="textures",
            group="natural",
            noise=0.05,
            description="8 procedural texture families at random scale, orientation, phase and colours",
        ),
        TaskSpec(
            name="count",
            num_classes=6,
            image_size=32,
            class_names=("1", "2", "3", "4", "5", "6"),
            kind="count",
            group="structured",
            background="texture",
            texture_strength=0.1,
            description="how many small objects (1-6) are in the image",
        ),
        TaskSpec(
            name="orientation",
            num_classes=8,
            image_size=32,
            class_names=tuple(f"{22.5 * k:g}deg" for k in range(8)),
            kind="orientation",
            group="structured",
            background="texture",
            texture_strength=0.1,
            clutter=1,
            description="orientation of one bar, 8 bins of 22.5 degrees over 180",
        ),
        TaskSpec(
            name="shapes-shift",
            num_classes=len(_UPSTREAM_SHAPES),
            image_size=32,
            class_names=_UPSTREAM_SHAPES,
            group="shift",
            polarity="dark-on-light",
            noise=0.12,
            colour_gain=(1.0, 0.8, 0.55),
            description="distribution shift: the upstream shapes inverted (dark on light), colour-cast and noisy",
        ),
        TaskSpec(
            name="shapes-downstream",
            num_classes=len(_DOWNSTREAM_SHAPES),
            image_size=32,
            class_names=_DOWNSTREAM_SHAPES,
            group="unseen",
            background="texture",
            polarity="dark-on-light",
            clutter=2,
            scale_range=(0.24, 0.36),
            noise=0.05,
            description="unseen classes: 10 shapes absent upstream, dark on light textured, cluttered backgrounds",
        ),
    )
}
DEFAULT_TASK = "shapes-downstream"
SUITE = ("digits", "textures", "count", "orientation", "shapes-shift", "shapes-downstream")
UPSTREAM_TASK = "upstream-mix"


def get_task(name: str = DEFAULT_TASK) -> TaskSpec:
    """Look up a built-in task by name."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown task {name!r}; allowed: {sorted(TASKS)}") from None


def _as_spec(task: str | TaskSpec) -> TaskSpec:
    return task if isinstance(task, TaskSpec) else get_task(task)


# --------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------
def _random_hues(rng: np.random.Generator, n: int) -> np.ndarray:
    """Random colours whose brightest channel is 1 (varied hue and saturation)."""
    c = rng.uniform(0.0, 1.0, (n, 3))
    return c / c.max(axis=1, keepdims=True)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Supersampled pixel-centre coordinates, in output-pixel units."""
    g = ((np.arange(size * _SUPERSAMPLE) + 0.5) / _SUPERSAMPLE).astype(np.float32)
    return g[None, None, :], g[None, :, None]


def _pool(mask: np.ndarray, size: int) -> np.ndarray:
    n = mask.shape[0]
    return mask.reshape(n, size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(2, 4), dtype=np.float32)


def _shape_masks(spec: TaskSpec, rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """Soft (anti-aliased) masks of one randomly placed, scaled, rotated shape per image."""
    n, size = len(labels), spec.image_size
    X, Y = _grid(size)
    cx, cy = (rng.uniform(0.32, 0.68, (2, n)) * size).astype(np.float32)[:, :, None, None]
    radius = (rng.uniform(*spec.scale_range, n) * size).astype(np.float32)[:, None, None]
    theta = np.deg2rad(rng.uniform(-spec.max_rotation, spec.max_rotation, n)).astype(np.float32)
    cos, sin = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    dx, dy = X - cx, Y - cy
    u, v = (dx * cos + dy * sin) / radius, (-dx * sin + dy * cos) / radius
    mask = np.zeros(u.shape, dtype=bool)
    for k, shape in enumerate(spec.class_names):
        idx = labels == k
        if idx.any():
            mask[idx] = SHAPES[shape](u[idx], v[idx])
    return _pool(mask, size)


def _backgrounds(spec: TaskSpec, rng: np.random.Generator, n: int) -> np.ndarray:
    """Plain dark backgrounds, or light colour gratings (a texture the backbone never saw)."""
    size = spec.image_size
    if spec.polarity == "light-on-dark":
        base = rng.uniform(0.0, 0.3, (n, 3))
    else:
        base = rng.uniform(0.55, 0.95, (n, 3))
    bg = np.broadcast_to(base[:, :, None, None], (n, 3, size, size)).astype(np.float32)
    if spec.background == "texture":
        xs = np.arange(size, dtype=np.float32) / size
        X, Y = xs[None, None, :], xs[None, :, None]
        for _ in range(2):
            freq = rng.uniform(1.5, 5.0, n)[:, None, None]
            ang = rng.uniform(0, np.pi, n)[:, None, None]
            phase = rng.uniform(0, 2 * np.pi, n)[:, None, None]
            wave = np.sin(2 * np.pi * freq * (X * np.cos(ang) + Y * np.sin(ang)) + phase)
            tint = (rng.uniform(-1.0, 1.0, (n, 3)) * spec.texture_strength)[:, :, None, None]
            bg = bg + tint * wave[:, None].astype(np.float32)
    return bg


def _clutter(spec: TaskSpec, rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Paint thin random strokes so the shape is not the only foreground."""
    n, size = img.shape[0], spec.image_size
    X, Y = _grid(size)
    for _ in range(spec.clutter):
        a = rng.uniform(0, size, (2, n)).astype(np.float32)
        length = rng.uniform(4, 10, n).astype(np.float32)
        ang = rng.uniform(0, 2 * np.pi, n).astype(np.float32)
        d = np.stack([np.cos(ang), np.sin(ang)]) * length  # (2, n)
        ax, ay, ddx, ddy = (t[:, None, None] for t in (*a, *d))
        t = np.clip(((X - ax) * ddx + (Y - ay) * ddy) / (length**2)[:, None, None], 0, 1)
        dist = np.hypot(X - ax - t * ddx, Y - ay - t * ddy)
        m = _pool(dist <= 0.6, size)[:, None]
        colour = rng.uniform(0, 1, (n, 3, 1, 1)).astype(np.float32)
        img = img * (1 - m) + colour * m
    return img


def _paint(img: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Alpha-blend per-image colours (n, 3) through soft masks (n, H, W)."""
    m = mask[:, None]
    return img * (1 - m) + colour[:, :, None, None].astype(np.float32) * m


def _fg_colours(spec: TaskSpec, rng: np.random.Generator, n: int) -> np.ndarray:
    fg = _random_hues(rng, n)
    return fg * (rng.uniform(0.75, 1.0, (n, 1)) if spec.polarity == "light-on-dark" else rng.uniform(0.05, 0.35, (n, 1)))


def _draw_shapes(spec: TaskSpec, rng: np.random.Generator, labels: np.ndarray, split: str) -> np.ndarray:
    img = _clutter(spec, rng, _backgrounds(spec, rng, len(labels)))
    fg = _fg_colours(spec, rng, len(labels))
    return _paint(img, _shape_masks(spec, rng, labels), fg)


def _segment_dist(X, Y, ax, ay, bx, by):
    dx, dy = bx - ax, by - ay
    t = np.clip(((X - ax) * dx + (Y - ay) * dy) / np.maximum(dx * dx + dy * dy, 1e-6), 0, 1)
    return np.hypot(X - ax - t * dx, Y - ay - t * dy)


def _glyph_strokes(k: int) -> np.ndarray:
    """Glyph class k: three strokes with endpoints in [-0.85, 0.85]^2, fixed by k (3, 4)."""
    return np.random.default_rng([7, k]).uniform(-0.85, 0.85, (3, 4)).astype(np.float32)


def _draw_glyphs(spec: TaskSpec, rng: np.random.Generator, labels: np.ndarray, split: str) -> np.ndarray:
    n, size = len(labels), spec.image_size
    img = _backgrounds(spec, rng, n)
    X, Y = _grid(size)
    cx, cy = (rng.uniform(0.35, 0.65, (2, n)) * size).astype(np.float32)[:, :, None, None]
    radius = (rng.uniform(*spec.scale_range, n) * size).astype(np.float32)[:, None, None]
    theta = np.deg2rad(rng.uniform(-spec.max_rotation, spec.max_rotation, n)).astype(np.float32)
    cos, sin = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    u, v = ((X - cx) * cos + (Y - cy) * sin) / radius, (-(X - cx) * sin + (Y - cy) * cos) / radius
    strokes = np.stack([_glyph_strokes(int(k)) for k in range(spec.num_classes)])[labels]  # (n, 3, 4)
    dist = np.min([_segment_dist(u, v, *(strokes[:, s, c][:, None, None] for c in range(4))) for s in range(3)], axis=0)
    return _paint(img, _pool(dist <= 0.16, size), _fg_colours(spec, rng, n))


DIGIT_POOLS = {"train": (0, 1000), "calib": (0, 1000), "val": (1000, 1300), "test": (1300, 1797)}


@lru_cache(maxsize=1)
def sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits (1,797 images of 8x8, no download), in a fixed shuffled order."""
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.target))
    return (d.images[order] / 16.0).astype(np.float32), d.target[order].astype(np.int64)


def _draw_digits(spec: TaskSpec, rng: np.random.Generator, labels: np.ndarray, split: str) -> np.ndarray:
    """A source digit of the label from this split's pool, under a random affine map, in a random colour."""
    n, size = len(labels), spec.image_size
    images, targets = sklearn_digits()
    lo, hi = DIGIT_POOLS[split]
    pool_img, pool_lab = images[lo:hi], targets[lo:hi]
    pick = np.empty(n, dtype=np.int64)
    for k in np.unique(labels):
        cands = np.flatnonzero(pool_lab == k)
        sel = labels == k
        pick[sel] = cands[rng.integers(0, len(cands), int(sel.sum()))]
    scale = rng.uniform(0.5, 0.8, n)  # digit height / image height
    rot = np.deg2rad(rng.uniform(-12, 12, n))
    tx, ty = rng.uniform(-1, 1, (2, n)) * (1 - scale) * 0.8
    c, s_ = np.cos(rot), np.sin(rot)
    theta = np.stack([np.stack([c / scale, s_ / scale, -(c * tx + s_ * ty) / scale], 1),
                      np.stack([-s_ / scale, c / scale, (s_ * tx - c * ty) / scale], 1)], 1)
    src = torch.from_numpy(np.ascontiguousarray(pool_img[pick]))[:, None]
    big = size * _SUPERSAMPLE
    grid = torch.nn.functional.affine_grid(torch.from_numpy(theta).float(), [n, 1, big, big], align_corners=False)
    mask = torch.nn.functional.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    mask = np.clip(_pool(mask[:, 0].numpy(), size) * 1.3, 0, 1)
    img = _backgrounds(spec, rng, n)
    return _paint(img, mask, _fg_colours(spec, rng, n))


def _texture_pattern(kind: int, X, Y, rng: np.random.Generator, n: int) -> np.ndarray:
    """Binary pattern (n, H, W) of texture family `kind` on coordinates in [0, 1]."""
    f = rng.uniform(3.0, 6.0, n)[:, None, None].astype(np.float32)  # cycles per image
    a = rng.uniform(0, np.pi, n)[:, None, None].astype(np.float32)
    ph = rng.uniform(0, 1, (2, n))[:, :, None, None].astype(np.float32)
    u = (X * np.cos(a) + Y * np.sin(a)) * f + ph[0]
    v = (-X * np.sin(a) + Y * np.cos(a)) * f + ph[1]
    frac = lambda t: t - np.floor(t)  # noqa: E731
    name = TEXTURES[kind]
    if name == "stripes":
        return frac(u) < 0.5
    if name == "checker":
        return (np.floor(u) + np.floor(v)) % 2 == 0
    if name == "dots":
        return np.hypot(frac(u) - 0.5, frac(v) - 0.5) < 0.28
    if name == "rings":
        cx, cy = rng.uniform(0.2, 0.8, (2, n))[:, :, None, None]
        return frac(np.hypot(X - cx, Y - cy) * f + ph[0]) < 0.5
    if name == "zigzag":
        return frac(u + 0.8 * np.abs(2 * frac(v) - 1)) < 0.5
    if name == "bricks":
        row = np.floor(v)
        uu = u * 0.5 + 0.5 * (row % 2)
        return ~((frac(v) < 0.2) | (frac(uu) < 0.12))
    if name == "blotches":  # low-frequency random field, thresholded
        field = 0.0
        for _ in range(4):
            d = rng.uniform(0, 2 * np.pi, n)[:, None, None]
            fr = rng.uniform(1.0, 2.5, n)[:, None, None]
            p = rng.uniform(0, 2 * np.pi, n)[:, None, None]
            field = field + np.sin(2 * np.pi * fr * (X * np.cos(d) + Y * np.sin(d)) + p)
        return field > 0
    if name == "speckle":  # random cells of 2-3 px
        cell = rng.integers(2, 4, n)
        out = np.zeros((n, X.shape[-1], X.shape[-1]), dtype=bool)
        for c in (2, 3):
            idx = np.flatnonzero(cell == c)
            if idx.size:
                m = X.shape[-1] // _SUPERSAMPLE
                coarse = rng.random((idx.size, -(-m // c), -(-m // c))) < 0.5
                out[idx] = np.kron(coarse, np.ones((c * _SUPERSAMPLE, c * _SUPERSAMPLE), bool))[:, :X.shape[-1], :X.shape[-1]]
        return out
    raise ValueError(name)


def _draw_textures(spec: TaskSpec, rng: np.random.Generator, labels: np.ndarray, split: str) -> np.ndarray:
    n, size = len(labels), spec.image_size
    X, Y = (g / size for g in _grid(size))
    pat = np.zeros((n, size * _SUPERSAMPLE, size * _SUPERSAMPLE), dtype=bool)
    for k in np.unique(labels):
        sel = labels == k
        pat[sel] = _texture_pattern(int(k), X, Y, rng, int(sel.sum()))
    c1 = _random_hues(rng, n) * rng.uniform(0.6, 1.0, (n, 1))
    c2 = _random_hues(rng, n) * rng.uniform(0.0, 0.4, (n, 1))
    swap = rng.random(n) < 0.5
    c1[swap], c2[swap] = c2[swap].copy(), c1[swap].copy()
    img = np.broadcast_to(c2[:, :, None, None], (n, 3, size, size)).astype(np.float32)
    return _paint(img, _pool(pat, size), c1)


def _draw_count(spec: TaskSpec, rng: np.random.Generator, labels: np.ndarray, split: str) -> np.ndarray:
    """labels[i] + 1 discs or squares in distinct cells of a jittered 4x4 grid."""
    n, size = len(labels), spec.image_size
    img = _backgrounds(spec, rng, n)
    X, Y = _grid(size)
    cells = np.argsort(rng.random((n, 16)), axis=1)  # a random order of the 16 cells per image
    mask = np.zeros((n, size * _SUPERSAMPLE, size * _SUPERSAMPLE), dtype=bool)
    cell = size / 4
    for j in range(spec.num_classes):
        on = labels >= j
        cx = ((cells[:, j] % 4 + 0.5) * cell + rng.uniform(-1.5, 1.5, n))[:, None, None]
        cy = ((cells[:, j] // 4 + 0.5) * cell + rng.uniform(-1.5, 1.5, n))[:, None, None]
        r = rng.uniform(1.8, 3.0, n)[:, None, None]
        square = (rng.random(n) < 0.5)[:, None, None]
        obj = np.where(square, np.maximum(np.abs(X - cx), np.abs(Y - cy)) <= r * 0.85, np.hypot(X - cx, Y - cy) <= r)
        mask |= obj & on[:, None, None]
    return _paint(img, _pool(mask, size), _fg_colours(spec, rng, n))


def draw_orientation(spec: TaskSpec, rng: np.random.Generator, labels: np.ndarray, split: str) -> np.ndarray:
    """A bar (ellipse of aspect 0.25) at angle 22.5 * label +- 6 degrees."""
    n, size = len(labels), spec.image_size
    img = _clutter(spec, rng, _backgrounds(spec, rng, n))
    X, Y = _grid(size)
    cx, cy = (rng.uniform(0.38, 0.62, (2, n)) * size).astype(np.float32)[:, :, None, None]
    radius = (rng.uniform(0.28, 0.4, n) * size).astype(np.float32)[:, None, None]
    theta = np.deg2rad(180.0 / spec.num_classes * labels + rng.uniform(-6, 6, n)).astype(np.float32)
    cos, sin = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    u, v = ((X - cx) * cos + (Y - cy) * sin) / radius, (-(X - cx) * sin + (Y - cy) * cos) / radius
    return _paint(img, _pool(u**2 + (v / 0.25) ** 2 <= 1, size), _fg_colours(spec, rng, n))


def _draw_mixture(spec: TaskSpec, rng: np.random.Generator, labels: np.ndarray, split: str) -> np.ndarray:
    out = np.zeros((len(labels), 3, spec.image_size, spec.image_size), dtype=np.float32)
    offset = 0
    for name in spec.sources:
        src = get_task(name)
        sel = (labels >= offset) & (labels < offset + src.num_classes)
        if sel.any():
            out[sel] = _finish(src, rng, _DRAW[src.kind](src, rng, labels[sel] - offset, split))
        offset += src.num_classes
    return out


_DRAW = {"shapes": _draw_shapes, "glyphs": _draw_glyphs, "digits": _draw_digits, "textures": _draw_textures,
         "count": _draw_count, "orientation": draw_orientation, "mixture": _draw_mixture}


def _finish(spec: TaskSpec, rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Colour cast and pixel noise, clipped to [0, 1] (float)."""
    if spec.kind == "mixture":
        return img
    img = img * np.asarray(spec.colour_gain, dtype=np.float32)[None, :, None, None]
    img = img + rng.normal(0, spec.noise, img.shape).astype(np.float32)
    return np.clip(img, 0, 1)


def _render(spec: TaskSpec, rng: np.random.Generator, n: int, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Render ``n`` images as uint8 (N, 3, H, W) with class-balanced labels."""
    labels = rng.permutation(np.arange(n) % spec.num_classes).astype(np.int64)
    img = _finish(spec, rng, _DRAW[spec.kind](spec, rng, labels, split))
    return (img * 255 + 0.5).astype(np.uint8), labels


def _generate(spec: TaskSpec, split: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Chunked so that sample i depends only on (task, split, seed, i // chunk)."""
    task_key = zlib.crc32(spec.name.encode())
    xs, ys = [], []
    for chunk in range(0, n, _CHUNK):
        ss = np.random.SeedSequence([seed, SPLITS.index(split), task_key, chunk // _CHUNK])
        x, y = _render(spec, np.random.default_rng(ss), _CHUNK, split)
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs)[:n], np.concatenate(ys)[:n]


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------
def cache_dir() -> Path:
    """Where generated data and pre-trained weights live (``$TASKEDGE_CACHE``)."""
    return Path(os.environ.get("TASKEDGE_CACHE") or Path.home() / ".cache" / "taskedge-fl").expanduser()


def fingerprint(spec: TaskSpec) -> str:
    return hashlib.sha1(f"{DATA_VERSION}:{spec!r}".encode()).hexdigest()[:10]


def normalize(images_u8: np.ndarray | torch.Tensor, spec: TaskSpec) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32, normalised with the task's mean/std."""
    x = torch.as_tensor(np.asarray(images_u8)).float().div_(255.0)
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    return (x - mean) / std


def make_split(
    task: str | TaskSpec = DEFAULT_TASK, split: str = "train", n: int | None = None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic (images, labels) for one split; cached as npz after the first call.

    Splits draw from disjoint seed streams, so train/calib/test never share samples.
    """
    spec = _as_spec(task)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {list(SPLITS)}")
    n = spec.split_size(split) if n is None else int(n)
    if n <= 0 or seed < 0:
        raise ValueError(f"need n > 0 and seed >= 0, got n={n}, seed={seed}")
    path = cache_dir() / "data" / f"{spec.name}-{fingerprint(spec)}-{split}-s{seed}-n{n}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            x, y = z["x"], z["y"]
    else:
        x, y = _generate(spec, split, n, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, x=x, y=y)
        os.replace(tmp, path)  # atomic: concurrent clients never read a partial file
    return normalize(x, spec), torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))


def to_hf_dataset(x: torch.Tensor, y: torch.Tensor, class_names: list[str] | None = None):
    """Wrap tensors as a ``datasets.Dataset`` so flwr-datasets partitioners can split them."""
    import datasets

    x_np = np.ascontiguousarray(torch.as_tensor(x).detach().cpu().numpy(), dtype=np.float32)
    y_np = torch.as_tensor(y).detach().cpu().numpy().astype(np.int64)
    if class_names is None:
        num_classes = int(y_np.max()) + 1 if y_np.size else 1
        label = datasets.ClassLabel(num_classes=num_classes)
    else:
        label = datasets.ClassLabel(names=list(class_names))
    features = datasets.Features(
        {"image": datasets.Array3D(shape=tuple(x_np.shape[1:]), dtype="float32"), "label": label}
    )
    return datasets.Dataset.from_dict({"image": x_np, "label": y_np}, features=features)


def from_hf_dataset(ds, image_column: str = "image", label_column: str = "label"):
    """Inverse of :func:`to_hf_dataset`: (float32 images, int64 labels)."""
    import datasets

    if isinstance(ds.features.get(image_column), datasets.Image):
        raise ValueError("PIL image columns need resizing/normalising: use load_image_folder() instead")
    cols = ds.with_format("numpy", columns=[image_column, label_column])[:]  # one batched read: `ds[col]` is
    x = torch.from_numpy(np.asarray(cols[image_column], dtype=np.float32))  # a lazy column formatted row by row
    y = torch.from_numpy(np.asarray(cols[label_column]).astype(np.int64))
    return x, y


def task_preprocess(task: str | TaskSpec = DEFAULT_TASK):
    """A task's preprocessing as a `common.preprocess.Preprocess`: its size and mean/std, squashed (bilinear)."""
    from common.preprocess import Preprocess

    spec = _as_spec(task)
    return Preprocess(spec.image_size, tuple(spec.mean), tuple(spec.std), "bilinear", 1.0, "squash")


def _own_data(path: Path, task: str | TaskSpec, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`split` of a dataset that has its own splits (HF names too: "validation"), else all of it
    (common.userdata.load_data: RGB conversion, corrupt images skipped, one-line DataError for a bad layout)."""
    from common.userdata import SPLIT_NAMES, inspect_data, load_data

    key = next((s for s, names in SPLIT_NAMES.items() if split in names), split)
    own_splits = len(inspect_data(path).carved) < 3
    x, y, _ = load_data(path, key if own_splits and key in SPLIT_NAMES else "all", task_preprocess(task))
    return x, y


def load_hf_dataset(name: str, task: str | TaskSpec = DEFAULT_TASK, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """A Hugging Face image dataset by hub name (needs the network) or a `save_to_disk` folder (offline),
    resized and normalised like `task`."""
    if Path(name).expanduser().is_dir():
        return _own_data(Path(name).expanduser(), task, split)
    import datasets

    from common.userdata import dataset_tensors

    x, y, _ = dataset_tensors(datasets.load_dataset(name, split=split), task_preprocess(task), where=name)
    return x, y


def load_image_folder(
    path: str | os.PathLike, task: str | TaskSpec = DEFAULT_TASK, split: str = "train"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring-your-own data: an ImageFolder tree or a HF ``save_to_disk`` folder, as `task`'s images.

    Images are resized to the task's image size and normalised like the task, so they can replace the
    generated data without touching the model. A thin wrapper of `common.userdata.load_data` (which
    takes a model's own preprocessing instead): `split` of data with its own splits, else all of it.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {path}")
    return _own_data(path, task, split)
