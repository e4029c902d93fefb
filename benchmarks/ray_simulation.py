"""Run the project's ServerApp and ClientApp on Flower's Ray simulation, in this process.

`flwr.simulation.run_simulation` passes no run config, so the caller's run config goes to the ServerApp
(`server.server_app.create_app`), which sends it to the nodes in every message; the result is read from
`server.server_app.LAST`. Shared by the tests' `simulate` fixture and
`benchmarks/bench_fleet_sim.py`, so both start Ray the same way (1 CPU per actor, no dashboard, a
short private temp dir, the checkout importable by the actors) and clean up after it.

Attaching to a running Ray cluster instead of starting a private one: pass `address` (what `ray start
--head` printed, e.g. "10.0.0.5:6379", or "auto"); Flower hands `init_args` to `ray.init`, so the
ClientApp actors are spread over every node of that cluster (1 CPU each) and Ray is neither started nor
stopped here. `ray.init` refuses `num_cpus`/`num_gpus` when attaching (the cluster's nodes declared
theirs in `ray start`), so they are left out. `trace_dir` wraps the ClientApp so that every message it
handles appends one JSON line (Ray node id, pid, message type, partition, server round, start time, seconds
in the handler, bytes of the node's state after it) to `trace_dir/<pid>.jsonl`: where the ClientApps actually
ran, and how long they took.

    python -m benchmarks.ray_simulation --address 127.0.0.1:6379 --supernodes 2 \
        --run-config '{"num-server-rounds": 1}' --trace-dir /tmp/trace
prints one JSON object: the cluster's alive Ray nodes, the traced ClientApp calls, the final summary.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

from flwr.clientapp import ClientApp

ROOT = Path(__file__).resolve().parents[1]


class NodeTracedClientApp(ClientApp):
    """The project's ClientApp, unchanged, plus one trace line per handled message (which Ray node ran it)."""

    def __init__(self, inner: ClientApp, trace_dir: str) -> None:
        super().__init__()
        self.inner = inner
        self.trace_dir = trace_dir

    def __call__(self, message, context):  # noqa: D102 (ClientApp's)
        import time

        import ray

        from server.messages import content_bytes

        start, t0 = time.time(), time.perf_counter()
        out = self.inner(message, context)
        handler_s = time.perf_counter() - t0
        conf = message.content.get("config")
        rec = {"ray_node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
               "message_type": message.metadata.message_type,
               "partition_id": context.node_config.get("partition-id"), "error": out.has_error(),
               "server_round": int(conf["server-round"]) if conf is not None and "server-round" in conf else None,
               "start": start, "handler_s": handler_s, "state_bytes": content_bytes(context.state)}
        with open(os.path.join(self.trace_dir, f"{os.getpid()}.jsonl"), "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        return out


def read_trace(trace_dir: str | Path) -> list[dict]:
    """Every line NodeTracedClientApp wrote under trace_dir."""
    return [json.loads(line) for f in sorted(Path(trace_dir).glob("*.jsonl"))
            for line in f.read_text().splitlines() if line.strip()]


def run_ray_simulation(num_supernodes: int, num_cpus: int = 2, run_config: dict | None = None,
                       address: str | None = None, trace_dir: str | None = None) -> None:
    """`run_simulation` of the real apps; environment and Ray's temp dir restored / removed afterwards.

    address: attach to that running Ray cluster (num_cpus is then the cluster's business, not ours)."""
    from flwr.simulation import run_simulation

    from client.client_app import app as client_app
    from server import server_app

    if trace_dir is not None:
        client_app = NodeTracedClientApp(client_app, trace_dir)
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's AF_UNIX socket paths must stay < 108 bytes
    env = {"HF_HUB_OFFLINE": "1", "RAY_TMPDIR": ray_tmp,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    init_args = {"include_dashboard": False, "logging_level": "WARNING"}
    if address:
        init_args["address"] = address
    else:
        init_args.update(num_cpus=num_cpus, num_gpus=0)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        run_simulation(server_app=server_app.create_app(run_config), client_app=client_app, num_supernodes=num_supernodes,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                       "init_args": init_args})
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(ray_tmp, ignore_errors=True)


def wait_for_nodes(address: str, n: int, timeout_s: float) -> None:
    """Block until the Ray cluster at `address` has n alive nodes (then disconnect, so Flower connects anew)."""
    import time

    import ray

    ray.init(address=address, logging_level="WARNING")
    try:
        deadline = time.time() + timeout_s
        while (alive := sum(node["Alive"] for node in ray.nodes())) < n:
            if time.time() > deadline:
                raise TimeoutError(f"Ray cluster {address}: {alive} of {n} nodes alive after {timeout_s:.0f} s")
            time.sleep(0.5)
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--address", default=None, help="running Ray cluster to attach to (host:port or 'auto')")
    ap.add_argument("--supernodes", type=int, default=2)
    ap.add_argument("--num-cpus", type=int, default=2, help="private Ray only: CPUs it may use")
    ap.add_argument("--run-config", default="{}", help="run-config overrides, JSON")
    ap.add_argument("--trace-dir", default=None, help="record where each ClientApp call ran")
    ap.add_argument("--wait-nodes", type=int, default=0,
                    help="with --address: first wait (up to --wait-s) until the cluster has this many alive nodes; "
                         "Flower sizes its actor pool from the cluster's CPUs when the run starts")
    ap.add_argument("--wait-s", type=float, default=120.0)
    args = ap.parse_args(argv)
    if args.address and args.wait_nodes:
        wait_for_nodes(args.address, args.wait_nodes, args.wait_s)
    if args.trace_dir:
        os.makedirs(args.trace_dir, exist_ok=True)
    run_ray_simulation(args.supernodes, num_cpus=args.num_cpus, run_config=json.loads(args.run_config),
                       address=args.address, trace_dir=args.trace_dir)
    import ray

    from server import server_app

    nodes = []
    if args.address:  # the cluster outlives the run: list its nodes (Flower leaves the driver connected or not)
        if not ray.is_initialized():
            ray.init(address=args.address, logging_level="WARNING")
        nodes = [{"node_id": n["NodeID"], "alive": n["Alive"], "cpus": n["Resources"].get("CPU", 0),
                  "head": "node:__internal_head__" in n["Resources"]} for n in ray.nodes()]
    if ray.is_initialized():
        ray.shutdown()
    summary = (server_app.LAST or {}).get("summary") or {}
    doc = {"ray_nodes": nodes, "trace": read_trace(args.trace_dir) if args.trace_dir else [],
           "summary": {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool, type(None)))}}
    print(json.dumps(doc))
    return doc


if __name__ == "__main__":
    main()
