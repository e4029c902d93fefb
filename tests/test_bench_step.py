"""simulations/bench_step.py runs end to end on tiny models and emits the documented schema.

Tiny models, one timed step, one thread (a loaded 2-core box stalls multi-threaded tiny ops).
"""
import json

import pytest

from simulations import bench_step

METHOD_KEYS = {"step_s", "peak_mb", "peak_rss_mb", "step_ratio", "mem_ratio", "trainable"}
FAST = ["--steps", "1", "--warmup", "1", "--calib-repeats", "1", "--threads", "1", "--batch", "2"]


def _check_schema(res, model, importance=True):
    """The documented schema; importance_pass is present exactly when it was not switched off."""
    assert res["model"] == model and res["batch"] == 2
    assert set(res["methods"]) == {"floor", "taskedge", "lora", "full"}
    for name, m in res["methods"].items():
        assert set(m) == METHOD_KEYS, name
        assert m["step_s"] > 0 and m["peak_mb"] > 0 and m["peak_rss_mb"] > 0
    fl = res["methods"]["floor"]
    assert fl["step_ratio"] == pytest.approx(1.0) and fl["mem_ratio"] == pytest.approx(1.0)
    assert fl["trainable"] == 0
    te, lora, full = (res["methods"][k] for k in ("taskedge", "lora", "full"))
    assert 0 < te["trainable"] < lora["trainable"] < full["trainable"]
    # full fine-tuning keeps gradients + AdamW state of every weight: strictly the most memory
    assert full["peak_mb"] > max(te["peak_mb"], lora["peak_mb"])
    for m in res["methods"].values():
        assert m["mem_ratio"] == pytest.approx(m["peak_mb"] / fl["peak_mb"])
        assert m["step_ratio"] == pytest.approx(m["step_s"] / fl["step_s"])
    if not importance:
        assert "importance_pass" not in res
        return
    imp = res["importance_pass"]
    assert set(imp) == {"stats_s", "forward_s", "ratio"}
    assert imp["stats_s"] > 0 and imp["forward_s"] > 0
    assert imp["ratio"] == pytest.approx(imp["stats_s"] / imp["forward_s"])


def test_vit_schema_and_json_file(tmp_path, capsys):
    out = tmp_path / "bench.json"
    res = bench_step.main(["--model", "vit_tiny_patch16_224", "--model-kwargs", '{"depth": 2}', "--img-size", "32",
                           "--save-dtype", "bfloat16", "--json", str(out), *FAST])
    _check_schema(res, "vit_tiny_patch16_224")
    written = json.loads(out.read_text())
    assert written == json.loads(capsys.readouterr().out)  # stdout is the same JSON document
    assert written["methods"] == json.loads(json.dumps(res["methods"]))
    assert written["settings"]["save_dtype"] == "bfloat16"


def test_cnn_with_depthwise_convs():
    """Conv2d incl. depthwise (sparse value gradients); LoRA skips the depthwise convs peft rejects."""
    res = bench_step.main(["--model", "mobilenetv3_small_050", "--img-size", "32", "--conv-grad", "sparse",
                           "--no-importance", *FAST])
    _check_schema(res, "mobilenetv3_small_050", importance=False)


def test_conv_micro(monkeypatch):
    monkeypatch.setattr(bench_step, "CONV_SHAPES", [(2, 8, 8, 3, 1), (2, 8, 8, 5, 2)])
    res = bench_step.main(["--conv-micro", "--steps", "2", "--warmup", "1", "--threads", "1"])
    rows = res["conv_micro"]
    assert [r["kernel"] for r in rows] == [3, 5]
    assert all(r["sparse_ms"] > 0 and r["dense_ms"] > 0 for r in rows)
