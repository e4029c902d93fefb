"""Federated benchmark: FedAvg-full vs FedLoRA vs TaskEdge on the same partitions, plus a server micro-benchmark.

    python -m simulations.bench_federation --json results/bench_federation.json [--rounds 5 --nodes 5]

Each method runs the real ClientApp handlers and the real ServerApp phases and strategy (server/runner.py) over an
in-process Grid (server/inprocess.py; messages are still serialised and bytes are counted from
the real records), one after the other in this process, on identical data partitions. The
micro-benchmark aggregates 100 client replies of 100k masked entries (decode + validation +
masked mean, and the masked mean alone).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

METHODS = {"fedavg_full": "fedavg-full", "fedlora": "fedlora", "taskedge": "taskedge"}


def run_method(method: str, nodes: int, overrides: dict, out_dir: Path) -> dict:
    from client.client_app import app as client_app
    from common.settings import parse_run_config
    from server.inprocess import InProcessGrid, task_identity
    from server.runner import run_federation

    cfg = parse_run_config({**overrides, "method": method, "output-dir": str(out_dir)})
    with task_identity():
        grid = InProcessGrid(client_app, nodes, cfg.to_dict())
        t0 = time.perf_counter()
        fed, summary = run_federation(grid, cfg)
        wall = time.perf_counter() - t0
    return {
        "final_acc": summary["final_acc"], "initial_acc": summary["initial_acc"],
        "final_fed_acc": summary["final_fed_acc"],
        "upload_bytes_per_client_round": summary["upload_bytes_per_client_round"],
        "download_bytes_per_client_round": summary["download_bytes_per_client_round"],
        "total_bytes": summary["total_bytes"], "trainable_entries": summary["trainable_entries"],
        "mask_entries": fed.mask.num_entries if fed.mask is not None else None,
        "bound_ratio": summary["bound_ratio"], "lr": cfg.lr, "local_epochs": cfg.local_epochs,
        "wall_s": round(wall, 1), "run_dir": summary.get("run_dir"),
        "history": [{k: r.get(k) for k in ("round", "central_acc", "fed_acc", "bytes_up", "bytes_down", "cum_bytes")}
                    for r in fed.history],
    }


def micro_benchmark(clients: int = 100, entries: int = 100_000, head: int = 1_000, partial: float = 0.3,
                    repeats: int = 3, seed: int = 0) -> dict:
    """Server-side cost of one round's aggregation: 100 replies x 100k masked entries."""
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

    from server import validate
    from server.aggregate import Update, masked_mean
    from server.inprocess import task_identity

    rng = np.random.default_rng(seed)
    current = {"values": np.zeros(entries, np.float32), "head.weight": np.zeros(head, np.float32)}
    n_partial = int(clients * partial)
    sub = np.sort(rng.choice(entries, entries // 2, replace=False))  # a nested half-budget sub-mask
    replies, specs = [], []
    with task_identity():
        for c in range(clients):
            n_val = len(sub) if c < n_partial else entries
            arrays = {"values": rng.standard_normal(n_val).astype(np.float32),
                      "head.weight": rng.standard_normal(head).astype(np.float32)}
            out = Message(RecordDict(), dst_node_id=c + 1, message_type="train")
            replies.append(Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                                               "metrics": MetricRecord({"num-examples": int(rng.integers(1, 500))})}),
                                   reply_to=out))
            specs.append({"values": ((n_val,), "float32"), "head.weight": ((head,), "float32")})

    def full_path():
        ups = []
        for c, msg in enumerate(replies):
            arrays, n, _ = validate.train_reply(msg, specs[c])
            ups.append(Update(arrays, float(n), {"values": sub} if c < n_partial else {}))
        return masked_mean(current, ups)

    decoded = []
    for c, msg in enumerate(replies):
        arrays, n, _ = validate.train_reply(msg, specs[c])
        decoded.append(Update(arrays, float(n), {"values": sub} if c < n_partial else {}))

    def best(fn):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    t_full, t_mean = best(full_path), best(lambda: masked_mean(current, decoded))
    total = clients * entries
    return {"clients": clients, "entries_per_client": entries, "head_per_client": head,
            "partial_clients": n_partial, "seconds_decode_validate_aggregate": round(t_full, 4),
            "seconds_aggregate_only": round(t_mean, 4), "entries_per_s": round(total / t_full),
            "entries_per_s_aggregate_only": round(total / t_mean)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--nodes", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--local-epochs", type=int, default=None)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma list of " + ", ".join(METHODS))
    ap.add_argument("--run-config", default="", help='extra run-config overrides, e.g. "alpha=0.3 budget=0.005"')
    ap.add_argument("--output-dir", type=Path, default=None, help="run folders (default: a temp dir)")
    ap.add_argument("--skip-micro", action="store_true")
    args = ap.parse_args(argv)

    from flwr.common.config import parse_config_args  # the "k=v" parsing of `flwr run --run-config`

    overrides = {"num-server-rounds": args.rounds, "min-nodes": args.nodes}
    if args.local_epochs:
        overrides["local-epochs"] = args.local_epochs
    if args.run_config:
        overrides.update(parse_config_args([args.run_config]))
    out_dir = args.output_dir or Path(tempfile.mkdtemp(prefix="bench-fed-"))
    result = {"setup": {"nodes": args.nodes, **overrides}, "methods": {}}
    for key in args.methods.split(","):
        key = key.strip().replace("-", "_")
        print(f"[bench] {key} ...", flush=True)
        result["methods"][key] = run_method(METHODS[key], args.nodes, overrides, out_dir)
        m = result["methods"][key]
        print(f"[bench] {key}: acc {m['initial_acc']:.3f} -> {m['final_acc']:.3f}, "
              f"up {m['upload_bytes_per_client_round']:.0f} B/client/round, {m['wall_s']} s", flush=True)
    if "taskedge" in result["methods"]:
        result["taskedge_bound_ratio"] = result["methods"]["taskedge"]["bound_ratio"]
    if not args.skip_micro:
        result["aggregation_microbench"] = micro_benchmark()
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
        from simulations.plots import plot_bench

        plot_bench(result, args.json.with_suffix(".png"))
    return result


if __name__ == "__main__":
    main()
