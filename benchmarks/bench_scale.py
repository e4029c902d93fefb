"""The server at fleet scale: one training round's validation + aggregation of N replies, measured.

Each reply carries one fixed-length float32 vector (`--entries`, default 86,016: TaskEdge's 0.1 %
of ViT-B is 85,668 entries) as the clients' ArrayRecord, plus the metrics a client sends. The
replies go through the server's real path, built as `server/runner.py` builds it: the `ReplyGuard`
(reply matching, key/dtype/shape/finiteness/example-count validation, byte accounting) around the
per-client update clipping (when `clip-factor` / `clip-norm` is on, the default) around the
project's strategy (`TaskEdgeFedAvg`, Flower's FedAvg mean). Messages are built in this process
(no transport): what is timed is the server's compute per round, not the network.

For every N in `--clients` (default 100 300 1000): wall time of `aggregate_train` (median of
`--reps`, min / max), and its peak traced memory (tracemalloc, numpy buffers included) on top of
the replies themselves, whose payload is reported separately. A linear fit over the N measured
gives the PROJECTION to 10,000 and 1,000,000 clients (time per round, memory), labelled as such:
nothing at those sizes is run. Prints one JSON object (and writes it with `--json`).

`--blas-threads 1` caps OpenBLAS to one thread for the measurement (threadpoolctl). It matters: once
torch's OpenMP pool is up (the server imports torch), a threaded BLAS call such as the float64
`np.linalg.norm` of an 86k update (Flower's `get_norm`, used by the update clipping) was measured
at ~25 ms instead of ~0.014 ms on a 2-core machine (threads oversubscribed), which dominated the round.

    python -m benchmarks.bench_scale --json results/bench_scale.json
"""
from __future__ import annotations

import argparse
import gc
import inspect
import json
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

from benchmarks.report import emit

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict  # noqa: E402

from common.settings import parse_run_config  # noqa: E402
from server.guard import ReplyGuard  # noqa: E402
from server.inprocess import InProcessGrid, task_identity  # noqa: E402
from server.recorder import RoundLog  # noqa: E402
from server.strategy import make_strategy  # noqa: E402


def server_stack(cfg, log: RoundLog):
    """Strategy -> [update clipping] -> ReplyGuard, as server/runner.py composes them (no mask delivery:
    the mask phase is outside the round)."""
    strategy = make_strategy(cfg, None, False)
    inner = strategy
    if getattr(cfg, "clip_norm", 0) > 0 or getattr(cfg, "clip_factor", 0) > 0:
        from server.robust import UpdateClipping

        inner = UpdateClipping(inner, log, cfg.clip_norm, cfg.clip_factor)
    params = inspect.signature(ReplyGuard).parameters
    kw = {"max_examples": 10**6} if "max_examples" in params else {}
    return ReplyGuard(inner, log, cfg.min_replies, **kw)


def one_round(n: int, entries: int, seed: int, cfg) -> tuple[ReplyGuard, list[Message], int]:
    """A guard that has just sent round 1 to n nodes, and the n replies (fresh messages)."""
    rng = np.random.default_rng(seed)
    glob = rng.standard_normal(entries).astype(np.float32) * 0.01
    log = RoundLog()
    guard = server_stack(cfg, log)
    grid = _Nodes(n)
    sent = list(guard.configure_train(1, ArrayRecord({"values": Array(glob)}), ConfigRecord({"lr": 0.05}), grid))
    for i, m in enumerate(sent):  # what a Grid stamps on pushed messages (server/inprocess.py)
        m.metadata.__dict__["_message_id"] = f"m{i}"
    replies = []
    for m in sent:
        vec = glob + rng.standard_normal(entries).astype(np.float32) * 1e-3
        replies.append(Message(RecordDict({"arrays": ArrayRecord({"values": Array(vec)}),
                                           "metrics": MetricRecord({"num-examples": int(rng.integers(10, 500)),
                                                                    "train-loss": 1.0, "train-acc": 0.5})}),
                               reply_to=m))
    payload = sum(r.content["arrays"].count_bytes() for r in replies)
    return guard, replies, payload


class _Nodes(InProcessGrid):
    """Only node ids (sampling); nothing is delivered."""

    def __init__(self, n: int):
        self.contexts = {1000 + i: None for i in range(n)}


def measure(n: int, entries: int, reps: int, cfg) -> dict:
    times = []
    for rep in range(reps):
        guard, replies, payload = one_round(n, entries, rep, cfg)
        gc.collect()
        t0 = time.perf_counter()
        arrays, _ = guard.aggregate_train(1, replies)
        times.append(time.perf_counter() - t0)
        assert arrays is not None and arrays["values"].numpy().shape == (entries,)
        assert not guard.log.dropped, guard.log.dropped[:3]
        del guard, replies, arrays
    payload, peak = aggregation_peak(n, entries, reps, cfg)
    return {"clients": n, "entries": entries, "median_s": statistics.median(times), "min_s": min(times),
            "max_s": max(times), "reps": reps, "entries_per_s": n * entries / statistics.median(times),
            "replies_payload_mb": payload / 2**20, "aggregation_peak_mb": peak / 2**20}


def aggregation_peak(n: int, entries: int, seed: int, cfg) -> tuple[int, int]:
    """(bytes of the round's replies, peak bytes traced while the server aggregates them) for one fresh round."""
    guard, replies, payload = one_round(n, entries, seed, cfg)
    gc.collect()
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    guard.aggregate_train(1, replies)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return payload, peak


def _fit(xs, ys) -> tuple[float, float]:
    slope, icpt = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return float(slope), float(icpt)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, nargs="+", default=[100, 300, 1000])
    p.add_argument("--entries", type=int, default=86_016)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--run-config", type=str, default="{}", help="JSON run-config overrides (e.g. clip-factor)")
    p.add_argument("--blas-threads", type=int, default=0, help="cap BLAS threads (threadpoolctl); 0 = as is")
    p.add_argument("--json", type=str, default="")
    args = p.parse_args(argv)
    cfg = parse_run_config({"min-nodes": 1, **json.loads(args.run_config)})
    import contextlib

    limit = contextlib.nullcontext()
    if args.blas_threads > 0:
        from threadpoolctl import threadpool_limits

        limit = threadpool_limits(args.blas_threads, user_api="blas")
    with task_identity(), limit:
        rows = [measure(n, args.entries, args.reps, cfg) for n in args.clients]
    for r in rows:
        print(f"[scale] N={r['clients']:>6}  {r['median_s']:.3f} s  peak +{r['aggregation_peak_mb']:.0f} MiB "
              f"(replies {r['replies_payload_mb']:.0f} MiB)", file=sys.stderr)
    ns = [r["clients"] for r in rows]
    t_slope, t_icpt = _fit(ns, [r["median_s"] for r in rows])
    m_slope, m_icpt = _fit(ns, [r["aggregation_peak_mb"] + r["replies_payload_mb"] for r in rows])
    projection = {str(n): {"round_s": t_icpt + t_slope * n, "memory_gb": (m_icpt + m_slope * n) / 1024}
                  for n in (10_000, 1_000_000)}
    result = {
        "path": "ReplyGuard -> " + ("UpdateClipping -> " if cfg.clip_norm > 0 or cfg.clip_factor > 0 else "")
                + "TaskEdgeFedAvg (Flower FedAvg mean)",
        "measured": rows,
        "projection": {"note": "PROJECTION, not measured: linear fit over the measured N (time and replies + "
                               "aggregation memory held at once); all replies of a round are in memory together",
                       "seconds_per_client": t_slope, "mib_per_client": m_slope, **projection},
        "settings": {"entries": args.entries, "reps": args.reps, "run_config": json.loads(args.run_config),
                     "blas_threads": args.blas_threads or "default"},
    }
    emit(result, args.json, indent=1)
    return result


if __name__ == "__main__":
    main()
