"""A fleet through the Deployment Engine: N SuperNodes (TLS + node auth) on loopback against one SuperLink,
a share of them SIGKILLed mid-round in round 2 and restarted for round 3; SuperLink memory and round times.

    python -m benchmarks.bench_fleet_deploy                  # 20 nodes, 30 % (6) killed, 3 rounds
    python -m benchmarks.bench_fleet_deploy --quick          # 4 nodes, 1 killed (CI: tests/test_fleet_deploy.py)

What it starts (benchmarks/local_deployment.py, as docs/deployment.md): certificates and N node keys, a
`flower-superlink` with TLS and `--enable-supernode-auth` on 127.0.0.1 (state in memory by default: with
`--database state.db`, flwr 1.42's SQLite state lost replies at 20 nodes, see `--database`), the Fleet gateway, N registered
`flower-supernode`s (node config `partition-id=i num-partitions=N`), and one run, `flwr run . --stream`, of the
embedded default (IID partitions, 1 local epoch, calib-size 16, server-test-size 100). Then:

1. once every victim's SuperNode has received its round-2 training message (its log), the victims' process
   trees (SuperNode, SuperExec, ClientApp) are SIGKILLed together, mid-round;
2. the SuperLink answers for them once they miss their heartbeats (flwr 1.42: <= 60 s, not configurable),
   the ServerApp drops their replies naming the nodes; as soon as every victim is named (streamed log) or
   round 2 closed, the victims are restarted with the same keys (same node ids). A restarted SuperNode can
   only activate once the SuperLink holds it offline, so it cannot come back earlier. Federated evaluation of
   round 2 (fraction-evaluate) is the window in which they reconnect before round 3 samples the nodes;
3. the run must complete; results.json must name exactly the victims among round 2's failures, and round 3
   must have every node's reply again.

A sampler thread reads, every `--interval` s, the resident memory (psutil RSS) of the SuperLink process
itself, of its SuperExec child and of the ServerApp (a child of the SuperExec: counted apart), of the gateway,
and of all SuperNode trees together (their ClientApps included), plus the machine's available memory.

Everything it starts is stopped in a `finally` (also on Ctrl-C, SIGTERM, SIGHUP, and on failure), by PID and
process tree plus an environment marker, never by name; the JSON says what was left (nothing). It writes
results/bench_fleet_deploy.json (`--quick`: results/bench_fleet_deploy_quick.json) or `--json PATH`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import shlex
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.local_deployment import REPO, Deployment, raise_on_signals, sigkill_tree, tree
from benchmarks.local_deployment import wait_for as _wait_for

TRAIN_RECEIVED = "Receiving: train message"


def _role(cmd: str) -> str:
    if "flwr-serverapp" in cmd:
        return "serverapp"
    if "flower-superexec" in cmd:
        return "superexec"
    if "flower-superlink" in cmd:
        return "superlink"
    return "other"


class Watcher(threading.Thread):
    """Every `interval` s: RSS per role of the SuperLink tree, the gateway and the SuperNode trees; the
    machine's available memory; when each round first appears closed in the run folder's results.json."""

    def __init__(self, dep: Deployment, out: Path, interval: float, min_available_gib: float = 0.0):
        super().__init__(daemon=True)
        import psutil

        self.floor, self.low = min_available_gib, ""  # set when the machine runs short: the run is stopped

        self.psutil, self.dep, self.out, self.interval = psutil, dep, out, interval
        self.t0 = time.monotonic()
        self.peak: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.min_available = float("inf")
        self.closed: dict[int, float] = {}  # round -> seconds since start when results.json first had it
        self.samples = 0
        self.halt = threading.Event()

    def run_dir(self) -> Path | None:
        runs = sorted(p for p in self.out.iterdir() if p.is_dir()) if self.out.is_dir() else []
        return runs[-1] if runs else None

    def _rss(self, pids) -> dict[str, int]:
        out: dict[str, int] = {}
        for pid in pids:
            try:
                p = self.psutil.Process(pid)
                role = _role(" ".join(p.cmdline()))
                out[role] = out.get(role, 0) + p.memory_info().rss
            except (self.psutil.Error, OSError):
                pass
        return out

    def sample(self) -> None:
        dep, mib = self.dep, 1 / 2 ** 20
        now: dict[str, float] = {}
        link = dep.procs.get("superlink")
        if link is not None and link.poll() is None:
            roles = self._rss(tree([link.pid]))
            for role in ("superlink", "superexec", "serverapp"):
                now[role] = roles.get(role, 0) * mib
            now["superlink+superexec"] = now["superlink"] + now["superexec"]
            now["superlink_tree"] = sum(roles.values()) * mib
        gw = dep.procs.get("gateway")
        if gw is not None and gw.poll() is None:
            now["gateway"] = sum(self._rss(tree([gw.pid])).values()) * mib
        nodes = [p.pid for name, p in dep.procs.items() if name.startswith("supernode") and p.poll() is None]
        now["supernodes_all"] = sum(self._rss(tree(nodes)).values()) * mib
        for k, v in now.items():
            self.peak[k] = max(self.peak.get(k, 0.0), v)
        self.last = now
        avail = self.psutil.virtual_memory().available / 2 ** 30
        self.min_available = min(self.min_available, avail)
        if avail < self.floor and not self.low:
            self.low = f"available memory {avail:.1f} GiB < --min-available-gib {self.floor}: stopped"
        self.samples += 1
        rd = self.run_dir()
        if rd is not None and (rd / "results.json").is_file():
            try:
                doc = json.loads((rd / "results.json").read_text())
            except (OSError, ValueError):
                return
            for r in doc.get("rounds", []):
                self.closed.setdefault(int(r["round"]), round(time.monotonic() - self.t0, 1))

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                self.sample()
            except Exception:  # noqa: BLE001 - a process can vanish between listing and reading
                pass
            self.halt.wait(self.interval)

    def stop(self) -> None:
        self.halt.set()
        self.join(10)


def _count(path: Path, needle: str) -> int:
    try:
        return path.read_text(errors="replace").count(needle)
    except OSError:
        return 0


def _nodes_named(reasons: list[str]) -> dict[int, str]:
    out = {}
    for why in reasons or []:
        m = re.match(r"node (\d+): (.*)", why)
        if m:
            out[int(m.group(1))] = m.group(2)
    return out


def run_config(n: int, rounds: int, out: Path, round_timeout: float, fraction_evaluate: float) -> str:
    return (f"num-server-rounds={rounds} min-nodes={n} local-epochs=1 calib-size=16 server-test-size=100 "
            f"partitioner='iid' fraction-evaluate={fraction_evaluate} round-timeout={round_timeout} "
            f"client-threads=1 output-dir='{out}'")


def bench(args, root: Path, command: str) -> dict:
    n, k = args.nodes, args.kill
    victims = sorted(random.Random(args.seed).sample(range(n), k))
    out = root / "out"
    dep = Deployment(root, n, database=args.database == "file")
    doc: dict = {"command": command, "nodes": n, "rounds": args.rounds, "killed_partitions": victims,
                 "kill_fraction": k / n, "round_timeout_s": args.round_timeout,
                 "fraction_evaluate": args.fraction_evaluate, "superlink_database": args.database,
                 "run_config": run_config(n, args.rounds, Path("<tmp>/out"), args.round_timeout, args.fraction_evaluate),
                 "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                             "mem_total_gib": None, "flwr": None},
                 "completed": False, "error": None, "timeline_s": {}}
    try:
        import flwr
        import psutil

        doc["machine"].update(flwr=flwr.__version__, mem_total_gib=round(psutil.virtual_memory().total / 2 ** 30, 1))
    except Exception:  # noqa: BLE001
        pass
    tl = doc["timeline_s"]
    watcher = Watcher(dep, out, args.interval, args.min_available_gib)

    def wait_for(pred, timeout, what, every=1.0):  # local_deployment.wait_for, stopped when memory runs short
        def checked():
            if watcher.low:
                raise MemoryError(watcher.low)
            return pred()

        return _wait_for(checked, timeout, what, every)
    t0 = time.monotonic()
    since = lambda: round(time.monotonic() - t0, 1)  # noqa: E731
    deadline = t0 + args.timeout
    left = lambda: max(1.0, deadline - time.monotonic())  # noqa: E731
    proc = None
    try:
        with raise_on_signals():
            watcher.start()
            dep.up(online_timeout=min(left(), 120 + 10 * n))
            tl["fleet_online"] = since()
            doc["node_ids"] = {str(i): dep.node_ids[i] for i in range(n)}
            doc["killed_node_ids"] = [dep.node_ids[v] for v in victims]
            proc = dep.submit("run", run_config(n, args.rounds, out, args.round_timeout, args.fraction_evaluate))
            tl["submitted"] = since()
            run_id = dep.run_id("run", timeout=min(left(), 300))
            doc["run_id"] = run_id

            def victims_got_round_2():  # round 1 and round 2: two training messages each
                if proc.poll() is not None:
                    raise RuntimeError(f"the run's stream ended before round 2: {dep.log('run').read_text()[-3000:]}")
                return all(_count(dep.log(f"supernode{v}"), TRAIN_RECEIVED) >= 2 for v in victims)

            wait_for(victims_got_round_2, left(), "the victims' round-2 training messages", every=0.2)
            tl["round_2_received_by_victims"] = since()
            for v in victims:  # all at once, then reap: the same instant for every victim
                sigkill_tree(dep.procs[f"supernode{v}"].pid)
            for v in victims:
                dep.procs[f"supernode{v}"].wait(30)
            tl["killed"] = since()
            rd = wait_for(watcher.run_dir, left(), "the run folder", every=0.5)
            doc["round_2_closed_before_kill"] = 2 in watcher.closed
            ids = doc["killed_node_ids"]

            def dropped_or_closed():
                text = dep.log("run").read_text(errors="replace")
                named = all(f"Round 2: dropped reply of node {nid}" in text for nid in ids)
                return named or 2 in watcher.closed

            wait_for(dropped_or_closed, left(), "round 2 to drop the killed nodes", every=0.2)
            tl["drop_seen"] = since()
            for v in victims:
                dep.start_supernode(v)  # same key (same node id), port and node config
            tl["restarted"] = since()
            doc["restarted_after_round_2_closed"] = 2 in watcher.closed
            try:
                dep.wait_online(victims, timeout=min(left(), 180))
                tl["restarted_online"] = since()
            except AssertionError as exc:
                doc["error"] = f"restarted nodes not online: {exc}"
            wait_for(lambda: proc.poll() is not None, left(), "the run's stream to end", every=1)
            tl["stream_ended"] = since()
            doc["status"] = dep.wait_finished(run_id, timeout=min(left(), 120))
            tl["finished"] = since()
            doc["completed"] = doc["status"] == "finished:completed"
            _read_results(doc, rd, dep, victims)
    except (Exception, KeyboardInterrupt) as exc:  # recorded, then everything is stopped
        doc["error"] = f"{type(exc).__name__}: {exc}"[:4000]
        rd = watcher.run_dir()
        if rd is not None and (rd / "results.json").is_file():
            _read_results(doc, rd, dep, victims)
    finally:
        watcher.stop()
        left_over = dep.stop()
        doc["processes_started"] = len(dep.started)
        doc["processes_left"] = left_over
        doc["wall_s"] = since()
    mem = {k: round(v, 1) for k, v in sorted(watcher.peak.items())}
    doc["memory_peak_mib"] = mem
    doc["memory_note"] = ("psutil RSS, sampled every %.1f s; superlink = the flower-superlink process alone, "
                          "superexec = its flower-superexec child, serverapp = the flwr-serverapp run process (a "
                          "child of the SuperExec), superlink_tree = all three at one instant; supernodes_all = every "
                          "SuperNode tree (SuperNode, SuperExec, ClientApps) at one instant" % args.interval)
    doc["min_available_gib"] = round(watcher.min_available, 2) if watcher.samples else None
    doc["memory_samples"] = watcher.samples
    doc["round_closed_at_s"] = {str(r): t for r, t in sorted(watcher.closed.items())}
    if 0 in watcher.closed and "submitted" in tl:  # classes, statistics and mask phases
        doc["before_training_s"] = round(watcher.closed[0] - tl["submitted"], 1)
    doc["logs_tail"] = {"run": _tail(dep.log("run"))} if doc["error"] or not doc["completed"] else {}
    doc["checks"] = _checks(doc, n, k)
    return doc


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def _read_results(doc: dict, rd: Path, dep: Deployment, victims: list[int]) -> None:
    res = json.loads((rd / "results.json").read_text())
    part = {nid: i for i, nid in dep.node_ids.items()}
    rounds = []
    for r in res["rounds"]:
        if "sent" not in r:
            rounds.append({"round": r["round"], "phase": "statistics + mask (before training)",
                           "round_time_s": round(r["round_time_s"], 1), "dropped": r.get("dropped", 0)})
            continue
        named = _nodes_named(r.get("drop_reasons", []))
        rounds.append({"round": r["round"], "sent": r["sent"], "replies": r["replies"], "dropped": r["dropped"],
                       "failed_node_ids": sorted(named), "failed_partitions": sorted(part.get(x, -1) for x in named),
                       "drop_reasons": r.get("drop_reasons", []), "central_acc": r.get("central_acc"),
                       "round_time_s": round(r["round_time_s"], 1), "wall_time_s": round(r["wall_time_s"], 1)})
    doc["results_status"] = res.get("status")
    doc["per_round"] = rounds
    text = dep.log("run").read_text(errors="replace")
    doc["server_said"] = re.findall(r"Round \d+: going on with [^\n]*", text)


def _checks(doc: dict, n: int, k: int) -> dict:
    trained = {r["round"]: r for r in doc.get("per_round", []) if "sent" in r}
    killed = sorted(doc.get("killed_node_ids", []))
    r2, r3 = trained.get(2, {}), trained.get(3, {})
    return {
        "completed": bool(doc.get("completed")),
        "lost_in_round_2_are_the_killed": r2.get("failed_node_ids") == killed and bool(killed),
        "killed_reply_in_round_3": bool(r3) and not r3.get("failed_node_ids") and r3.get("replies") == n,
        "replies_per_round": [trained[r]["replies"] for r in sorted(trained)],
        "replies_expected": [n, n - k, n][: len(trained)] + [n] * max(0, len(trained) - 3),
        "nothing_left": not doc.get("processes_left"),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=20)
    ap.add_argument("--kill-fraction", type=float, default=0.3, help="share of the nodes killed in round 2 (rounded up)")
    ap.add_argument("--kill", type=int, default=None, help="number of nodes killed (instead of --kill-fraction)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="4 nodes, 1 killed (CI)")
    ap.add_argument("--round-timeout", type=float, default=600.0,
                    help="run config round-timeout: the SuperLink answers for a dead node within 60 s anyway")
    ap.add_argument("--fraction-evaluate", type=float, default=None,
                    help="federated evaluation share (round 2's is when the restarted nodes reconnect); "
                         "default 1.0 up to 8 nodes, else 0.25")
    ap.add_argument("--min-available-gib", type=float, default=1.5,
                    help="stop the run (and record why) when the machine's available memory falls below this")
    ap.add_argument("--database", choices=["memory", "file"], default="memory",
                    help="the SuperLink's state: in memory (no --database), or file = --database state.db as in "
                         "docs/deployment.md (at 20 nodes on 2 busy cores flwr 1.42's SQLite state answered 7 of 20 "
                         "concurrent reply pushes with 'database is locked' (HTTP 500), and those replies were lost)")
    ap.add_argument("--interval", type=float, default=0.5, help="memory sampling period, s")
    ap.add_argument("--timeout", type=float, default=None, help="overall limit, s (default 900 quick, 3600 full)")
    ap.add_argument("--seed", type=int, default=0, help="which partitions are killed")
    ap.add_argument("--workdir", default=None, help="keep certificates, logs and the run folder here (default: a "
                                                    "temporary folder, removed)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.nodes, args.kill = 4, 1 if args.kill is None else args.kill
    if args.kill is None:
        args.kill = math.ceil(args.nodes * args.kill_fraction - 1e-9)
    if not 0 < args.kill < args.nodes or args.rounds < 3:
        ap.error("need 0 < killed < nodes and rounds >= 3")
    if args.fraction_evaluate is None:
        args.fraction_evaluate = 1.0 if args.nodes <= 8 else 0.25
    args.timeout = args.timeout or (900 if args.quick else 3600)
    command = " ".join(["python -m benchmarks.bench_fleet_deploy",
                        *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    root = Path(args.workdir).resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="fleet-deploy-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        doc = bench(args, root, command)
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    path = Path(args.json) if args.json else REPO / "results" / (
        "bench_fleet_deploy_quick.json" if args.quick else "bench_fleet_deploy.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    c = doc["checks"]
    print(f"[fleet] {doc['nodes']} nodes, killed partitions {doc['killed_partitions']} (node ids "
          f"{doc.get('killed_node_ids')}); status {doc.get('status')}; replies per round {c['replies_per_round']} "
          f"(expected {c['replies_expected']})")
    print(f"[fleet]   before training (classes, statistics, mask phases): {doc.get('before_training_s')} s")
    for r in (r for r in doc.get("per_round", []) if "sent" in r):
        print(f"[fleet]   round {r['round']}: {r['round_time_s']} s, {r['replies']}/{r['sent']} replies, "
              f"failed nodes {r['failed_node_ids']}")
    print(f"[fleet] peak RSS MiB: {doc['memory_peak_mib']}; wall {doc['wall_s']} s; error: {doc['error']}")
    print(f"[fleet] processes started {doc['processes_started']}, left: {doc['processes_left'] or 'none'} -> {path}")
    return doc


if __name__ == "__main__":
    d = main()
    ok = d["checks"]
    sys.exit(0 if ok["completed"] and ok["lost_in_round_2_are_the_killed"] and ok["killed_reply_in_round_3"]
         and ok["replies_per_round"] == ok["replies_expected"] and ok["nothing_left"] else 1)
