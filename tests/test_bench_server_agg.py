"""benchmarks/bench_server_agg --quick: runs the real guard + clipping + FedAvg path next to the numpy sum and
writes well-formed JSON (tiny sizes; nothing here asserts on speed)."""
import json


def test_quick_mode_writes_valid_json(tmp_path):
    from benchmarks.bench_server_agg import main

    out = tmp_path / "agg.json"
    doc = main(["--quick", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(doc))
    assert doc["settings"]["quick"] is True and doc["path"].startswith("ReplyGuard")
    rows = doc["measured"]
    assert [(r["replies"], r["entries_per_reply"]) for r in rows] == [(3, 64), (10, 64)]
    for r in rows:
        for key in ("project_path_s", "numpy_sum_s"):
            t = r[key]
            assert 0 < t["min"] <= t["median"] <= t["max"]
        assert r["project_entries_per_s"] > 0 and r["numpy_entries_per_s"] > 0 and r["ratio"] > 0
        assert r["replies_payload_mib"] > 0 and r["aggregation_peak_mib"] >= 0
