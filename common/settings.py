"""Run configuration of the federation: defaults, types and validation in one place (shared by both apps).

`flwr run` fills `context.run_config` from `[tool.flwr.app.config]` in pyproject.toml, but
`flwr.simulation.run_simulation` leaves it empty, so every key also has a default here. Both
the ServerApp and the ClientApp parse through `parse_run_config`, and a bad value fails at
start with a message that names the key. No Flower imports: usable from plain Python.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from common.config import ALLOCATIONS, SCORES, TaskEdgeConfig

METHODS = ("taskedge", "fedavg-full", "fedlora")
PARTITIONERS = ("iid", "dirichlet")
RECONCILE = ("stats", "vote")
SERVER_OPTS = ("fedavg", "fedavgm")

# AdamW learning rates per method, the best of a small sweep (5 clients x 5 rounds x 2 local epochs,
# Dirichlet 0.5, embedded ViT): sparse values take a larger step than LoRA adapters or full weights.
METHOD_LR = {"taskedge": 0.05, "fedlora": 0.003, "fedavg-full": 0.001}

# kebab-case key -> default. Sized for `flwr run .` with ~5 simulated clients on 2 CPU cores.
DEFAULTS: dict[str, Any] = {
    "method": "taskedge",            # taskedge | fedavg-full | fedlora
    "model": "taskedge-vit-tiny",    # embedded pre-trained ViT, or any timm model name
    "weights-path": "",              # local .safetensors/.pth for a timm model ("" = embedded/none)
    "task": "shapes-downstream",     # built-in offline task (common.data)
    "partitioner": "dirichlet",      # iid | dirichlet (flwr-datasets), simulation only
    "alpha": 0.5,                    # Dirichlet concentration (smaller = more label skew)
    "num-partitions": 0,             # 0 = take num-partitions from the node config
    "num-server-rounds": 5,
    "fraction-train": 1.0,
    "fraction-evaluate": 1.0,
    "min-nodes": 2,                  # wait for this many connected nodes before starting
    "min-replies": 1,                # fewer valid training replies -> round skipped
    "local-epochs": 2,
    "batch-size": 32,
    "lr": 0.0,                       # 0 = the method's default (METHOD_LR)
    "budget": 0.01,                  # fraction of backbone params (or a count >= 1)
    "score": "taskedge",
    "allocation": "neuron",
    "reconcile": "stats",            # stats (exact, pooled) | vote (per-neuron vote of local top-k)
    "reconcile-every": 0,            # re-reconcile every R rounds (0 = once)
    "budget-ranks": "",              # simulation: per-partition budget ranks, e.g. "0,1" (0 = full mask)
    "lora-rank": 8,
    "calib-size": 64,                # calibration samples per client (from its local train split)
    "test-fraction": 0.2,            # share of a client's partition held out for local evaluation
    "server-test-size": 1000,        # centralised test samples (0 = no centralised evaluation)
    "server-opt": "fedavg",          # fedavg | fedavgm (seam for server optimizers)
    "server-lr": 1.0,
    "server-momentum": 0.9,
    "round-timeout": 600.0,
    "client-threads": 1,             # torch threads per ClientApp (node config "num-threads" wins)
    "seed": 0,
    "output-dir": "runs",            # run folder = output-dir/<timestamp>-<method>
    "resume": "",                    # checkpoint.safetensors (or its run folder) to continue from
}


# What a client needs to know; the server sends these in every message's ConfigRecord, so the
# server's run config is the single source of truth (run_simulation gives clients no run config).
CLIENT_KEYS = ("method", "model", "weights-path", "task", "partitioner", "alpha", "num-partitions", "seed",
               "calib-size", "test-fraction", "lora-rank", "budget-ranks", "local-epochs", "batch-size", "lr",
               "budget", "score", "allocation", "reconcile", "client-threads")


@dataclass(frozen=True)
class AppConfig:
    """Typed, validated run configuration (attribute = key with '-' -> '_')."""

    method: str
    model: str
    weights_path: str
    task: str
    partitioner: str
    alpha: float
    num_partitions: int
    num_server_rounds: int
    fraction_train: float
    fraction_evaluate: float
    min_nodes: int
    min_replies: int
    local_epochs: int
    batch_size: int
    lr: float
    budget: float
    score: str
    allocation: str
    reconcile: str
    reconcile_every: int
    budget_ranks: str
    lora_rank: int
    calib_size: int
    test_fraction: float
    server_test_size: int
    server_opt: str
    server_lr: float
    server_momentum: float
    round_timeout: float
    client_threads: int
    seed: int
    output_dir: str
    resume: str

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
        return TaskEdgeConfig(budget=budget, score=self.score, allocation=self.allocation, seed=self.seed)

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
    choices = {"method": METHODS, "partitioner": PARTITIONERS, "reconcile": RECONCILE, "score": SCORES,
               "allocation": ALLOCATIONS, "server-opt": SERVER_OPTS}
    for key, allowed in choices.items():
        if cfg[key] not in allowed:
            raise _bad(key, f"must be one of {', '.join(allowed)}", cfg[key])
    positive = ("alpha", "num-server-rounds", "min-nodes", "min-replies", "local-epochs", "batch-size",
                "budget", "lora-rank", "calib-size", "server-lr", "round-timeout", "client-threads")
    for key in positive:
        if not cfg[key] > 0:
            raise _bad(key, "must be > 0", cfg[key])
    for key in ("num-partitions", "reconcile-every", "server-test-size", "seed", "lr"):
        if cfg[key] < 0:
            raise _bad(key, "must be >= 0", cfg[key])
    for key in ("fraction-train", "fraction-evaluate"):
        if not 0.0 <= cfg[key] <= 1.0:
            raise _bad(key, "must be in [0, 1]", cfg[key])
    if cfg["fraction-train"] == 0.0:
        raise _bad("fraction-train", "must be > 0 (nobody would train)", 0.0)
    if not 0.0 <= cfg["test-fraction"] < 1.0:
        raise _bad("test-fraction", "must be in [0, 1)", cfg["test-fraction"])
    if not 0.0 <= cfg["server-momentum"] < 1.0:
        raise _bad("server-momentum", "must be in [0, 1)", cfg["server-momentum"])
    if cfg["budget"] >= 1 and not float(cfg["budget"]).is_integer():
        raise _bad("budget", "a value >= 1 is an entry count and must be an integer", cfg["budget"])
    try:
        ranks = [int(r) for r in cfg["budget-ranks"].split(",") if r.strip()]
    except ValueError:
        raise _bad("budget-ranks", "must be a comma-separated list of integers >= 0", cfg["budget-ranks"]) from None
    if any(r < 0 for r in ranks):
        raise _bad("budget-ranks", "ranks must be >= 0 (0 = full mask)", cfg["budget-ranks"])
    if cfg["model"] == "":
        raise _bad("model", "must name an embedded or timm model", cfg["model"])


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
    _check(merged)
    if merged["lr"] == 0.0:
        merged["lr"] = METHOD_LR[merged["method"]]
    return AppConfig(**{k.replace("-", "_"): v for k, v in merged.items()})
