"""The renderers: numpy drawing of every task kind, from seeded random streams.

``generate(spec, split, n, seed)`` is the one entry point (``common.data.splits.make_split`` caches
what it returns). Images come out as uint8 (N, 3, H, W) with class-balanced labels; sample i depends
only on (task, split, seed, i // 500), so any ``n`` is a prefix of a larger one. Every draw below
consumes the stream in a fixed order: reordering the calls changes every image.
"""

from __future__ import annotations

import zlib
from functools import lru_cache

import numpy as np
import torch

from common.data.shapes import SHAPES
from common.data.tasks import SPLITS, TEXTURES, TaskSpec, get_task

__all__ = [
    "DIGIT_POOLS",
    "DRAWERS",
    "draw_count",
    "draw_digits",
    "draw_glyphs",
    "draw_mixture",
    "draw_orientation",
    "draw_shapes",
    "draw_textures",
    "generate",
    "sklearn_digits",
]

_CHUNK = 500  # samples per seeded chunk: any ``n`` is a prefix of a larger ``n``
_SUPERSAMPLE = 2  # render at 2x and average-pool, for anti-aliased edges


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


def draw_shapes(spec: TaskSpec, rng: np.random.Generator, labels: np.ndarray, split: str) -> np.ndarray:
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


def draw_glyphs(spec: TaskSpec, rng: np.random.Generator, labels: np.ndarray, split: str) -> np.ndarray:
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


def draw_digits(spec: TaskSpec, rng: np.random.Generator, labels: np.ndarray, split: str) -> np.ndarray:
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


def draw_textures(spec: TaskSpec, rng: np.random.Generator, labels: np.ndarray, split: str) -> np.ndarray:
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


def draw_count(spec: TaskSpec, rng: np.random.Generator, labels: np.ndarray, split: str) -> np.ndarray:
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


def draw_mixture(spec: TaskSpec, rng: np.random.Generator, labels: np.ndarray, split: str) -> np.ndarray:
    out = np.zeros((len(labels), 3, spec.image_size, spec.image_size), dtype=np.float32)
    offset = 0
    for name in spec.sources:
        src = get_task(name)
        sel = (labels >= offset) & (labels < offset + src.num_classes)
        if sel.any():
            out[sel] = _finish(src, rng, DRAWERS[src.kind](src, rng, labels[sel] - offset, split))
        offset += src.num_classes
    return out


# task kind -> its drawer: (spec, rng, labels, split) -> float images in [0, 1], before colour cast and noise
DRAWERS = {"shapes": draw_shapes, "glyphs": draw_glyphs, "digits": draw_digits, "textures": draw_textures,
           "count": draw_count, "orientation": draw_orientation, "mixture": draw_mixture}


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
    img = _finish(spec, rng, DRAWERS[spec.kind](spec, rng, labels, split))
    return (img * 255 + 0.5).astype(np.uint8), labels


def generate(spec: TaskSpec, split: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Chunked so that sample i depends only on (task, split, seed, i // chunk)."""
    task_key = zlib.crc32(spec.name.encode())
    xs, ys = [], []
    for chunk in range(0, n, _CHUNK):
        ss = np.random.SeedSequence([seed, SPLITS.index(split), task_key, chunk // _CHUNK])
        x, y = _render(spec, np.random.default_rng(ss), _CHUNK, split)
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs)[:n], np.concatenate(ys)[:n]



FLEET_STREAM = 1_000_003  # seeds the per-node streams apart from every split's (whose second entry is < len(SPLITS))


def generate_node(spec: TaskSpec, node: int, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`n` training images that belong to node `node` alone: its own seeded stream, disjoint from the task's
    train / calib / test / val splits and from every other node's, rendered in one chunk of `n`.

    Why: a fleet-scale simulation (thousands of nodes) cannot hold a shared split big enough for every node in
    every Ray actor; a device renders (i.e. owns) its data, as a real one would, in a few milliseconds."""
    if n <= 0 or node < 0 or seed < 0:
        raise ValueError(f"need n > 0, node >= 0 and seed >= 0, got n={n}, node={node}, seed={seed}")
    ss = np.random.SeedSequence([seed, FLEET_STREAM, zlib.crc32(spec.name.encode()), node])
    return _render(spec, np.random.default_rng(ss), n, "train")
