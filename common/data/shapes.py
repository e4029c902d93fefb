"""The shape vocabulary of the shape tasks: one boolean mask function a shape name.

Its own module because both the task registry (which checks a task's shape names) and the renderer
(which draws them) need it, and neither should import the other for it.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

__all__ = ["Mask", "SHAPES"]

# Shapes: boolean masks over local coordinates (u, v) in about [-1, 1],
# v pointing down.  Keep each one tiny and readable.
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
