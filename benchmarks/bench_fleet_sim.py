"""A Flower simulation at fleet shape: 100 SuperNodes, 10 sampled per round, on 2 cores; memory measured.

    python -m benchmarks.bench_fleet_sim --json results/bench_fleet_sim.json

Runs the real ServerApp and ClientApp through `flwr.simulation.run_simulation` (Ray backend, 2
actors of 1 CPU each, as `flwr run .` on the embedded default), `--nodes` SuperNodes that share the
task's 1,000 training examples (IID partitions: 10 each at 100 nodes), `fraction-train` = `--fraction`, `--rounds`
rounds. A sampler thread reads, every `--interval` seconds, the resident memory of this process
(the ServerApp and the simulation engine) and of every process below it (the Ray actors that run
the ClientApps, and Ray's own raylet / GCS / helpers): the peak RSS and USS (memory only that
process holds; RSS also counts shared libraries such as torch once per process) per role. The
summary of the run (accuracy, bytes per client per round) comes from the ServerApp itself.
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


def sampled_simulation(nodes: int, cpus: int, run_config: dict, interval: float = 0.5):
    """Flower's simulation of the real apps with memory sampled meanwhile: (wall seconds, peak memory per
    role, the sampler). The run's results are in `server.server_app.LAST`."""
    from benchmarks.ray_simulation import run_ray_simulation

    sampler = MemorySampler(interval)
    sampler.start()
    t0 = time.perf_counter()
    try:
        run_ray_simulation(nodes, num_cpus=cpus, run_config=run_config)
    finally:
        wall = time.perf_counter() - t0
        memory = sampler.stop()
    return wall, memory, sampler


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=100)
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--actors", type=int, default=2, help="CPUs given to Ray (one actor per CPU)")
    ap.add_argument("--interval", type=float, default=0.5)
    ap.add_argument("--server-test-size", type=int, default=200)
    ap.add_argument("--partitioner", default="iid", help="iid (default: 1,000 examples over 100 nodes is 10 each, "
                                                         "below what a Dirichlet split can guarantee) or dirichlet")
    ap.add_argument("--json", type=Path, default=Path("results/bench_fleet_sim.json"))
    args = ap.parse_args(argv)

    from common.settings import DEFAULTS
    from server import server_app

    out_dir = tempfile.mkdtemp(prefix="fleet-runs-")  # the run's own results folder; only the summary is kept
    overrides = {"num-server-rounds": args.rounds, "fraction-train": args.fraction, "fraction-evaluate": 0.0,
                 "partitioner": args.partitioner,
                 "min-nodes": args.nodes, "test-fraction": 0.0, "server-test-size": args.server_test_size,
                 "output-dir": out_dir}
    try:
        wall, memory, sampler = sampled_simulation(args.nodes, args.actors, overrides, args.interval)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    summary = server_app.LAST.get("summary", {})
    hist = server_app.LAST.get("history", [])
    doc = {"setup": {"nodes": args.nodes, "fraction_train": args.fraction, "rounds": args.rounds,
                     "actors": args.actors, "task": overrides.get("task", DEFAULTS["task"]),
                     "method": overrides.get("method", DEFAULTS["method"]),
                     "command": "python -m benchmarks.bench_fleet_sim"},
           "wall_s": round(wall, 1), "memory": memory, "max_actor_processes_seen": sampler.max_actors,
           "final_acc": summary.get("final_acc"), "rounds_done": summary.get("rounds"),
           "upload_bytes_per_client_round": summary.get("upload_bytes_per_client_round"),
           "download_bytes_per_client_round": summary.get("download_bytes_per_client_round"),
           "replies_per_round": [r.get("replies") for r in hist if isinstance(r, dict)],
           "accounting": "RSS/USS of this process (server) and of every descendant, sampled every "
                         f"{args.interval} s; USS excludes shared pages (torch libraries)"}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2))
    print(json.dumps(doc, indent=2))
    return doc


if __name__ == "__main__":
    main()
