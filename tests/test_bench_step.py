"""benchmarks/bench_step.py runs end to end on tiny models and emits the documented schema.

Tiny models, one timed step, one thread (a loaded 2-core box stalls multi-threaded tiny ops).
"""
import json

import pytest
import torch.nn.functional as F

from benchmarks import bench_step

METHOD_KEYS = {"step_s", "peak_mb", "peak_rss_mb", "step_ratio", "step_ratio_min", "step_ratio_max", "step_ratio_reps",
               "mem_ratio", "trainable"}
FAST = ["--steps", "1", "--warmup", "1", "--reps", "2", "--calib-repeats", "1", "--threads", "1", "--batch", "2"]


def _check_schema(res, model, importance=True):
    """The documented schema; importance_pass is present exactly when it was not switched off."""
    assert res["model"] == model and res["batch"] == 2
    assert set(res["methods"]) == {"floor", "taskedge", "fedlora", "fedavg-full"}
    for name, m in res["methods"].items():
        assert set(m) == METHOD_KEYS, name
    fl = res["methods"]["floor"]
    assert fl["step_ratio"] == pytest.approx(1.0) and fl["mem_ratio"] == pytest.approx(1.0)
    assert fl["trainable"] == 0
    te, lora, full = (res["methods"][k] for k in ("taskedge", "fedlora", "fedavg-full"))
    assert 0 < te["trainable"] < lora["trainable"] < full["trainable"]
    # full fine-tuning keeps gradients + AdamW state of every weight: strictly the most memory, and at least
    # weights + gradients + two AdamW moments of every parameter (4 x 4 bytes each; peak_mb >= bytes / 2^20)
    assert full["peak_mb"] > max(te["peak_mb"], lora["peak_mb"])
    assert full["peak_mb"] * 2**20 >= 16 * full["trainable"]
    assert all(m["peak_mb"] * 2**20 >= 4 * full["trainable"] for m in res["methods"].values())  # weights resident
    steps = {k: v["steps_s"] for k, v in res["timing_detail"].items()}
    assert all(len(reps) == 2 and all(len(r) == 1 for r in reps) for reps in steps.values())  # 2 reps x 1 step
    assert all(len(m["step_ratio_reps"]) == 2 for m in res["methods"].values())  # one ratio per repetition
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
    assert [(r["kernel"], r["stride"]) for r in rows] == [(3, 1), (5, 2)]  # the shapes asked for, in order


def test_floor_stem_stops_the_backward_at_the_stem_output():
    """floor-stem: nothing trains, the image gets no gradient, the stem's output is the leaf."""
    args = bench_step.parse_args(["--model", "vit_tiny_patch16_224", "--model-kwargs", '{"depth": 1}', "--img-size", "32",
                                  *FAST])
    x, y = bench_step.make_batches(2, 32, 10, 1, 0)[0]
    model, opt, trainable = bench_step.setup_method("floor-stem", args, None)
    assert opt is None and trainable == 0
    leaves = []
    model.patch_embed.proj.register_forward_hook(lambda _m, _i, out: leaves.append(out))  # sees the stem hook's leaf
    F.cross_entropy(model(x), y).backward()
    assert x.grad is None and all(p.grad is None for p in model.parameters())
    assert leaves[0].is_leaf and leaves[0].grad is not None  # the backward ends at the stem's output


def test_floor_stem_ratios_in_timing_detail():
    res = bench_step.main(["--model", "vit_tiny_patch16_224", "--model-kwargs", '{"depth": 1}', "--img-size", "32",
                           "--methods", "taskedge,floor-stem", "--no-importance", *FAST])
    assert set(res["methods"]) == {"floor", "taskedge", "floor-stem"}
    assert set(res["timing_detail"]) == {"floor", "taskedge", "floor-stem"}
    assert res["timing_detail"]["floor-stem"]["ratio_to_floor_stem"]["median"] == pytest.approx(1.0)
