"""Run the project's ServerApp and ClientApp on Flower's Ray simulation, in this process.

`flwr.simulation.run_simulation` passes no run config, so the caller's run config goes to the ServerApp
(`server.server_app.create_app`), which sends it to the nodes in every message; the result is read from
`server.server_app.LAST`. Shared by the tests' `simulate` fixture and
`benchmarks/bench_fleet_sim.py`, so both start Ray the same way (1 CPU per actor, no dashboard, a
short private temp dir, the checkout importable by the actors) and clean up after it.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_ray_simulation(num_supernodes: int, num_cpus: int = 2, run_config: dict | None = None) -> None:
    """`run_simulation` of the real apps; environment and Ray's temp dir restored / removed afterwards."""
    from flwr.simulation import run_simulation

    from client.client_app import app as client_app
    from server import server_app

    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's AF_UNIX socket paths must stay < 108 bytes
    env = {"HF_HUB_OFFLINE": "1", "RAY_TMPDIR": ray_tmp,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        run_simulation(server_app=server_app.create_app(run_config), client_app=client_app, num_supernodes=num_supernodes,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                       "init_args": {"num_cpus": num_cpus, "num_gpus": 0, "include_dashboard": False,
                                                     "logging_level": "WARNING"}})
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(ray_tmp, ignore_errors=True)
