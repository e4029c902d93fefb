"""The fleet benchmark's CI variant: `python -m benchmarks.bench_fleet_deploy --quick` (4 SuperNodes with TLS and
node auth behind the Fleet gateway, one SuperLink, 3 rounds; 1 SuperNode SIGKILLed mid-round in round 2 and
restarted for round 3), checked from its JSON. ~4 min on a 2-core machine (round 2 waits for the SuperLink to
declare the killed node offline: up to 60 s of missed heartbeats in flwr 1.42)."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from benchmarks.local_deployment import REPO, marked


@pytest.mark.slow
def test_quick_fleet_loses_and_regains_the_killed_node(tmp_path):
    out, work = tmp_path / "fleet.json", tmp_path / "work"
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "benchmarks.bench_fleet_deploy", "--quick", "--json", str(out),
                          "--workdir", str(work)], cwd=REPO, capture_output=True, text=True, timeout=1200)
    took = time.monotonic() - t0
    assert not marked(str(work)), "a process the benchmark started is still running"
    doc = json.loads(out.read_text())
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:] + json.dumps(doc.get("checks"))
    n, killed = doc["nodes"], doc["killed_node_ids"]
    assert n == 4 and len(killed) == 1 and doc["completed"] and doc["status"] == "finished:completed", doc["error"]
    trained = {r["round"]: r for r in doc["per_round"] if "sent" in r}
    assert sorted(trained) == [1, 2, 3]
    assert [trained[r]["replies"] for r in (1, 2, 3)] == [n, n - 1, n]
    assert trained[1]["failed_node_ids"] == [] and trained[3]["failed_node_ids"] == []
    assert trained[2]["failed_node_ids"] == killed  # exactly the killed node is named as lost in round 2
    assert trained[2]["failed_partitions"] == doc["killed_partitions"]
    assert any("Node Unavailable" in why or "no reply" in why for why in trained[2]["drop_reasons"])
    assert trained[3]["sent"] == n  # the restarted node (same key, same node id) is sampled and replies again
    assert doc["processes_left"] == [] and doc["processes_started"] == n + 3 + len(killed)  # link, gateway, nodes, run, restarts
    assert doc["memory_peak_mib"]["superlink"] > 0 and doc["memory_peak_mib"]["serverapp"] > 0
    print(f"\n[fleet] quick: {took:.0f} s; round times {[trained[r]['round_time_s'] for r in (1, 2, 3)]} s; "
          f"SuperLink peak RSS {doc['memory_peak_mib']['superlink']} MiB (ServerApp {doc['memory_peak_mib']['serverapp']})")
