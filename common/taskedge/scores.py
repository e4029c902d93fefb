"""The score registry: each importance score declares what it is computed from, so that calibration, the
federation's statistics phase and the mode checks ask "does this score need X?" instead of branching on
its name.

What a score can need:
- ``weights``: the frozen weight magnitudes |W| (the same on every node: never uploaded);
- ``stats``: per-column activation sums of squares of the calibration data (the pooled statistics);
- ``gradients``: signed sums of dL/dW over labelled calibration batches (`common.taskedge.gradient_score`),
  a dense (rows, width) upload per module.

A score computed from weights and statistics alone is a function ``(|W| as (rows, width), row-expanded
activation norm or None, generator) -> (rows, width)``; a gradient score takes its matrix from the
gradients (``fn`` is None). Scores are registered once here; `SCORES` is the tuple of their names.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a score runs: the run-config schema reads this registry without it
    import torch

WEIGHTS, STATS, GRADIENTS = "weights", "stats", "gradients"

ScoreFn = Callable[["torch.Tensor", "torch.Tensor | None", "torch.Generator | None"], "torch.Tensor"]


@dataclass(frozen=True)
class Score:
    """One importance score: its name, what it needs, one line of help, and how it is computed."""

    name: str
    needs: frozenset[str]
    help: str
    fn: ScoreFn | None = None

    @property
    def needs_stats(self) -> bool:
        return STATS in self.needs

    @property
    def needs_gradients(self) -> bool:
        return GRADIENTS in self.needs


def _product(w: torch.Tensor, act: torch.Tensor | None, gen: torch.Generator | None) -> torch.Tensor:
    return w * act


def _sqrt_product(w: torch.Tensor, act: torch.Tensor | None, gen: torch.Generator | None) -> torch.Tensor:
    return w * act.sqrt()


def _magnitude(w: torch.Tensor, act: torch.Tensor | None, gen: torch.Generator | None) -> torch.Tensor:
    return w.clone()


def _activation(w: torch.Tensor, act: torch.Tensor | None, gen: torch.Generator | None) -> torch.Tensor:
    return act.contiguous().clone()


def _random(w: torch.Tensor, act: torch.Tensor | None, gen: torch.Generator | None) -> torch.Tensor:
    import torch

    return torch.rand(w.shape, generator=gen)


REGISTRY: dict[str, Score] = {s.name: s for s in (
    Score("taskedge", frozenset({WEIGHTS, STATS}), "the paper's |W|·‖X_j‖ (Wanda's statistic)", _product),
    Score("taskedge-sqrt", frozenset({WEIGHTS, STATS}),
          "|W|·‖X_j‖^½: damps the few high-activation columns every row would pick", _sqrt_product),
    Score("magnitude", frozenset({WEIGHTS}), "|W| alone (ablation)", _magnitude),
    Score("activation", frozenset({STATS}), "‖X_j‖ alone (ablation)", _activation),
    Score("random", frozenset(), "uniform random (ablation; seeded)", _random),
    Score("gradient", frozenset({GRADIENTS}),
          "|Σ dL/dW| over labelled calibration batches through a probed head (GPS-style)"),
)}
SCORES = tuple(REGISTRY)


def get_score(name: str) -> Score:
    """The registered score called `name`; a ValueError naming the allowed ones otherwise."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"score must be one of {', '.join(SCORES)}; got {name!r}") from None


def scores_table() -> str:
    """The registry as the markdown table of docs/configuration.md (a test keeps the two equal)."""
    rows = ["| score | computed from | what it is |", "|---|---|---|"]
    rows += [f"| `{s.name}` | {', '.join(sorted(s.needs)) or 'a seeded generator'} | {s.help.replace('|', chr(92) + '|')} |"
             for s in REGISTRY.values()]
    return "\n".join(rows) + "\n"
