"""The task registry: what each built-in task is (``TaskSpec``), by name (``TASKS``, ``get_task``).

A ``TaskSpec`` holds everything that determines a generated task (its repr keys the data cache, so
adding, removing or reordering its fields changes every cache key); this module only declares tasks.
Drawing them is ``common.data.render``'s job, rendering a split once and caching it ``common.data.splits``'.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.data.shapes import SHAPES

__all__ = [
    "DEFAULT_TASK",
    "DIGITS",
    "GLYPHS",
    "KINDS",
    "SPLITS",
    "SUITE",
    "TASKS",
    "TEXTURES",
    "UPSTREAM_TASK",
    "TaskSpec",
    "as_spec",
    "get_task",
]

SPLITS = ("train", "calib", "test", "val")  # append only: the index seeds each split's stream
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


def as_spec(task: str | TaskSpec) -> TaskSpec:
    """A TaskSpec as it is, or a built-in task's by name."""
    return task if isinstance(task, TaskSpec) else get_task(task)

