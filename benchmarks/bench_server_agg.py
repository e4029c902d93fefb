"""Server aggregation against the memory-bandwidth reference: the project's path vs a plain numpy sum.

One training round's replies go through the server's real path (`benchmarks/bench_scale.py`'s
`server_stack`, as `server/runner.py` composes it): `ReplyGuard` (reply matching, key / dtype / shape /
finiteness / example-count validation, byte accounting) -> `UpdateClipping` (per-client update-norm bound,
on by default) -> `TaskEdgeFedAvg` (Flower's FedAvg weighted mean). The reference is the cheapest thing
that touches the same data: a plain numpy running sum (`acc += v`) of the very same float32 vectors, already
unpacked to numpy (untimed), in the same process, timed side by side, alternating, `--reps` times.

Throughput = replies x entries / seconds, for both; `ratio` = project / numpy (median times). The target
of the issue is ratio >= 0.25 at 1,000 replies. Sizes: the embedded default's reply (`--entries`, 4,919 =
4,269 masked values at budget 2 % + the 650-entry dense head, as one vector) and a larger vector
(100,000 entries) for which memory bandwidth, not per-reply overhead, dominates. Each row also gives the
replies' payload (all replies of a round are held in memory together) and the aggregation's own peak
(tracemalloc, numpy buffers included), so memory growth with the number of replies can be read off.

    python -m benchmarks.bench_server_agg                 # writes results/bench_server_agg.json
    python -m benchmarks.bench_server_agg --quick --json /tmp/q.json   # tiny sizes (tests)
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks.bench_scale import aggregation_peak, one_round  # noqa: E402
from benchmarks.report import emit  # noqa: E402
from common.settings import parse_run_config  # noqa: E402
from server.inprocess import task_identity  # noqa: E402

DEFAULT_ENTRIES = 4_269 + 650  # embedded default (taskedge-vit-tiny, budget 0.02): masked values + dense head


def numpy_sum(vecs: list[np.ndarray]) -> np.ndarray:
    """The reference: one pass over every reply's vector, accumulated in place (float32)."""
    acc = vecs[0].copy()
    for v in vecs[1:]:
        acc += v
    return acc


def _stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def measure(n: int, entries: int, reps: int, cfg) -> dict:
    proj, ref = [], []
    for rep in range(reps):
        guard, replies, payload = one_round(n, entries, rep, cfg)
        vecs = [r.content["arrays"]["values"].numpy() for r in replies]  # the same arrays, unpacked (untimed)
        gc.collect()
        order = (0, 1) if rep % 2 == 0 else (1, 0)  # alternate which one runs first
        for which in order:
            t0 = time.perf_counter()
            if which == 0:
                arrays, _ = guard.aggregate_train(1, replies)
                proj.append(time.perf_counter() - t0)
            else:
                total = numpy_sum(vecs)
                ref.append(time.perf_counter() - t0)
        assert arrays is not None and arrays["values"].numpy().shape == (entries,)
        assert not guard.log.dropped, guard.log.dropped[:3]
        assert total.shape == (entries,)
        del guard, replies, arrays, vecs, total
    payload, peak = aggregation_peak(n, entries, reps, cfg)
    p, r = _stats(proj), _stats(ref)
    work = n * entries
    return {"replies": n, "entries_per_reply": entries, "reps": reps,
            "project_path_s": p, "numpy_sum_s": r,
            "project_entries_per_s": work / p["median"], "numpy_entries_per_s": work / r["median"],
            "project_gb_per_s": work * 4 / p["median"] / 1e9, "numpy_gb_per_s": work * 4 / r["median"] / 1e9,
            "ratio": r["median"] / p["median"],
            "ratio_min_max": [r["median"] / p["max"], r["median"] / p["min"]],
            "replies_payload_mib": payload / 2**20, "aggregation_peak_mib": peak / 2**20}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--replies", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--entries", type=int, nargs="+", default=[DEFAULT_ENTRIES, 100_000])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--run-config", type=str, default="{}", help="JSON run-config overrides (e.g. clip-factor)")
    p.add_argument("--blas-threads", type=int, default=1, help="cap BLAS threads (threadpoolctl); 0 = as is")
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 reps (a smoke test, not a measurement)")
    p.add_argument("--json", type=str, default="results/bench_server_agg.json", help="'' = print only")
    args = p.parse_args(argv)
    if args.quick:
        args.replies, args.entries, args.reps = [3, 10], [64], 2
    cfg = parse_run_config({"min-nodes": 1, **json.loads(args.run_config)})
    import contextlib

    limit = contextlib.nullcontext()
    if args.blas_threads > 0:
        from threadpoolctl import threadpool_limits

        limit = threadpool_limits(args.blas_threads, user_api="blas")
    with task_identity(), limit:
        rows = [measure(n, e, args.reps, cfg) for e in args.entries for n in args.replies]
    for r in rows:
        print(f"[agg] {r['replies']:>5} x {r['entries_per_reply']:>7}: project {r['project_path_s']['median']*1e3:8.2f} ms "
              f"numpy {r['numpy_sum_s']['median']*1e3:7.2f} ms  ratio {r['ratio']:.2f}", file=sys.stderr)
    result = {
        "path": "ReplyGuard -> " + ("UpdateClipping -> " if cfg.clip_norm > 0 or cfg.clip_factor > 0 else "")
                + "TaskEdgeFedAvg (Flower FedAvg mean)",
        "reference": "numpy running sum (acc += v) of the same float32 vectors, pre-unpacked",
        "target": "ratio >= 0.25 at 1,000 replies",
        "measured": rows,
        "settings": {"reps": args.reps, "run_config": json.loads(args.run_config), "quick": args.quick,
                     "blas_threads": args.blas_threads or "default", "cpus": os.cpu_count(),
                     "machine": platform.processor() or platform.machine(), "numpy": np.__version__},
    }
    emit(result, args.json or None, indent=1)
    return result


if __name__ == "__main__":
    main()
