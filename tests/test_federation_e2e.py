"""End to end on Flower's simulation runtime (Ray): the embedded default, 3 clients, 3 rounds.

Slow (about a minute on 2 cores; the first run ever also pre-trains the embedded backbone
into the cache, a few minutes). Run with `pytest -m slow tests/test_federation_e2e.py`.
"""
import csv
import json
from pathlib import Path

import pytest



@pytest.mark.slow
def test_run_simulation_end_to_end(tmp_path, simulate):
    last = simulate({"num-server-rounds": 3, "output-dir": str(tmp_path / "runs"), "server-test-size": 500,
                       "min-nodes": 3, "local-epochs": 1})
    summary = last["summary"]
    run = Path(last["run_dir"])
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


@pytest.mark.slow
def test_fleet_simulation_benchmark_measures_memory_per_role(tmp_path):
    """benchmarks/bench_fleet_sim at a small size: the run completes with the sampled fraction of nodes
    replying, memory is read for the server and the Ray actors, and the server's defaults are restored."""
    import common.settings as settings
    from benchmarks.bench_fleet_sim import main

    before = dict(settings.DEFAULTS)
    doc = main(["--nodes", "6", "--fraction", "0.5", "--rounds", "2", "--server-test-size", "50",
                "--setup-fraction", "0.5", "--examples-per-node", "12", "--json", str(tmp_path / "f.json")])
    assert settings.DEFAULTS == before
    assert doc["rounds"] == 2 and doc["final_acc"] is not None and doc["replies_per_round"] == [3, 3]
    assert doc["client_rounds"] == 6 and abs(doc["client_rounds_per_hour"] / (6 / doc["wall_s"] * 3600) - 1) < 0.02
    assert doc["calls_by_type"]["query.stats"]["calls"] == 3  # the setup cohort: half of the 6 nodes
    assert doc["calls_by_type"]["train"]["calls"] == 6 and len(doc["per_round"]) == 2
    assert 0 < doc["memory_per_idle_client"]["state_bytes_max"] < 64 * 1024
    assert doc["server_memory_mib"]["rss_mib_max_per_process"] > 0
    assert doc["max_actor_processes_seen"] >= 1 and doc["memory_per_active_worker_mib"]["uss_mib_max_per_process"] > 0
