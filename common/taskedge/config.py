"""TaskEdge configuration: one validated dataclass, shared by the centralised and federated paths."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .scores import SCORES, get_score

ALLOCATIONS = ("neuron", "neuron-cap", "global")
SAVE_DTYPES = ("float32", "bfloat16", "float16")
CONV_GRADS = ("auto", "sparse", "dense")


@dataclass
class TaskEdgeConfig:
    """What to train and how to pick it.

    budget: fraction of the backbone's parameters (0 < budget < 1, default 0.1 %) or an
        absolute number of trainable entries (an integer >= 1).
    per_neuron: entries per output neuron of the target modules; > 0 replaces `budget` with a budget
        that means the same on every model size (the paper's 0.1 % of ViT-B/16 is ~1 per neuron).
    score: importance used for ranking; "taskedge" is the paper's |W| * ||X_j||; "taskedge-sqrt" is
        |W| * ||X_j||^(1/2), which damps the few high-activation input columns that the paper's
        score makes every row pick; "magnitude" (|W|), "activation" (||X_j||) and "random" are ablations;
        "gradient" (|sum of dL/dW| over labelled calibration batches through a probed head,
        common.taskedge.gradient_score) is a centralised GPS-style reference.
    allocation: "neuron" spreads the budget as k entries per output neuron; "neuron-cap" does the
        same with a per-column cap (no input column of a module is picked by more than
        ceil(col_cap * rows * k / width) rows), so the entries also spread over the input columns;
        "global" is the ablation that takes the top entries over the whole network.
    col_cap: the cap factor of "neuron-cap" (1 = every column as evenly used as possible).
    target_modules: regular expressions (full match) on module names; None means every
        nn.Linear / nn.Conv2d of the backbone except the classifier head.
    exclude_modules: regular expressions removed from the targets.
    head: module name of the classifier head (trained densely); None = detect from timm.
    nm: (N, M) semi-structured sparsity of the merged weight, e.g. (2, 4); None = off. The base weights are
        pruned by the score (by |W|·‖X‖ for "gradient": `tuner.prune_score`), the entries chosen among the kept.
    save_dtype: precision of the input columns kept for the backward pass.
    conv_grad: how conv value gradients are computed ("sparse" offset sums, "dense"
        weight gradient then gather; "auto" = dense only for an ungrouped conv whose mask holds more
        than 1/64 of its weight (common.taskedge.layers.dense_grad_pays), else sparse, which bench_step
        --conv-micro measured faster on nearly every depthwise shape, 5x5 kernels by 10-60x).
    seed: seed for the "random" score.
    """

    budget: float = 0.001
    score: str = "taskedge"
    allocation: str = "neuron"
    target_modules: list[str] | None = None
    exclude_modules: list[str] = field(default_factory=list)
    head: str | None = None
    nm: tuple[int, int] | None = None
    save_dtype: str = "float32"
    conv_grad: str = "auto"
    seed: int = 0
    col_cap: float = 1.0
    per_neuron: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)):
            raise ValueError(f"budget must be a number (fraction in (0, 1) or count >= 1), got {self.budget!r}")
        if not self.budget > 0:
            raise ValueError(f"budget must be > 0 (fraction in (0, 1) or count >= 1), got {self.budget!r}")
        if self.budget >= 1 and float(self.budget) != int(self.budget):
            raise ValueError(f"budget >= 1 is an entry count and must be an integer, got {self.budget!r}")
        get_score(self.score)  # a ValueError naming the scores
        _choice("allocation", self.allocation, ALLOCATIONS)
        _choice("save_dtype", self.save_dtype, SAVE_DTYPES)
        _choice("conv_grad", self.conv_grad, CONV_GRADS)
        if isinstance(self.per_neuron, bool) or not isinstance(self.per_neuron, (int, float)) or self.per_neuron < 0:
            raise ValueError(f"per_neuron must be a number >= 0 (0 = use budget), got {self.per_neuron!r}")
        if isinstance(self.col_cap, bool) or not isinstance(self.col_cap, (int, float)) or not self.col_cap >= 1:
            raise ValueError(f"col_cap must be a number >= 1, got {self.col_cap!r}")
        if self.nm is not None:
            n, m = tuple(self.nm)
            if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
                raise ValueError(f"nm must be (N, M) integers with 0 < N < M, e.g. (2, 4); got {self.nm!r}")
            self.nm = (n, m)

    def to_dict(self) -> dict:
        return asdict(self)


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
