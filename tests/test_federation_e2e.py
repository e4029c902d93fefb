"""End to end on Flower's simulation runtime (Ray): the embedded default, 3 clients, 3 rounds.

Slow (about a minute on 2 cores; the first run ever also pre-trains the embedded backbone
into the cache, a few minutes). Run with `pytest -m slow tests/test_federation_e2e.py`.
"""
import csv
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_run_simulation_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's AF_UNIX socket paths must stay < 108 bytes
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    from flwr.simulation import run_simulation

    import common.settings as settings
    import server.server_app as server_app
    from client.client_app import app as client_app

    # run_simulation gives the apps an empty run config: the server's defaults rule (and are
    # sent to the clients in every message).
    for key, value in {"num-server-rounds": 3, "output-dir": str(tmp_path / "runs"), "server-test-size": 500,
                       "min-nodes": 3, "local-epochs": 1}.items():
        monkeypatch.setitem(settings.DEFAULTS, key, value)
    run_simulation(server_app=server_app.app, client_app=client_app, num_supernodes=3,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "num_gpus": 0, "include_dashboard": False,
                                                 "logging_level": "WARNING"}})
    shutil.rmtree(ray_tmp, ignore_errors=True)
    summary = server_app.LAST["summary"]
    run = Path(server_app.LAST["run_dir"])
    doc = json.loads((run / "results.json").read_text())
    rounds = doc["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    assert rounds[-1]["central_acc"] > rounds[0]["central_acc"]
    assert summary["final_acc"] == rounds[-1]["central_acc"] and summary["rounds"] == 3
    assert all(r["replies"] == 3 and not r["skipped"] for r in rounds[1:])
    assert 1.0 <= summary["bound_ratio"] < 1.05
    with open(run / "rounds.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["round"]) for r in rows] == [0, 1, 2, 3] and float(rows[-1]["bytes_up"]) > 0
    assert (run / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    from safetensors import safe_open

    with safe_open(str(run / "checkpoint.safetensors"), framework="numpy") as f:
        assert f.metadata()["round"] == "3"
    with safe_open(str(run / "final_model.safetensors"), framework="numpy") as f:
        assert "head.weight" in f.keys()
