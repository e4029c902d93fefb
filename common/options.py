"""The run-config schema: every key declared once, with its default, allowed values, help and side.

`common/settings.py` parses and validates against it; `pyproject.toml`'s `[tool.flwr.app.config]`
table and the README's run-config table are generated from it (`pyproject_table`, `readme_table`)
and tests check both files against it, so a key cannot drift between them. `side` says who reads
a key: "both" keys travel to the nodes in every message's ConfigRecord (the server's run config is
the one source of truth: `run_simulation` gives nodes no run config); "server" keys never leave it.
No Flower, no torch: check_config reads this in well under a second.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from common import tuned as _tuned
from common.registry import FEDERATED_METHODS
from common.taskedge.config import ALLOCATIONS, SCORES

METHODS = FEDERATED_METHODS  # common.registry: the methods with a wire form
PARTITIONERS = ("iid", "dirichlet", "generated")
RECONCILE = ("stats", "vote")
SERVER_OPTS = ("fedavg", "fedavgm")
AGGREGATIONS = ("mean", "trimmed", "median")
STATS_AGGREGATIONS = ("sum", "median")
DP_MODES = ("none", "server", "client")
DP_CLIPPINGS = ("fixed", "adaptive")
VALUE_DTYPES = ("float32", "float16", "int8")  # common/quantize.py DTYPES
_SELECTION = _tuned.selection()


@dataclass(frozen=True)
class Option:
    """One run-config key: kebab-case name, default (its type is the key's type), one-line help,
    allowed values (empty: any value of the type) and the side that reads it."""

    key: str
    default: Any
    help: str
    choices: tuple = ()
    side: str = "server"

    @property
    def attr(self) -> str:
        return self.key.replace("-", "_")


OPTIONS: tuple[Option, ...] = (
    Option("method", _SELECTION.get("method", "taskedge"), "what the nodes train", METHODS, "both"),
    Option("preset", "", "paper = the paper's selection (score taskedge, 2 % of the backbone) instead of the "
           "default chosen on validation (common/defaults.json); keys set explicitly win", ("", "paper")),
    Option("model", "taskedge-vit-tiny", "embedded pre-trained model (offline) or any timm model name", side="both"),
    Option("weights-path", "", "local .safetensors/.pth for a timm model; \"hub\" = timm pretrained from the hub",
           side="both"),
    Option("data-path", "", "your data: an ImageFolder, a saved HF Dataset/DatasetDict (or, online, a hub name); "
           "\"\" = the built-in task; nodes partition it in a simulation, a node config's data-path wins",
           side="both"),
    Option("server-data-path", "", "server-side test set in the same forms (\"\" = none: with data-path the "
           "headline accuracy is the federated evaluation)"),
    Option("num-classes", 0, "head size; 0 = from the data (the union of the nodes' labels) or the task",
           side="both"),
    Option("class-names", "", "the federation's classes, a JSON list or comma-separated (\"\" = the sorted union of "
           "the nodes' class names, or the task's)", side="both"),
    Option("img-size", 0, "input size; 0 = the model's own (timm's data config; embedded models: 32)",
           side="both"),
    Option("task", "shapes-downstream", "built-in offline task (common.data), used when data-path is \"\"",
           side="both"),
    Option("partitioner", "dirichlet", "how a simulation splits the data over nodes (flwr-datasets); generated = "
           "every node renders its own IID examples of the built-in task (fleet-scale simulations)", PARTITIONERS,
           "both"),
    Option("alpha", 0.5, "Dirichlet concentration (smaller = more label skew)", side="both"),
    Option("examples-per-node", 20, "partitioner=generated: training examples each simulated node renders for itself",
           side="both"),
    Option("num-partitions", 0, "0 = from the node config (simulation: number of supernodes)", side="both"),
    Option("num-server-rounds", 5, "training rounds"),
    Option("fraction-train", 1.0, "share of connected nodes sampled per training round"),
    Option("fraction-evaluate", 1.0, "share sampled for federated evaluation (off with secure-aggregation / dp)"),
    Option("setup-fraction", 1.0, "share of connected nodes (a seeded cohort) the classes and statistics phases ask; "
           "the mask reaches the others when first sampled; 1 = all: the exact pooled mask of the federation"),
    Option("min-nodes", 2, "nodes to wait for before the first phase (only then); later rounds go on with whoever "
           "is connected"),
    Option("min-replies", 1, "fewer valid training replies -> round skipped"),
    Option("local-epochs", 2, "local epochs per round", side="both"),
    Option("batch-size", 32, "local batch size", side="both"),
    Option("lr", 0.0, "0 = the method's tuned default (common/defaults.json, benchmarks/sweep.py)", side="both"),
    Option("head-lr", 0.0, "0 = the method's tuned default for the dense head", side="both"),
    Option("budget", _SELECTION["budget"], "fraction of backbone parameters, or an entry count >= 1 "
           "(embedded ViT: 2% = 4,269 entries ~ LoRA r=1)", side="both"),
    Option("budget-per-neuron", float(_SELECTION.get("budget_per_neuron", 0.0)),
           "entries per output neuron (> 0 replaces budget: the same meaning on every model size; ViT-B/16: 1 = the "
           "paper's 0.1 %); a budget set without it wins", side="both"),
    Option("score", _SELECTION["score"], "importance: taskedge = abs(W)·‖X‖; gradient = abs(Σ dL/dW) over "
           "the nodes' labelled calibration data, one dense float32 upload per node (SecAgg+, DP and N:M apply)",
           SCORES, "both"),
    Option("allocation", _SELECTION["allocation"], "how the budget spreads: k per output neuron, capped, or global",
           ALLOCATIONS, "both"),
    Option("nm", "", "N:M sparsity of the merged weights, e.g. \"2:4\" (\"\" = off; taskedge methods)", side="both"),
    Option("reconcile", "stats", "stats (exact pooled statistics) | vote", RECONCILE, "both"),
    Option("reconcile-every", 0, "re-reconcile every R rounds; 0 = once"),
    Option("budget-ranks", "", "simulation: per-partition budget ranks, e.g. \"0,1\" (0 = full mask)", side="both"),
    Option("lora-rank", 8, "rank of fedlora's adapters; of B for taskedge-lora (trainable = rows x r)", side="both"),
    Option("calib-size", 64, "calibration samples per node (from its local train split)", side="both"),
    Option("test-fraction", 0.2, "share of a node's partition held out for local evaluation", side="both"),
    Option("server-test-size", 1000, "centralised test samples of the built-in task; 0 = off"),
    Option("server-split", "test", "the built-in task's split the server evaluates on: val to choose settings "
           "(benchmarks/sweep_selection.py), test to report them", ("test", "val")),
    Option("server-opt", "fedavg", "server optimizer", SERVER_OPTS),
    Option("server-lr", 1.0, "fedavgm's server learning rate"),
    Option("server-momentum", 0.9, "fedavgm's momentum"),
    Option("aggregation", "mean", "mean (FedAvg) | trimmed (per-entry trimmed mean) | median (per entry)",
           AGGREGATIONS),
    Option("trim-beta", 0.2, "fraction cut at each end by `trimmed`"),
    Option("clip-norm", 0.0, "per-node update-norm bound; 0 = clip-factor x the round's median norm (with dp: "
           "dp-clip-norm only)"),
    Option("clip-factor", 3.0, "adaptive clipping factor; 0 (with clip-norm 0) = no clipping; unused with dp"),
    Option("max-examples", 0, "largest credible num-examples per reply; 0 = the task's training split size (with "
           "your own data 10^7: set it to bound one node's weight)"),
    Option("stats-aggregation", "sum", "sum (exact pooled statistics) | median (robust to one node)",
           STATS_AGGREGATIONS),
    Option("round-timeout", 600.0, "seconds a phase waits for replies, and for max(1, min-replies) connected nodes "
           "before a round (then the run fails naming the resume command)"),
    Option("client-threads", 1, "torch threads per ClientApp (node config \"num-threads\" wins)", side="both"),
    Option("seed", 0, "seed of partitions, initialisation and sampling", side="both"),
    Option("output-dir", "runs", "run folder = output-dir/<timestamp>-<method>"),
    Option("resume", "", "checkpoint.safetensors or run folder to continue from"),
    Option("value-dtype", "float32", "form of the value vectors on the wire, both ways, every method: float16 = cast; "
           "int8 = per-tensor scale + unbiased stochastic rounding (~4x fewer bytes); nodes send their update; "
           "not with secure-aggregation", VALUE_DTYPES, "both"),
    Option("secure-aggregation", False, "SecAgg+ for the statistics and training rounds: the server learns only "
           "sums of >= 3 nodes"),
    Option("secagg-num-shares", 1.0, "shares per node: <= 1 a fraction of the round's nodes, else a count (>= 3)"),
    Option("secagg-reconstruction-threshold", 0.67, "shares to reconstruct: <= 1 a fraction of the shares, else a "
           "count"),
    Option("secagg-clipping-range", 0.0, "quantizer range [-c, c]; 0 = the update bound (dp-clip-norm, else "
           "clip-norm)"),
    Option("secagg-quantization-range", 4194304, "2^22 levels; x nodes must stay below the 2^32 modulus"),
    Option("stats-clip-norm", 100.0, "bound on a node's weighted per-column mean-square vector (every mode)"),
    Option("grad-clip-norm", 10.0, "score=gradient: bound on a node's gradient sums / calib-size, all target weights "
           "as one vector (every mode; the sensitivity of its DP release; the embedded ViT's nodes are at ~1.5)"),
    Option("dp", "none", "central DP with Flower's fixed-clipping wrappers", DP_MODES),
    Option("dp-clipping", "fixed", "fixed | adaptive (dp=server only; not accounted)", DP_CLIPPINGS),
    Option("dp-clip-norm", 10.0, "DP update clipping norm: the one clip in front of the noise"),
    Option("dp-noise-multiplier", 1.0, "Gaussian noise sd = multiplier x dp-clip-norm on the sum"),
    Option("dp-stats-noise-multiplier", 0.0, "noise multiplier of the statistics release; 0 = dp-noise-multiplier"),
    Option("max-epsilon", 0.0, "stop before a release would pass it (0 = no limit)"),
    Option("dp-delta", 1e-5, "delta of the reported (epsilon, delta)"),
    Option("uniform-weights", False, "nodes report weight 1 (forced on with dp)", side="both"),
)
BY_KEY = {o.key: o for o in OPTIONS}


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def pyproject_table() -> str:
    """The `[tool.flwr.app.config]` table, as pyproject.toml holds it (a test compares the two)."""
    rows = [f"{o.key} = {_toml(o.default)}" for o in OPTIONS]
    width = max(len(r) for r in rows) + 2
    lines = ["[tool.flwr.app.config]"]
    for o, row in zip(OPTIONS, rows):
        allowed = f" [{' | '.join(map(str, o.choices))}]" if o.choices else ""
        lines.append(f"{row:<{width}}# {o.help}{allowed}")
    return "\n".join(lines) + "\n"


def readme_table() -> str:
    """The README's run-config table (a test compares the two)."""
    lines = ["| key | default | read by | meaning |", "|---|---|---|---|"]
    for o in OPTIONS:
        allowed = f" ({', '.join(f'`{c}`' for c in o.choices)})" if o.choices else ""
        help_ = o.help.replace("|", "\\|")
        lines.append(f"| `{o.key}` | `{_toml(o.default)}` | {'server, nodes' if o.side == 'both' else 'server'} | "
                     f"{help_}{allowed} |")
    return "\n".join(lines) + "\n"
