"""A short centralised TaskEdge run on the embedded default beats the untouched backbone (head only)."""
import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.mark.slow
def test_taskedge_beats_linear_probe(tmp_path):
    from simulations.finetune import main

    common = ["--epochs", "3", "--quiet", "--train-size", "1500", "--calib", "128"]
    probe = main(common + ["--method", "linear", "--json", str(tmp_path / "linear.json")])
    te = main(common + ["--method", "taskedge", "--json", str(tmp_path / "taskedge.json")])
    saved = json.loads((tmp_path / "taskedge.json").read_text())
    assert saved["history"][-1]["test_acc"] == te["final_test_acc"]
    assert "backbone params" in saved["trainable_line"]
    assert te["final_test_acc"] > probe["final_test_acc"] + 0.02, (te["final_test_acc"], probe["final_test_acc"])
