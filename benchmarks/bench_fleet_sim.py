"""A Flower simulation at fleet shape: thousands of virtual SuperNodes, 10 % sampled per round, on 2 cores.

    python -m benchmarks.bench_fleet_sim --nodes 1000              # -> results/bench_fleet_sim_1000.json
    python -m benchmarks.bench_fleet_sim --nodes 10000             # -> results/bench_fleet_sim_10000.json
    python -m benchmarks.bench_fleet_sim --combine                 # -> results/bench_fleet_sim.json (growth, projection)

Runs the real ServerApp and ClientApp through `flwr.simulation.run_simulation` (Ray backend, 2
actors of 1 CPU each, as `flwr run .` on the embedded default) with `--nodes` SuperNodes, each of
which renders its own `--examples-per-node` examples of the built-in task (`partitioner="generated"`:
no shared split, so 10,000 nodes all have data), `fraction-train` = `--fraction`, `--rounds` rounds,
and the setup phases (classes, statistics, first mask delivery) asked of a `--setup-fraction` cohort
(the others get the mask when first sampled).

Measured: wall time with start-up, client-rounds per hour (training replies / wall), and where a
round goes: every ClientApp call is traced (benchmarks/ray_simulation.py: start, seconds in the
handler, bytes of the node's state after it) so a training round splits into the nodes' own work
(sum of handler seconds / actors), Ray/Flower dispatch inside the round's client span, and the
server outside that span (sampling, aggregation, central evaluation). Memory: a sampler thread
reads, every `--interval` seconds, the RSS / USS of this process (the ServerApp and the simulation
engine, which holds every virtual node's Context) and of every process below it (the Ray actors
that run the ClientApps, and Ray's own raylet / GCS / helpers), peak per role. The state a node
holds between rounds is its Context.state as traced; the engine's per-node cost beyond it is the
growth of this process's memory from 1,000 to 10,000 nodes (`--combine`).
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path


def _role(proc) -> str:
    try:
        cmd = " ".join(proc.cmdline())
    except Exception:  # noqa: BLE001 - a process can vanish between listing and reading
        return "gone"
    if "ClientAppActor" in cmd or "ray::" in cmd or "default_worker.py" in cmd:
        return "actor"
    return "ray-system"


class MemorySampler(threading.Thread):
    """Peak RSS / USS per role (server = this process, actor, ray-system) and of everything together."""

    def __init__(self, interval: float):
        super().__init__(daemon=True)
        import psutil

        self.me = psutil.Process()
        self.interval = interval
        self.stop_event = threading.Event()
        self.peak: dict[str, dict[str, float]] = {}
        self.max_actors = 0

    def _sample(self) -> None:
        by_role: dict[str, list[tuple[int, int]]] = {"server": []}
        try:
            info = self.me.memory_full_info()
            by_role["server"].append((info.rss, info.uss))
        except Exception:  # noqa: BLE001
            return
        for child in self.me.children(recursive=True):
            try:
                info = child.memory_full_info()
            except Exception:  # noqa: BLE001, S112 - exited meanwhile
                continue
            by_role.setdefault(_role(child), []).append((info.rss, info.uss))
        self.max_actors = max(self.max_actors, len(by_role.get("actor", [])))
        total_rss = sum(r for v in by_role.values() for r, _ in v)
        total_uss = sum(u for v in by_role.values() for _, u in v)
        for role, vals in [*by_role.items(), ("all", [(total_rss, total_uss)])]:
            p = self.peak.setdefault(role, {"rss_mib_max_per_process": 0.0, "uss_mib_max_per_process": 0.0,
                                            "rss_mib_sum_peak": 0.0, "uss_mib_sum_peak": 0.0})
            p["rss_mib_max_per_process"] = max(p["rss_mib_max_per_process"], max(r for r, _ in vals) / 2**20)
            p["uss_mib_max_per_process"] = max(p["uss_mib_max_per_process"], max(u for _, u in vals) / 2**20)
            p["rss_mib_sum_peak"] = max(p["rss_mib_sum_peak"], sum(r for r, _ in vals) / 2**20)
            p["uss_mib_sum_peak"] = max(p["uss_mib_sum_peak"], sum(u for _, u in vals) / 2**20)

    def run(self) -> None:
        while not self.stop_event.is_set():
            self._sample()
            self.stop_event.wait(self.interval)

    def stop(self) -> dict:
        self.stop_event.set()
        self.join()
        return {k: {kk: round(vv, 1) for kk, vv in v.items()} for k, v in self.peak.items()}


def sampled_simulation(nodes: int, cpus: int, run_config: dict, interval: float = 0.5, trace_dir: str | None = None):
    """Flower's simulation of the real apps with memory sampled meanwhile: (wall seconds, peak memory per
    role, the sampler). The run's results are in `server.server_app.LAST`."""
    from benchmarks.ray_simulation import run_ray_simulation

    sampler = MemorySampler(interval)
    sampler.start()
    t0 = time.perf_counter()
    try:
        run_ray_simulation(nodes, num_cpus=cpus, run_config=run_config, trace_dir=trace_dir)
    finally:
        wall = time.perf_counter() - t0
        memory = sampler.stop()
    return wall, memory, sampler


def round_breakdown(calls: list[dict], history: list[dict], actors: int) -> list[dict]:
    """Per training round: its time (the ServerApp's round record), the nodes' own work (handler seconds / actors),
    the Ray/Flower dispatch inside the round's client span, and the server's share outside that span."""
    out = []
    for rec in history:
        rnd = rec.get("round")
        train = [c for c in calls if c["message_type"] == "train" and c.get("server_round") == rnd]
        if not train or not rec.get("round_time_s"):
            continue
        span = max(c["start"] + c["handler_s"] for c in train) - min(c["start"] for c in train)
        busy = sum(c["handler_s"] for c in train) / actors
        out.append({"round": rnd, "round_s": round(rec["round_time_s"], 2), "train_calls": len(train),
                    "client_work_s": round(busy, 2), "dispatch_s": round(max(span - busy, 0.0), 2),
                    "server_s": round(max(rec["round_time_s"] - span, 0.0), 2),
                    "handler_s_mean": round(sum(c["handler_s"] for c in train) / len(train), 3)})
    return out


def _summed(rows: list[dict], key: str) -> float:
    return round(sum(r[key] for r in rows), 1)


def run(args) -> dict:
    """One fleet simulation -> its results document."""
    from benchmarks.ray_simulation import read_trace
    from common.settings import DEFAULTS
    from server import server_app

    out_dir = tempfile.mkdtemp(prefix="fleet-runs-")  # the run's own results folder; only the summary is kept
    trace_dir = tempfile.mkdtemp(prefix="fleet-trace-")
    overrides = {"num-server-rounds": args.rounds, "fraction-train": args.fraction, "fraction-evaluate": 0.0,
                 "partitioner": "generated", "examples-per-node": args.examples_per_node,
                 "setup-fraction": args.setup_fraction, "min-nodes": args.nodes, "test-fraction": 0.0,
                 "server-test-size": args.server_test_size, "output-dir": out_dir}
    try:
        wall, memory, sampler = sampled_simulation(args.nodes, args.actors, overrides, args.interval, trace_dir)
        calls = read_trace(trace_dir)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
        shutil.rmtree(trace_dir, ignore_errors=True)
    summary = server_app.LAST.get("summary", {})
    hist = [r for r in server_app.LAST.get("history", []) if isinstance(r, dict)]
    replies = [r.get("replies") for r in hist if "sent" in r]
    client_rounds = int(sum(r or 0 for r in replies))
    train = [c for c in calls if c["message_type"] == "train"]
    t_first = min((c["start"] for c in calls), default=0.0)
    t_last = max((c["start"] + c["handler_s"] for c in calls), default=0.0)
    by_type = {}
    for c in calls:
        d = by_type.setdefault(c["message_type"], {"calls": 0, "handler_s": 0.0})
        d["calls"] += 1
        d["handler_s"] = round(d["handler_s"] + c["handler_s"], 1)
    states = [c["state_bytes"] for c in calls]
    rounds = round_breakdown(calls, hist, args.actors)
    doc = {"nodes": args.nodes, "sampled_per_round": max(int(args.nodes * args.fraction), 1), "rounds": len(replies),
           "wall_s": round(wall, 1), "client_rounds": client_rounds,
           "client_rounds_per_hour": round(client_rounds / wall * 3600),
           "client_rounds_per_hour_after_startup": round(client_rounds / (t_last - t_first) * 3600) if train else None,
           "startup_s": round(t_first - (time.time() - wall), 1) if calls else None,
           "memory_per_idle_client": {
               "state_bytes_max": max(states, default=0), "state_bytes_mean": round(sum(states) / max(len(states), 1)),
               "what": "Context.state a node holds between rounds (the mask's indices and ranks, the server's "
                       "backbone fingerprint), bytes of its records after each call; the engine's own per-node "
                       "cost (Context object, node and run config) is the server process's growth with nodes "
                       "(--combine)"},
           "memory_per_active_worker_mib": {k: memory.get("actor", {}).get(k) for k in
                                            ("rss_mib_max_per_process", "uss_mib_max_per_process")},
           "server_memory_mib": {k: memory.get("server", {}).get(k) for k in
                                 ("rss_mib_max_per_process", "uss_mib_max_per_process")},
           "memory": memory, "max_actor_processes_seen": sampler.max_actors,
           "time_breakdown_s": {"rounds_total": _summed(rounds, "round_s"), "client_work": _summed(rounds, "client_work_s"),
                                "ray_flower_dispatch": _summed(rounds, "dispatch_s"), "server": _summed(rounds, "server_s"),
                                "setup_phases": round(sum(v["handler_s"] for k, v in by_type.items() if k != "train")
                                                      / args.actors, 1)},
           "per_round": rounds, "calls_by_type": by_type,
           "setup": {"fraction_train": args.fraction, "setup_fraction": args.setup_fraction, "actors": args.actors,
                     "examples_per_node": args.examples_per_node, "task": DEFAULTS["task"],
                     "method": DEFAULTS["method"], "local_epochs": DEFAULTS["local-epochs"],
                     "server_test_size": args.server_test_size,
                     "command": f"python -m benchmarks.bench_fleet_sim --nodes {args.nodes} --rounds {args.rounds}"},
           "final_acc": summary.get("final_acc"), "initial_acc": summary.get("initial_acc"),
           "upload_bytes_per_client_round": summary.get("upload_bytes_per_client_round"),
           "download_bytes_per_client_round": summary.get("download_bytes_per_client_round"),
           "replies_per_round": replies, "dropped_replies": summary.get("dropped_replies"),
           "accounting": "RSS/USS of this process (server + simulation engine) and of every descendant, sampled "
                         f"every {args.interval} s; USS excludes shared pages (torch libraries)"}
    return doc


def combine(paths: list[Path]) -> dict:
    """Growth of the server process with the fleet, per node, and the 1 M-node projection from it."""
    docs = sorted((json.loads(p.read_text()) for p in paths), key=lambda d: d["nodes"])
    small, big = docs[0], docs[-1]
    dn = big["nodes"] - small["nodes"]
    grow = {k: (big["server_memory_mib"][k] - small["server_memory_mib"][k]) * 2**20 / dn
            for k in ("rss_mib_max_per_process", "uss_mib_max_per_process")}
    per_node = grow["uss_mib_max_per_process"]
    reply = big["upload_bytes_per_client_round"] or 0
    return {"runs": [{k: d[k] for k in ("nodes", "sampled_per_round", "rounds", "wall_s", "client_rounds_per_hour",
                                        "server_memory_mib", "memory_per_idle_client")} for d in docs],
            "server_bytes_per_node": {k: round(v) for k, v in grow.items()},
            "what": "server-process growth from the smallest to the largest run, per added node: the simulation "
                    "engine's Context per virtual node (its state, node and run config) plus the ServerApp's per-node "
                    "bookkeeping, and the larger round's replies (sampled_per_round grows with the fleet)",
            "projection_1m_nodes": {
                "nodes": 1_000_000, "sampled_per_round": 100_000,
                "server_mib_from_per_node_growth": round(small["server_memory_mib"]["uss_mib_max_per_process"]
                                                         + per_node * (1_000_000 - small["nodes"]) / 2**20),
                "one_round_replies_mib": round(100_000 * reply / 2**20),
                "how": "linear in nodes from the measured per-node growth (which already includes 10 % of the "
                       "nodes' replies held at once); the replies alone: sampled x upload bytes per reply"}}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--examples-per-node", type=int, default=20)
    ap.add_argument("--setup-fraction", type=float, default=0.1)
    ap.add_argument("--actors", type=int, default=2, help="CPUs given to Ray (one actor per CPU)")
    ap.add_argument("--interval", type=float, default=0.5)
    ap.add_argument("--server-test-size", type=int, default=200)
    ap.add_argument("--combine", action="store_true", help="summarise results/bench_fleet_sim_*.json")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.combine:
        doc = combine(sorted(Path("results").glob("bench_fleet_sim_*.json")))
        path = args.json or Path("results/bench_fleet_sim.json")
    else:
        doc = run(args)
        path = args.json or Path(f"results/bench_fleet_sim_{args.nodes}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2))
    print(json.dumps({k: v for k, v in doc.items() if k not in ("memory", "per_round")}, indent=2))
    return doc


if __name__ == "__main__":
    main()
