"""benchmarks/bench_value_dtype.py --quick end to end: every method x dtype runs, int8 uploads ~4x fewer bytes
than float32 and float16 ~2x, accuracies stay close, and the JSON it writes holds what it printed."""
import json

import pytest


@pytest.mark.slow
def test_bench_value_dtype_quick(weights, tmp_path):
    from benchmarks.bench_value_dtype import main

    doc = main(["--quick", "--weights", weights, "--out", str(tmp_path)])
    assert not doc["failed"] and (doc["setup"]["rounds"], doc["setup"]["seeds"]) == (2, [0])
    rows = {(r["method"], r["value_dtype"]): r for r in doc["summary"]}
    assert set(rows) == {(m, d) for m in ("taskedge", "fedlora") for d in ("float32", "float16", "int8")}
    for m in ("taskedge", "fedlora"):
        assert rows[(m, "float32")]["upload_ratio_vs_float32"] == 1.0
        assert 1.7 <= rows[(m, "float16")]["upload_ratio_vs_float32"] <= 2.0
        assert 2.8 <= rows[(m, "int8")]["upload_ratio_vs_float32"] <= 4.0
        for d in ("float16", "int8"):
            assert abs(rows[(m, d)]["acc_diff_vs_float32_mean"]) <= 0.1
    saved = json.loads((tmp_path / "bench_value_dtype_quick.json").read_text())
    assert saved["summary"] == doc["summary"] and saved["table"] == doc["table"]
