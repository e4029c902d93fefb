"""Run configuration of the federation: defaults, types and validation in one place (shared by both apps).

`flwr run` fills `context.run_config` from `[tool.flwr.app.config]` in pyproject.toml, but
`flwr.simulation.run_simulation` leaves it empty, so every key also has a default here. Both
the ServerApp and the ClientApp parse through `parse_run_config`, and a bad value fails at
start with a message that names the key. No Flower imports: usable from plain Python.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from common import tuned as _tuned
from common.classes import parse_class_names
from common.taskedge.config import TaskEdgeConfig
from common.registry import ALIASES, MASK_METHODS
from common.taskedge.scores import get_score
from common.options import (AGGREGATIONS, BY_KEY, METHODS, OPTIONS, PARTITIONERS, RECONCILE,  # noqa: F401
                            SERVER_OPTS, STATS_AGGREGATIONS)

# AdamW learning rates per method for the deltas/adapters/weights (`lr`) and the dense head (`head-lr`):
# the best of one small sweep on the suite's validation splits (benchmarks/sweep.py -> common/defaults.json,
# shared with simulations/finetune.py). The default selection (score, allocation) comes from the same file.
METHOD_LR = _tuned.method_lr()
METHOD_HEAD_LR = _tuned.method_head_lr()

# kebab-case key -> default, and the keys the nodes read, both from the one schema (common/options.py)
DEFAULTS: dict[str, Any] = {o.key: o.default for o in OPTIONS}
CLIENT_KEYS = tuple(o.key for o in OPTIONS if o.side == "both")
SELECTION_KEYS = ("budget", "score", "allocation", "nm", "per_neuron")  # TaskEdgeConfig's: validated by it alone


@dataclass(frozen=True)
class AppConfig:
    """Typed, validated run configuration (attribute = key with '-' -> '_')."""

    method: str
    preset: str
    model: str
    weights_path: str
    data_path: str
    server_data_path: str
    num_classes: int
    class_names: str
    img_size: int
    task: str
    partitioner: str
    alpha: float
    examples_per_node: int
    num_partitions: int
    num_server_rounds: int
    fraction_train: float
    fraction_evaluate: float
    setup_fraction: float
    min_nodes: int
    min_replies: int
    local_epochs: int
    batch_size: int
    lr: float
    head_lr: float
    budget: float
    budget_per_neuron: float
    score: str
    allocation: str
    nm: str
    reconcile: str
    reconcile_every: int
    budget_ranks: str
    lora_rank: int
    calib_size: int
    test_fraction: float
    server_test_size: int
    server_split: str
    server_opt: str
    server_lr: float
    server_momentum: float
    aggregation: str
    trim_beta: float
    clip_norm: float
    clip_factor: float
    max_examples: int
    stats_aggregation: str
    round_timeout: float
    client_threads: int
    seed: int
    output_dir: str
    resume: str
    value_dtype: str
    secure_aggregation: bool
    secagg_num_shares: float
    secagg_reconstruction_threshold: float
    secagg_clipping_range: float
    secagg_quantization_range: int
    stats_clip_norm: float
    grad_clip_norm: float
    dp: str
    dp_clipping: str
    dp_clip_norm: float
    dp_noise_multiplier: float
    dp_stats_noise_multiplier: float
    max_epsilon: float
    dp_delta: float
    uniform_weights: bool

    def to_dict(self) -> dict[str, Any]:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    def client_config(self) -> dict[str, Any]:
        """The CLIENT_KEYS part, as sent to clients. Empty strings are left out: they equal the
        defaults, and flwr 1.41's ConfigRecord.count_bytes() raises on an empty string."""
        d = self.to_dict()
        return {k: d[k] for k in CLIENT_KEYS if d[k] != ""}

    def taskedge_config(self) -> TaskEdgeConfig:
        """The TaskEdge selection part (a budget >= 1 is an entry count)."""
        budget = int(self.budget) if self.budget >= 1 else self.budget
        return TaskEdgeConfig(budget=budget, score=self.score, allocation=self.allocation, seed=self.seed,
                              nm=parse_nm(self.nm), per_neuron=self.budget_per_neuron)

    @property
    def classes(self) -> list[str]:
        """The federation's class names: `class-names` (set by the server from the nodes' data), else the task's."""
        from common.classes import parse_class_names

        names = parse_class_names(self.class_names)
        if names:
            return names + [f"class-{i}" for i in range(len(names), self.num_classes)]
        from common.data.tasks import get_task

        return list(get_task(self.task).class_names)

    @property
    def head_size(self) -> int:
        """Output size of the classifier head: `num-classes`, else the number of classes."""
        return max(self.num_classes, len(self.classes))

    @property
    def effective_head_lr(self) -> float:
        """The dense head's AdamW rate: `head-lr`, or the method's tuned default when it is 0."""
        return self.head_lr or METHOD_HEAD_LR[self.method]

    def ranks_for(self, partition_id: int) -> int:
        """Budget rank of a simulated partition from `budget-ranks` (cycled; 0 = full mask)."""
        ranks = [int(r) for r in self.budget_ranks.split(",") if r.strip()]
        return ranks[partition_id % len(ranks)] if ranks else 0


def _bad(key: str, why: str, value: Any) -> ValueError:
    return ValueError(f"run config '{key}': {why}, got {value!r}")


def _typed(key: str, value: Any) -> Any:
    default = DEFAULTS[key]
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise _bad(key, "must be true or false", value)
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not (isinstance(value, int) or isinstance(value, float) and value.is_integer()):
            raise _bad(key, "must be an integer", value)
        return int(value)
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad(key, "must be a number", value)
        return float(value)
    if not isinstance(value, str):
        raise _bad(key, "must be a string", value)
    return value


def _check(cfg: dict[str, Any]) -> None:
    for o in OPTIONS:
        if o.choices and o.key not in SELECTION_KEYS and cfg[o.key] not in o.choices:
            raise _bad(o.key, f"must be one of {', '.join(str(c) if c != '' else repr(c) for c in o.choices)}",
                       cfg[o.key])
    positive = ("alpha", "num-server-rounds", "min-nodes", "min-replies", "local-epochs", "batch-size",
                "lora-rank", "calib-size", "server-lr", "round-timeout", "client-threads")
    for key in positive:
        if not cfg[key] > 0:
            raise _bad(key, "must be > 0", cfg[key])
    for key in ("num-partitions", "reconcile-every", "server-test-size", "seed", "lr", "head-lr", "clip-norm", "clip-factor",
                "max-examples", "num-classes", "img-size"):
        if cfg[key] < 0:
            raise _bad(key, "must be >= 0", cfg[key])
    for key in ("fraction-train", "fraction-evaluate"):
        if not 0.0 <= cfg[key] <= 1.0:
            raise _bad(key, "must be in [0, 1]", cfg[key])
    if not 0.0 < cfg["setup-fraction"] <= 1.0:
        raise _bad("setup-fraction", "must be in (0, 1] (1 = every connected node)", cfg["setup-fraction"])
    if not cfg["examples-per-node"] > 0:
        raise _bad("examples-per-node", "must be > 0", cfg["examples-per-node"])
    if cfg["partitioner"] == "generated" and cfg["data-path"]:
        raise _bad("partitioner", "'generated' renders the built-in task on every node; with data-path use iid or "
                   "dirichlet", "generated")
    if cfg["fraction-train"] == 0.0:
        raise _bad("fraction-train", "must be > 0 (nobody would train)", 0.0)
    if not 0.0 <= cfg["test-fraction"] < 1.0:
        raise _bad("test-fraction", "must be in [0, 1)", cfg["test-fraction"])
    if not 0.0 <= cfg["server-momentum"] < 1.0:
        raise _bad("server-momentum", "must be in [0, 1)", cfg["server-momentum"])
    if not 0.0 <= cfg["trim-beta"] < 0.5:
        raise _bad("trim-beta", "must be in [0, 0.5)", cfg["trim-beta"])
    if cfg["server-opt"] == "fedavgm" and cfg["aggregation"] != "mean":
        raise _bad("server-opt", f"fedavgm needs aggregation='mean' (aggregation is {cfg['aggregation']!r})",
                   cfg["server-opt"])
    if cfg["num-classes"] == 1:
        raise _bad("num-classes", "a classifier needs at least 2 classes (0 = from the data)", 1)
    try:
        names = parse_class_names(cfg["class-names"])
    except ValueError as exc:
        raise _bad("class-names", str(exc), cfg["class-names"]) from None
    if len(names) == 1:
        raise _bad("class-names", "a classifier needs at least 2 classes", cfg["class-names"])
    if names and cfg["num-classes"] and cfg["num-classes"] < len(names):
        raise _bad("num-classes", f"smaller than the {len(names)} class-names", cfg["num-classes"])
    try:
        ranks = [int(r) for r in cfg["budget-ranks"].split(",") if r.strip()]
    except ValueError:
        raise _bad("budget-ranks", "must be a comma-separated list of integers >= 0", cfg["budget-ranks"]) from None
    if any(r < 0 for r in ranks):
        raise _bad("budget-ranks", "ranks must be >= 0 (0 = full mask)", cfg["budget-ranks"])
    try:
        nm = parse_nm(cfg["nm"])
    except ValueError as exc:
        raise _bad("nm", str(exc), cfg["nm"]) from None
    _check_selection(cfg, nm)
    if nm is not None and cfg["method"] not in MASK_METHODS:
        raise _bad("nm", "N:M applies to the taskedge methods (their deltas live on kept entries)", cfg["nm"])
    if nm is not None and cfg["reconcile"] != "stats":
        raise _bad("nm", "needs reconcile='stats' (the pruning is derived from the pooled statistics)", cfg["nm"])
    if cfg["method"] == "taskedge-lora" and ranks:
        raise _bad("budget-ranks", "taskedge-lora trains one global B (nested budgets are taskedge only)",
                   cfg["budget-ranks"])
    _check_privacy(cfg)
    if cfg["model"] == "":
        raise _bad("model", "must name an embedded or timm model", cfg["model"])


def _check_selection(cfg: dict[str, Any], nm: tuple[int, int] | None) -> None:
    """budget, score, allocation and nm are TaskEdgeConfig's fields: its validation is the only one, and its
    message is given back under the run-config key it concerns."""
    budget = cfg["budget"]
    try:
        TaskEdgeConfig(budget=int(budget) if isinstance(budget, (int, float)) and budget >= 1
                       and float(budget).is_integer() else budget, score=cfg["score"],
                       allocation=cfg["allocation"], nm=nm, per_neuron=cfg["budget-per-neuron"])
    except ValueError as exc:
        msg = str(exc)
        key = msg.split()[0].rstrip(":")
        key = key if key in SELECTION_KEYS else "budget"
        if key == "per_neuron":
            msg, key = "budget-per-neuron" + msg[len(key):], "budget-per-neuron"
        raise ValueError(f"run config '{key}': {msg[len(key):].lstrip(': ') if msg.startswith(key) else msg}") from None


def _check_privacy(cfg: dict[str, Any]) -> None:
    """Secure aggregation and differential privacy: what they need and what they cannot combine with."""
    if cfg["dp"] not in ("none", "server", "client"):
        raise _bad("dp", "must be one of none, server, client", cfg["dp"])
    if cfg["dp-clipping"] not in ("fixed", "adaptive"):
        raise _bad("dp-clipping", "must be one of fixed, adaptive", cfg["dp-clipping"])
    for key in ("secagg-clipping-range", "dp-noise-multiplier", "dp-stats-noise-multiplier", "max-epsilon"):
        if cfg[key] < 0:
            raise _bad(key, "must be >= 0", cfg[key])
    for key in ("stats-clip-norm", "grad-clip-norm", "dp-clip-norm", "secagg-num-shares",
                "secagg-reconstruction-threshold"):
        if not cfg[key] > 0:
            raise _bad(key, "must be > 0", cfg[key])
    if not 0.0 < cfg["dp-delta"] < 1.0:
        raise _bad("dp-delta", "must be in (0, 1)", cfg["dp-delta"])
    if not 2 <= cfg["secagg-quantization-range"] < 2**32:
        raise _bad("secagg-quantization-range", "must be in [2, 2^32)", cfg["secagg-quantization-range"])
    shares, thr = cfg["secagg-num-shares"], cfg["secagg-reconstruction-threshold"]
    if shares > 1 and (not float(shares).is_integer() or shares < 3):
        raise _bad("secagg-num-shares", "must be a fraction in (0, 1] or an integer count >= 3", shares)
    if thr > 1 and not float(thr).is_integer():
        raise _bad("secagg-reconstruction-threshold", "must be a fraction in (0, 1] or an integer count", thr)
    if thr > 1 and shares > 1 and thr >= shares:
        raise _bad("secagg-reconstruction-threshold", f"a count must be < secagg-num-shares={int(shares)}", thr)
    private = cfg["secure-aggregation"] or cfg["dp"] != "none"
    if cfg["dp"] != "none" and cfg["clip-norm"] > 0 and cfg["clip-norm"] != cfg["dp-clip-norm"]:
        # the accountant's sensitivity is dp-clip-norm: a second, different clip in front of the noise either
        # does nothing or changes what the noise was calibrated to (clip-factor's adaptive bound is not used)
        raise _bad("clip-norm", f"with dp the one clip in front of the noise is dp-clip-norm="
                   f"{cfg['dp-clip-norm']:g}; set clip-norm=0 or equal to dp-clip-norm", cfg["clip-norm"])
    if cfg["secure-aggregation"]:
        if cfg["value-dtype"] != "float32":
            # SecAgg+ quantizes the float update with its own clipping range; per-node int8 scales do not add up
            # in a masked sum, so the two do not compose (SecAgg+'s ring elements are 4-8 bytes anyway)
            raise _bad("value-dtype", "secure-aggregation=true already quantizes the update (SecAgg+'s own "
                       "quantizer); set value-dtype='float32' or secure-aggregation=false", cfg["value-dtype"])
        if cfg["dp"] == "server":
            raise _bad("dp", "server-side clipping needs every update in the clear; with secure-aggregation use "
                       "dp=client (nodes clip, the server noises the secure sum)", cfg["dp"])
        if cfg["aggregation"] != "mean":
            raise _bad("aggregation", "secure aggregation reveals only the sum: trimmed mean and median need every "
                       "update; use aggregation='mean'", cfg["aggregation"])
        if cfg["dp"] == "none" and cfg["clip-norm"] <= 0 and cfg["secagg-clipping-range"] <= 0:
            raise _bad("secure-aggregation", "needs a fixed bound on every update for SecAgg+'s quantizer: set "
                       "clip-norm (nodes clip their update to it) or secagg-clipping-range, or use dp=client",
                       cfg["secure-aggregation"])
    if private and cfg["method"] in MASK_METHODS and (cfg["reconcile"] != "stats"
                                                                         or cfg["stats-aggregation"] != "sum"):
        raise _bad("reconcile", "secure aggregation and DP protect the pooled statistics (reconcile='stats', "
                   "stats-aggregation='sum'); local top-k votes and per-column medians need each node's statistics",
                   f"{cfg['reconcile']}/{cfg['stats-aggregation']}")
    if get_score(cfg["score"]).needs_gradients and cfg["method"] in MASK_METHODS:
        # each node uploads dense, signed gradient sums once (common.taskedge.gradient_score): summed, not voted
        # (SecAgg+ and the DP statistics release carry them: server/privacy.py)
        if cfg["reconcile"] != "stats":
            raise _bad("score", f"{cfg['score']!r} needs reconcile='stats' (the server adds up the nodes' gradient "
                       "sums)", cfg["score"])
    if cfg["dp"] == "none" and cfg["max-epsilon"] > 0:
        raise _bad("max-epsilon", "needs dp=server or dp=client", cfg["max-epsilon"])
    if cfg["dp-clipping"] == "adaptive" and cfg["dp"] != "none":
        if cfg["dp"] != "server":
            raise _bad("dp-clipping", "adaptive clipping is offered with dp=server only", cfg["dp-clipping"])
        if cfg["max-epsilon"] > 0:
            raise _bad("max-epsilon", "Flower 1.42's accountant covers fixed clipping only (dp-clipping=fixed)",
                       cfg["max-epsilon"])
    if cfg["dp"] != "none" and cfg["max-epsilon"] > 0:
        if cfg["dp-noise-multiplier"] <= 0:
            raise _bad("max-epsilon", "needs dp-noise-multiplier > 0 (without noise epsilon is infinite)",
                       cfg["max-epsilon"])
        if cfg["server-opt"] != "fedavg" or cfg["aggregation"] != "mean":
            raise _bad("max-epsilon", "Flower's accountant needs FedAvg's own aggregation (server-opt='fedavg', "
                       "aggregation='mean')", cfg["max-epsilon"])


def parse_run_config(run_config: dict[str, Any] | None = None, **overrides: Any) -> AppConfig:
    """Defaults <- run_config <- overrides (python names allowed: num_server_rounds=2).

    Unknown keys are rejected, so a typo does not silently fall back to a default.
    """
    merged = dict(DEFAULTS)
    given = dict(run_config or {})
    given.update({k.replace("_", "-"): v for k, v in overrides.items()})
    for key, value in given.items():
        if key not in DEFAULTS:
            raise ValueError(f"run config '{key}': unknown key; known keys: {', '.join(sorted(DEFAULTS))}")
        merged[key] = _typed(key, value)
    if merged["preset"] == "paper":  # the paper's selection, except where this run config sets a key itself
        from common.tuned import paper_selection

        merged.update({k: _typed(k, v) for k, v in paper_selection().items() if k not in given})
    if "budget" in given and "budget-per-neuron" not in given:
        merged["budget-per-neuron"] = 0.0  # a budget the user sets is the budget, whatever the default's form
    merged["method"] = ALIASES.get(merged["method"], merged["method"])  # an older spelling (common.registry)
    _check(merged)
    if merged["lr"] == 0.0:
        merged["lr"] = METHOD_LR[merged["method"]]
    return AppConfig(**{k.replace("-", "_"): v for k, v in merged.items()})


def parse_nm(value: str) -> tuple[int, int] | None:
    """'N:M' -> (N, M) with 0 < N < M; '' -> None (off)."""
    if value.strip() == "":
        return None
    parts = value.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError("must be 'N:M' (e.g. '2:4') or '' (off)")
    n, m = int(parts[0]), int(parts[1])
    if not 0 < n < m:
        raise ValueError("N:M needs 0 < N < M")
    return n, m
