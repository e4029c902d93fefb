"""Federated benchmark on the offline suite: every method, several partition seeds, IID and Dirichlet.

    python -m benchmarks.bench_federation --workers 2                # full: results/bench_federation.json
    python -m benchmarks.bench_federation --quick                    # CI-sized: 1 task, 1 seed, 2 rounds

Each run is one federation with the real ClientApp handlers and the real ServerApp phases and
strategy (server/runner.py) over an in-process Grid (server/inprocess.py; messages are still
serialised and bytes are counted from the real records). Full mode: every suite task
(common.data.tasks.SUITE) x partitions (Dirichlet alpha=0.5 and IID) x `--seeds` partition seeds x
METHODS, `--rounds` rounds of `--local-epochs` local epochs on `--nodes` clients that share the
task's 1,000 training examples; accuracy on the task's 1,000-example test split after every round.
Runs are independent, so `--workers` processes (one torch thread each) run them side by side.
Learning rates are every method's tuned defaults (common/defaults.json, from benchmarks/sweep.py);
TaskEdge variants differ only in the selection rule at the same number of trainable entries;
LoRA runs at the default rank and at the rank matching TaskEdge's count.

The JSON holds, per partition (`dirichlet`, `iid`), task and method: acc_mean, acc_sd,
acc_per_seed, rounds, trainable, upload_bytes_per_client_round, and the per-round curves
(mean and sd over seeds); a suite_mean per method; `default_method` (the run config's default
selection); `tasks`/`suite_mean` at the top level repeat the Dirichlet partition (the default).
`--budget-sweep` adds TaskEdge budgets vs LoRA ranks (Dirichlet, seed 0) for the figures. The
micro-benchmark aggregates 100 client replies of 100k masked entries.
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

MATCHED_RANK = 1  # LoRA rank whose adapter count (4,352) matches TaskEdge's 2 % (4,269 entries) on the embedded ViT


def methods_table(selection: dict) -> dict[str, dict]:
    """bench key -> run-config overrides. `taskedge-best` is the default selection (common/defaults.json)."""
    return {
        "taskedge-paper": {"method": "taskedge", "score": "taskedge", "allocation": "neuron"},
        "taskedge-best": {"method": "taskedge", "score": selection["score"], "allocation": selection["allocation"]},
        "taskedge-gradient": {"method": "taskedge", "score": "gradient", "allocation": "neuron"},  # opt-in score
        "random": {"method": "taskedge", "score": "random", "allocation": "neuron"},
        "magnitude": {"method": "taskedge", "score": "magnitude", "allocation": "neuron"},
        "global-topk": {"method": "taskedge", "score": "taskedge", "allocation": "global"},
        "fedlora": {"method": "fedlora", "lora-rank": 8},
        f"fedlora-r{MATCHED_RANK}": {"method": "fedlora", "lora-rank": MATCHED_RANK},
        "fedavg-full": {"method": "fedavg-full"},
        "head-only": {"method": "head-only"},
        # opt-in (name them in --methods): issue 13's variants at about TaskEdge's trainable count
        "taskedge-lora": {"method": "taskedge-lora", "budget": 0.08, "lora-rank": 2},
        "taskedge-nm24": {"method": "taskedge", "score": "taskedge", "allocation": "neuron", "nm": "2:4"},
        "taskedge-lora-nm24": {"method": "taskedge-lora", "budget": 0.08, "lora-rank": 2, "nm": "2:4"},
    }


OPT_IN = ("taskedge-lora", "taskedge-nm24", "taskedge-lora-nm24")  # not in the default method list


PARTITIONS = {"dirichlet": {"partitioner": "dirichlet", "alpha": 0.5}, "iid": {"partitioner": "iid"}}
BUDGETS = (0.005, 0.01, 0.02, 0.04, 0.08)
RANKS = (1, 2, 4, 8, 16)


def run_method(method: str, nodes: int, overrides: dict, out_dir: Path | None) -> dict:
    """One federation (in process); `method` may also be given in `overrides`."""
    import torch

    from client.client_app import app as client_app
    from common.settings import parse_run_config
    from server.inprocess import InProcessGrid, task_identity
    from server.runner import run_federation

    torch.set_num_threads(1)
    cfg = parse_run_config({"method": method, **overrides, "output-dir": str(out_dir or "runs")})
    with task_identity():
        grid = InProcessGrid(client_app, nodes, cfg.to_dict())
        t0 = time.perf_counter()
        fed, summary = run_federation(grid, cfg, run_dir="auto" if out_dir else None)
        wall = time.perf_counter() - t0
    return {
        "final_acc": summary["final_acc"], "initial_acc": summary["initial_acc"],
        "final_fed_acc": summary["final_fed_acc"], "rounds": summary["rounds"],
        "upload_bytes_per_client_round": summary["upload_bytes_per_client_round"],
        "download_bytes_per_client_round": summary["download_bytes_per_client_round"],
        "total_bytes": summary["total_bytes"], "trainable_entries": summary["trainable_entries"],
        "mask_entries": fed.mask.num_entries if fed.mask is not None else None,
        "bound_ratio": summary["bound_ratio"], "lr": cfg.lr, "head_lr": cfg.effective_head_lr, "local_epochs": cfg.local_epochs,
        "wall_s": round(wall, 2), "run_dir": summary.get("run_dir"),
        "history": [{k: r.get(k) for k in ("round", "central_acc", "fed_acc", "bytes_up", "bytes_down", "cum_bytes",
                                           "bytes_up_per_client")}
                    for r in fed.history],
    }


def _job(job: dict) -> dict:
    try:
        return {**job, **run_method(job["overrides"]["method"], job["nodes"], job["overrides"], None)}
    except Exception as exc:  # noqa: BLE001 - one failed run is reported, the others go on
        import traceback

        return {**job, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}


def _job_id(job: dict) -> str:
    return json.dumps({k: job[k] for k in ("task", "partition", "seed", "key", "nodes", "overrides")}, sort_keys=True)


def run_jobs(jobs: list[dict], workers: int, label: str = "bench", cache: Path | None = None) -> list[dict]:
    """Run the jobs; with `cache` (JSON lines) finished runs are appended there and skipped on a rerun."""
    t0 = time.perf_counter()
    out: list[dict | None] = [None] * len(jobs)
    done_before = {}
    if cache is not None and cache.is_file():
        for line in cache.read_text().splitlines():
            rec = json.loads(line)
            done_before[rec["job_id"]] = rec["result"]
    todo = []
    for i, j in enumerate(jobs):
        if _job_id(j) in done_before:
            out[i] = done_before[_job_id(j)]
        else:
            todo.append(i)
    if done_before:
        print(f"[{label}] {len(jobs) - len(todo)} of {len(jobs)} runs taken from {cache}", flush=True)

    def report(i, r):
        out[i] = r
        if cache is not None and "error" not in r:
            cache.parent.mkdir(parents=True, exist_ok=True)
            with open(cache, "a") as fh:
                fh.write(json.dumps({"job_id": _job_id(jobs[i]), "result": r}) + "\n")
        done = sum(x is not None for x in out)
        err = f" ERROR {r['error']}" if "error" in r else f" acc {r['final_acc']:.3f}"
        print(f"[{label}] {done}/{len(jobs)} {r['task']} {r['partition']} s{r['seed']} {r['key']}:{err} "
              f"({r.get('wall_s', 0):.0f} s; {time.perf_counter() - t0:.0f} s total)", flush=True)

    if workers <= 1:
        for i in todo:
            report(i, _job(jobs[i]))
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
            futs = {pool.submit(_job, jobs[i]): i for i in todo}
            for f in as_completed(futs):
                report(futs[f], f.result())
    return out  # type: ignore[return-value]


def _curve(runs: list[dict], key: str) -> list[float | None]:
    n = min(len(r["history"]) for r in runs)
    vals = []
    for i in range(n):
        v = [r["history"][i].get(key) for r in runs]
        vals.append(None if any(x is None for x in v) else v)
    return vals


def aggregate(results: list[dict], tasks: list[str], keys: list[str]) -> dict:
    """Per partition -> tasks -> method: accuracy over seeds, curves, traffic; suite means."""
    out: dict[str, dict] = {}
    for part in sorted({r["partition"] for r in results}):
        ptab: dict = {"tasks": {}, "suite_mean": {}}
        for task in tasks:
            for key in keys:
                runs = sorted((r for r in results if r["partition"] == part and r["task"] == task and r["key"] == key
                               and "error" not in r), key=lambda r: r["seed"])
                if not runs:
                    continue
                accs = [r["final_acc"] for r in runs]
                curve = _curve(runs, "central_acc")
                up = [np.cumsum([h.get("bytes_up_per_client") or 0 for h in r["history"]]).tolist() for r in runs]
                ptab["tasks"].setdefault(task, {})[key] = {
                    "acc_mean": round(float(np.mean(accs)), 4),
                    "acc_sd": round(float(np.std(accs, ddof=1)), 4) if len(accs) > 1 else 0.0,
                    "acc_per_seed": [round(a, 4) for a in accs], "seeds": [r["seed"] for r in runs],
                    "rounds": runs[0]["rounds"], "trainable": runs[0]["trainable_entries"],
                    "mask_entries": runs[0]["mask_entries"],
                    "upload_bytes_per_client_round": round(float(np.mean([r["upload_bytes_per_client_round"]
                                                                          for r in runs]))),
                    "bound_ratio": runs[0]["bound_ratio"], "lr": runs[0]["lr"], "head_lr": runs[0]["head_lr"],
                    "curve_mean": [None if v is None else round(float(np.mean(v)), 4) for v in curve],
                    "curve_sd": [None if v is None else round(float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, 4)
                                 for v in curve],
                    "cum_upload_per_client": [round(float(np.mean(c)), 1) for c in zip(*up)],
                    "wall_s_mean": round(float(np.mean([r["wall_s"] for r in runs])), 1),
                }
        for key in keys:
            cells = [ptab["tasks"][t][key] for t in tasks if key in ptab["tasks"].get(t, {})]
            if len(cells) != len(tasks):
                continue
            n = min(len(c["acc_per_seed"]) for c in cells)
            per_seed = [float(np.mean([c["acc_per_seed"][i] for c in cells])) for i in range(n)]
            ptab["suite_mean"][key] = {
                "acc_mean": round(float(np.mean(per_seed)), 4),
                "acc_sd": round(float(np.std(per_seed, ddof=1)), 4) if n > 1 else 0.0,
                "acc_per_seed": [round(a, 4) for a in per_seed],
                "trainable": round(float(np.mean([c["trainable"] for c in cells]))),
                "upload_bytes_per_client_round": round(float(np.mean([c["upload_bytes_per_client_round"]
                                                                      for c in cells]))),
                "curve_mean": [round(float(np.mean(v)), 4) for v in zip(*[c["curve_mean"] for c in cells])
                               if None not in v],
            }
        out[part] = ptab
    return out


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
            arrays, n, _ = validate.train_reply(msg, specs[c], 10**9)
            ups.append(Update(arrays, float(n), {"values": sub} if c < n_partial else {}))
        return masked_mean(current, ups)

    decoded = []
    for c, msg in enumerate(replies):
        arrays, n, _ = validate.train_reply(msg, specs[c], 10**9)
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
    ap.add_argument("--json", type=Path, default=Path("results/bench_federation.json"))
    ap.add_argument("--quick", action="store_true", help="1 task, 1 seed, 2 rounds, Dirichlet only (CI)")
    ap.add_argument("--tasks", default="", help="comma list (default: the suite; --quick: shapes-downstream)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--partitions", default="dirichlet,iid")
    ap.add_argument("--nodes", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--methods", default="", help="comma list of bench keys (default: all but the opt-in "
                                                   "taskedge-lora, taskedge-nm24, taskedge-lora-nm24)")
    ap.add_argument("--workers", type=int, default=1, help="parallel runs (one torch thread each)")
    ap.add_argument("--server-test-size", type=int, default=1000)
    ap.add_argument("--run-config", default="", help='extra run-config overrides, e.g. "alpha=0.3"')
    ap.add_argument("--budget-sweep", action="store_true", help="also TaskEdge budgets vs LoRA ranks (Dirichlet, seed 0)")
    ap.add_argument("--budget-json", type=Path, default=Path("results/fed_budget.json"))
    ap.add_argument("--cache", type=Path, default=None,
                    help="JSON lines of finished runs: appended as runs finish, reused on a rerun (resume)")
    ap.add_argument("--aggregate-only", action="store_true",
                    help="run nothing: write the JSON from the finished runs in --cache (a partial benchmark)")
    ap.add_argument("--skip-micro", action="store_true")
    args = ap.parse_args(argv)

    from flwr.common.config import parse_config_args  # the "k=v" parsing of `flwr run --run-config`

    from common import tuned
    from common.data.tasks import DEFAULT_TASK, SUITE
    from common.settings import DEFAULTS

    if args.quick:
        args.seeds, args.rounds, args.partitions = 1, 2, "dirichlet"
        args.tasks = args.tasks or DEFAULT_TASK
    tasks = [t for t in args.tasks.split(",") if t] or list(SUITE)
    partitions = [p for p in args.partitions.split(",") if p]
    selection = tuned.selection()
    table = methods_table(selection)
    keys = [k for k in args.methods.split(",") if k] or [k for k in table if k not in OPT_IN]
    unknown = sorted(set(keys) - set(table))
    if unknown:
        ap.error(f"unknown methods {unknown}; known: {', '.join(table)}")
    base = {"num-server-rounds": args.rounds, "min-nodes": args.nodes, "local-epochs": args.local_epochs,
            "fraction-evaluate": 0.0, "test-fraction": 0.0, "server-test-size": args.server_test_size,
            "calib-size": 64, "batch-size": 32}
    if args.run_config:
        base.update(parse_config_args([args.run_config]))
    jobs = [{"task": t, "partition": p, "seed": s, "key": k, "nodes": args.nodes,
             "overrides": {**base, **PARTITIONS[p], "task": t, "seed": s, **table[k]}}
            for s in range(args.seeds) for p in partitions for t in tasks for k in keys]  # seed-major: a partial
    # (interrupted, resumable) run covers every task and partition before adding seeds
    t0 = time.perf_counter()
    if args.aggregate_only:
        if args.cache is None or not args.cache.is_file():
            ap.error("--aggregate-only needs --cache with finished runs")
        wanted = {_job_id(j) for j in jobs}
        results = [rec["result"] for rec in map(json.loads, args.cache.read_text().splitlines())
                   if rec["job_id"] in wanted]
        print(f"[bench] aggregating {len(results)} of {len(jobs)} planned runs from {args.cache}", flush=True)
    else:
        results = run_jobs(jobs, args.workers, cache=args.cache)
    wall = time.perf_counter() - t0
    failed = [r for r in results if "error" in r]
    agg = aggregate(results, tasks, keys)
    primary = "dirichlet" if "dirichlet" in agg else partitions[0]
    cpu_s = sum(r.get("wall_s", 0.0) for r in results)
    result = {
        "setup": {"tasks": tasks, "partitions": {p: PARTITIONS[p] for p in partitions}, "seeds": args.seeds,
                  "nodes": args.nodes, "rounds": args.rounds, "local_epochs": args.local_epochs,
                  "batch_size": 32, "server_test_size": args.server_test_size, "workers": args.workers,
                  "methods": {k: table[k] for k in keys}, "selection": selection, "budget": DEFAULTS["budget"],
                  "command": "python -m benchmarks.bench_federation" + (" --quick" if args.quick else "")},
        "default_method": "taskedge-best",
        "default_selection": {"score": selection["score"], "allocation": selection["allocation"]},
        "tasks": agg.get(primary, {}).get("tasks", {}), "suite_mean": agg.get(primary, {}).get("suite_mean", {}),
        **agg,
        "timing": {"wall_s": round(wall, 1), "sum_of_run_wall_s": round(cpu_s, 1), "runs": len(jobs),
                   "note": "each run uses one torch thread; sum_of_run_wall_s / cores ~ wall on an idle machine"},
        "failed": [{k: r[k] for k in ("task", "partition", "seed", "key", "error")} for r in failed],
        "runs": [{k: v for k, v in r.items() if k not in ("overrides", "traceback")} for r in results],
    }
    result["complete"] = len(results) == len(jobs) and not failed
    if args.aggregate_only:
        result["timing"]["note"] = ("aggregated from the cache of finished runs (possibly from several sessions or "
                                    "machines): wall_s is not the benchmark's; sum_of_run_wall_s adds up the runs")
        result["planned_runs"], result["finished_runs"] = len(jobs), len(results)
    if args.budget_sweep and not args.aggregate_only:
        bjobs = [{"task": t, "partition": "dirichlet", "seed": 0, "key": f"taskedge {b:g}", "nodes": args.nodes,
                  "overrides": {**base, **PARTITIONS["dirichlet"], "task": t, "seed": 0, **table["taskedge-best"],
                                "budget": b}} for t in tasks for b in BUDGETS]
        bjobs += [{"task": t, "partition": "dirichlet", "seed": 0, "key": f"lora r={r}", "nodes": args.nodes,
                   "overrides": {**base, **PARTITIONS["dirichlet"], "task": t, "seed": 0, "method": "fedlora",
                                 "lora-rank": r}} for t in tasks for r in RANKS]
        bres = run_jobs(bjobs, args.workers, "budget", cache=args.cache)
        bkeys = list(dict.fromkeys(j["key"] for j in bjobs))
        bagg = aggregate(bres, tasks, bkeys)["dirichlet"]
        args.budget_json.parent.mkdir(parents=True, exist_ok=True)
        args.budget_json.write_text(json.dumps({"setup": {**result["setup"], "budgets": list(BUDGETS),
                                                          "ranks": list(RANKS), "seeds": 1},
                                                "points": bagg}, indent=2))
    if not args.skip_micro:
        result["aggregation_microbench"] = micro_benchmark()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"[bench] {len(jobs)} runs in {wall:.0f} s (sum of run times {cpu_s:.0f} s, {args.workers} workers); "
          f"{len(failed)} failed -> {args.json}")
    for part in agg:
        for k, v in sorted(agg[part]["suite_mean"].items(), key=lambda kv: -kv[1]["acc_mean"]):
            print(f"[bench] {part:9s} {k:16s} {v['acc_mean']:.4f} +- {v['acc_sd']:.4f}  trainable {v['trainable']:>7}  "
                  f"up {v['upload_bytes_per_client_round']:>9} B/client/round")
    return result


if __name__ == "__main__":
    main()
