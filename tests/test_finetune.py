"""A short centralised TaskEdge run on the embedded default beats the untouched backbone (head only)."""
import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.mark.slow
def test_taskedge_beats_linear_probe(tmp_path):
    from simulations.finetune import main

    common = ["--epochs", "3", "--quiet", "--train-size", "1500", "--calib", "128"]
    probe = main(common + ["--method", "linear", "--json", str(tmp_path / "linear.json")])  # the older spelling
    assert probe["config"]["method"] == "head-only"  # resolved by common.registry
    te = main(common + ["--method", "taskedge", "--json", str(tmp_path / "taskedge.json")])
    saved = json.loads((tmp_path / "taskedge.json").read_text())
    assert saved["history"][-1]["test_acc"] == te["final_test_acc"]
    assert "backbone params" in saved["trainable_line"]
    assert te["final_test_acc"] > probe["final_test_acc"] + 0.02, (te["final_test_acc"], probe["final_test_acc"])


def test_cli_defaults_match_the_library():
    """finetune keeps its defaults as literals (no torch import for --help); they must stay in sync."""
    from common.architectures import DEFAULT_MODEL, EMBEDDED_MODELS
    from common.data.tasks import DEFAULT_TASK
    from simulations import finetune

    assert finetune.DEFAULT_MODEL == DEFAULT_MODEL
    assert finetune.DEFAULT_TASK == DEFAULT_TASK
    model_help = finetune.parser()._option_string_actions["--model"].help
    assert all(name in model_help for name in EMBEDDED_MODELS), model_help


@pytest.mark.parametrize("argv, option", [
    (["--budget", "2.5"], "--budget"),
    (["--epochs", "0"], "--epochs"),
    (["--batch-size", "-1"], "--batch-size"),
    (["--task", "nope"], "--task"),
    (["--model", "nope"], "--model"),
])
def test_bad_options_exit_2_before_any_work(argv, option, capsys):
    from simulations.finetune import main

    with pytest.raises(SystemExit) as exc:
        main(argv + ["--json", ""])
    assert exc.value.code == 2
    assert f"error: argument {option}" in capsys.readouterr().err
