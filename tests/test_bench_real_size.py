"""benchmarks/bench_real_size --quick: two timm models (a CNN and a ViT whose weights were saved at another image
size) on a generated ImageFolder through Flower's simulation runtime, for taskedge and fedlora."""
import json

import pytest


@pytest.mark.slow
def test_quick_runs_every_model_and_method_and_counts_real_bytes(tmp_path):
    from benchmarks.bench_real_size import main

    doc = main(["--quick", "--out", str(tmp_path)])
    runs = {(r["model"], r["method"]): r for r in doc["runs"]}
    assert set(runs) == {(m, k) for m in ("resnet10t", "vit_tiny_patch16_224") for k in ("taskedge", "fedlora")}
    for r in runs.values():
        assert r["status"] == "complete" and r["rounds"] == 1
        assert r["up_bytes_per_client_round"] >= 4 * r["trainable_entries"]  # float32 values of every trained entry
        assert r["client_peak_rss_mib"] and r["server_peak_rss_mib"]
    assert json.loads((tmp_path / "bench_real_size_quick.json").read_text())["runs"] == doc["runs"]
