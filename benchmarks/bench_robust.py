"""Robust aggregation on the embedded default: accuracy with no attacker, and the damage one attacker does.

    python -m benchmarks.bench_robust [--rounds 3 --nodes 5] --json results/bench_robust.json

Runs the real ClientApp and ServerApp code in-process (server/inprocess.py). One node (the first)
is the attacker; its training replies are rewritten on the way back:
  scale   its update is multiplied by -20 (a sign-flipped, boosted update; values stay < MAX_ABS)
  counts  it claims the largest num-examples the server accepts (`max-examples`) for that update
Defences: off (plain FedAvg, no clipping), clip (the default: adaptive norm clip, 3 x median),
median (per-entry median, no clipping), clip+median. Prints one JSON document.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from benchmarks.report import emit

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFENCES = {"off": {"clip-factor": 0.0}, "clip": {}, "median": {"clip-factor": 0.0, "aggregation": "median"},
            "clip+median": {"aggregation": "median"}}
ATTACKS = ("none", "scale", "counts")


def attacker(kind: str, node: int, sent: dict, max_examples: int):
    """A `tamper` hook rewriting node `node`'s training replies."""
    import numpy as np
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

    def tamper(nid, reply):
        if kind == "none" or nid != node or reply.metadata.message_type != "train" or reply.has_error():
            return reply
        got = {k: v.numpy() for k, v in reply.content["arrays"].items()}
        base = sent[nid]
        arrays = {k: (base[k] - 20.0 * (got[k] - base[k])).astype(np.float32) for k in got}
        metrics = dict(reply.content["metrics"])
        if kind == "counts":
            metrics["num-examples"] = max_examples
        return Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                                   "metrics": MetricRecord(metrics)}), metadata=reply.metadata)
    return tamper


def run(attack: str, defence: str, nodes: int, overrides: dict, out: Path) -> dict:
    from client.client_app import app
    from common.settings import parse_run_config
    from server.inprocess import InProcessGrid, task_identity
    from server.phases import max_examples
    from server.runner import run_federation

    cfg = parse_run_config({**overrides, **DEFENCES[defence], "output-dir": str(out)})
    sent: dict = {}  # what each node was sent this round: the attacker scales its update from it

    def record_then_train(msg, ctx):
        if msg.metadata.message_type == "train":
            sent[msg.metadata.dst_node_id] = {k: v.numpy() for k, v in msg.content["arrays"].items()}
        return app(msg, ctx)

    with task_identity():
        grid = InProcessGrid(record_then_train, nodes, cfg.to_dict())
        grid.tamper = attacker(attack, min(grid.contexts), sent, max_examples(cfg))
        t0 = time.perf_counter()
        fed, summary = run_federation(grid, cfg)
    clipped = sum(r.get("clipped", 0) for r in fed.history)
    return {"final_acc": summary["final_acc"], "initial_acc": summary["initial_acc"], "clipped_replies": clipped,
            "clip_bounds": [r.get("clip_bound") for r in fed.history if "clip_bound" in r],
            "wall_s": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=5, help="simulated clients (one of them attacks)")
    ap.add_argument("--rounds", type=int, default=3, help="training rounds per run")
    ap.add_argument("--local-epochs", type=int, default=1, help="local epochs per round")
    ap.add_argument("--attacks", default=",".join(ATTACKS), help="comma list of " + ", ".join(ATTACKS))
    ap.add_argument("--defences", default=",".join(DEFENCES), help="comma list of " + ", ".join(DEFENCES))
    ap.add_argument("--json", type=Path, help="also write the JSON here")
    args = ap.parse_args(argv)
    overrides = {"num-server-rounds": args.rounds, "min-nodes": args.nodes, "local-epochs": args.local_epochs,
                 "fraction-evaluate": 0.0}
    out = Path(tempfile.mkdtemp(prefix="bench-robust-"))
    result = {"setup": {"nodes": args.nodes, "attacker": "node 0 (one of them)", **overrides}, "runs": {}}
    for attack in args.attacks.split(","):
        for defence in args.defences.split(","):
            print(f"[bench_robust] attack={attack} defence={defence} ...", flush=True)
            result["runs"][f"{attack}/{defence}"] = r = run(attack, defence, args.nodes, overrides, out)
            print(f"[bench_robust] attack={attack} defence={defence}: acc {r['final_acc']:.3f} "
                  f"(clipped {r['clipped_replies']}, {r['wall_s']} s)", flush=True)
    emit(result, args.json)
    return result


if __name__ == "__main__":
    main()
