"""Fewer bytes per value: accuracy and traffic of value-dtype float32 / float16 / int8, TaskEdge and FedLoRA.

    python -m benchmarks.bench_value_dtype --workers 2   # 2 tasks x 2 seeds x 10 rounds (results/*.json)
    python -m benchmarks.bench_value_dtype --quick         # CI smoke: 1 task, 1 seed, 2 rounds

Each run is one federation with the real ClientApp and ServerApp code over the in-process grid (messages
serialised, bytes counted from the real records; benchmarks/bench_federation.py's harness): `--nodes`
nodes, Dirichlet alpha=0.5, `--rounds` rounds of one local epoch, each method at its tuned defaults,
once per value-dtype with everything else equal (same seed: same partitions, mask and initialisation).
int8 sends one scale per tensor and rounds stochastically; nodes send their update (common/quantize.py).
Reports per method and dtype: final centralised accuracy (mean +- sd over tasks x seeds), the paired
difference to float32 (mean +- sd over the same runs), and bytes up / down per client per round.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DTYPES = ("float32", "float16", "int8")
METHODS = {"taskedge": {"method": "taskedge"}, "fedlora": {"method": "fedlora", "lora-rank": 8}}
TASKS = ("shapes-downstream", "digits")


def jobs(tasks, seeds, methods, dtypes, args) -> list[dict]:
    base = {"num-server-rounds": args.rounds, "min-nodes": args.nodes, "local-epochs": 1, "fraction-evaluate": 0.0,
            "test-fraction": 0.0, "server-test-size": args.server_test_size, "calib-size": 64, "batch-size": 32,
            "partitioner": "dirichlet", "alpha": 0.5}
    if args.weights:
        base["weights-path"] = args.weights
    return [{"task": t, "partition": "dirichlet", "seed": s, "key": f"{m}/{dt}", "nodes": args.nodes,
             "overrides": {**base, "task": t, "seed": s, **METHODS[m], "value-dtype": dt}}
            for s in seeds for t in tasks for m in methods for dt in dtypes]


def summarize(results: list[dict], methods, dtypes) -> list[dict]:
    by = {(r["key"], r["task"], r["seed"]): r for r in results if "error" not in r}
    rows = []
    for m in methods:
        for dt in dtypes:
            runs = [r for (k, _, _), r in by.items() if k == f"{m}/{dt}"]
            if not runs:
                continue
            acc = np.array([r["final_acc"] for r in runs], float)
            diff = np.array([r["final_acc"] - by[(f"{m}/float32", r["task"], r["seed"])]["final_acc"] for r in runs
                             if (f"{m}/float32", r["task"], r["seed"]) in by], float)
            up = float(np.mean([r["upload_bytes_per_client_round"] for r in runs]))
            up32 = [by[(f"{m}/float32", r["task"], r["seed"])]["upload_bytes_per_client_round"] for r in runs
                    if (f"{m}/float32", r["task"], r["seed"]) in by]
            rows.append({
                "method": m, "value_dtype": dt, "runs": len(runs), "acc_mean": float(acc.mean()),
                "acc_sd": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                "acc_diff_vs_float32_mean": float(diff.mean()) if diff.size else None,
                "acc_diff_vs_float32_sd": float(diff.std(ddof=1)) if diff.size > 1 else 0.0,
                "upload_bytes_per_client_round": up,
                "download_bytes_per_client_round": float(np.mean([r["download_bytes_per_client_round"] for r in runs])),
                "upload_ratio_vs_float32": float(np.mean(up32)) / up if up32 else None,
                "trainable_entries": runs[0]["trainable_entries"],
                "acc_per_run": {f"{r['task']}/s{r['seed']}": r["final_acc"] for r in runs},
                "wall_s_mean": float(np.mean([r.get("wall_s", 0.0) for r in runs]))})
    return rows


def table(rows: list[dict], args, tasks, seeds) -> str:
    lines = [f"{args.nodes} nodes, Dirichlet alpha=0.5, {args.rounds} rounds x 1 local epoch, tasks "
             f"{', '.join(tasks)} x seeds {', '.join(map(str, seeds))}", "",
             "| method | value-dtype | final accuracy (mean +- sd) | vs float32 (paired, mean +- sd) | "
             "up B/client/round | down B/client/round | upload ratio |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        d = r["acc_diff_vs_float32_mean"]
        lines.append(f"| {r['method']} | {r['value_dtype']} | {r['acc_mean']:.3f} +- {r['acc_sd']:.3f} | "
                     + (f"{d:+.3f} +- {r['acc_diff_vs_float32_sd']:.3f}" if d is not None else "-")
                     + f" | {r['upload_bytes_per_client_round']:,.0f} | {r['download_bytes_per_client_round']:,.0f} | "
                     f"{r['upload_ratio_vs_float32']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--nodes", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--server-test-size", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=1, help="parallel runs (one torch thread each)")
    ap.add_argument("--weights", default="", help="weights-path (default: the embedded pre-trained ViT)")
    ap.add_argument("--quick", action="store_true", help="CI smoke: 1 task, 1 seed, 2 rounds, 3 nodes")
    ap.add_argument("--out", type=Path, default=ROOT / "results", help="folder for the JSON and the table")
    args = ap.parse_args(argv)
    if args.quick:
        args.tasks, args.seeds, args.rounds, args.nodes, args.server_test_size = TASKS[0], [0], 2, 3, 200
    tasks = [t for t in args.tasks.split(",") if t]
    methods = [m for m in args.methods.split(",") if m]
    dtypes = [d for d in args.dtypes.split(",") if d]
    unknown = sorted(set(methods) - set(METHODS)) + sorted(set(dtypes) - set(DTYPES))
    if unknown:
        ap.error(f"unknown {unknown}; methods: {', '.join(METHODS)}; dtypes: {', '.join(DTYPES)}")

    from benchmarks.bench_federation import run_jobs

    t0 = time.perf_counter()
    results = run_jobs(jobs(tasks, args.seeds, methods, dtypes, args), args.workers, label="value-dtype")
    wall = time.perf_counter() - t0
    rows = summarize(results, methods, dtypes)
    text = table(rows, args, tasks, args.seeds)
    cmd = "python -m benchmarks.bench_value_dtype" + (" --quick" if args.quick else f" --workers {args.workers}")
    doc = {"setup": {"tasks": tasks, "seeds": args.seeds, "methods": {m: METHODS[m] for m in methods},
                     "dtypes": dtypes, "nodes": args.nodes, "rounds": args.rounds, "local_epochs": 1,
                     "partition": {"partitioner": "dirichlet", "alpha": 0.5}, "server_test_size": args.server_test_size,
                     "weights": args.weights or "embedded", "command": cmd},
           "summary": rows, "table": text, "wall_s": round(wall, 1),
           "failed": [{k: r[k] for k in ("task", "seed", "key", "error")} for r in results if "error" in r],
           "runs": [{k: r.get(k) for k in ("task", "seed", "key", "final_acc", "initial_acc",
                                           "upload_bytes_per_client_round", "download_bytes_per_client_round",
                                           "bound_ratio", "trainable_entries", "wall_s")} for r in results]}
    stem = "bench_value_dtype_quick" if args.quick else "bench_value_dtype"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(doc, indent=2))
    print(json.dumps({"summary": [{k: v for k, v in r.items() if k != "acc_per_run"} for r in rows],
                      "wall_s": doc["wall_s"], "failed": doc["failed"]}, indent=2))
    print(text)
    return doc


if __name__ == "__main__":
    main()
