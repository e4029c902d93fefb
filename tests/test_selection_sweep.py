"""The default selection: chosen on the validation split (benchmarks/sweep_selection.py), the paper one switch away."""
import json

import pytest
import torch

from benchmarks.sweep_selection import choose, main, summarise
from common import tuned
from common.partition import server_test_set
from common.settings import parse_run_config


def test_paper_preset_restores_the_papers_selection_and_explicit_keys_win():
    default = parse_run_config({})
    sel = tuned.selection()
    assert (default.score, default.budget_per_neuron) == (sel["score"], float(sel.get("budget_per_neuron", 0.0)))
    paper = parse_run_config({"preset": "paper"})
    assert (paper.score, paper.allocation, paper.budget, paper.budget_per_neuron) == ("taskedge", "neuron", 0.02, 0.0)
    mine = parse_run_config({"preset": "paper", "budget": 0.04, "score": "magnitude"})
    assert (mine.score, mine.budget, mine.budget_per_neuron) == ("magnitude", 0.04, 0.0)
    assert parse_run_config({"budget": 0.04}).budget_per_neuron == 0.0  # a budget set explicitly is the budget
    assert parse_run_config({"budget": 0.04, "budget-per-neuron": 3.0}).budget_per_neuron == 3.0
    with pytest.raises(ValueError, match="run config 'preset': must be one of '', paper, got 'x'"):
        parse_run_config({"preset": "x"})


def test_server_split_val_is_disjoint_from_test():
    val = server_test_set(parse_run_config({"server-split": "val", "server-test-size": 50}))
    test = server_test_set(parse_run_config({"server-test-size": 50}))
    assert val[0].shape == test[0].shape == (50, 3, 32, 32) and not torch.equal(val[0], test[0])
    with pytest.raises(ValueError, match="run config 'server-split'"):
        parse_run_config({"server-split": "train"})


def test_choose_takes_the_best_non_reference_candidate_under_half_fedloras_upload():
    table = {"a": {}, "b": {}, "c": {}, "random k=2": {"reference": True}, "fedlora r=8": {"reference": True}}
    summary = {"a": {"val_acc_mean": 0.70, "upload_bytes_per_client_round": 40_000},
               "b": {"val_acc_mean": 0.80, "upload_bytes_per_client_round": 60_000},  # over the cap (50,000)
               "c": {"val_acc_mean": 0.72, "upload_bytes_per_client_round": 50_000},  # at the cap: allowed
               "random k=2": {"val_acc_mean": 0.90, "upload_bytes_per_client_round": 10},  # a reference: never
               "fedlora r=8": {"val_acc_mean": 0.95, "upload_bytes_per_client_round": 100_000}}
    assert choose(summary, table) == "c"
    runs = [{"key": "a", "task": t, "final_acc": acc, "upload_bytes_per_client_round": 10, "trainable_entries": 3}
            for t, acc in (("x", 0.5), ("y", 0.7))] + [{"key": "b", "task": "x", "error": "boom"}]
    assert summarise(runs, ["x", "y"]) == {"a": {"val_acc_mean": 0.6, "val_acc_per_task": {"x": 0.5, "y": 0.7},
                                                 "upload_bytes_per_client_round": 10, "trainable_entries": 3}}


@pytest.mark.slow
def test_quick_sweep_scores_on_val_and_writes_the_selection(tmp_path):
    defaults = tmp_path / "defaults.json"
    defaults.write_text(json.dumps({"methods": {"taskedge": {"lr": 0.01}}}))
    doc = main(["--quick", "--workers", "1", "--cache", str(tmp_path / "c.jsonl"), "--json", str(tmp_path / "s.json"),
                "--defaults", str(defaults)])
    assert doc["chosen"] == "taskedge k=2 lr=0.01" and doc["setup"]["split"] == "val" and not doc["failed"]
    written = json.loads(defaults.read_text())["selection"]
    assert written["budget_per_neuron"] == 2.0 and written["score"] == "taskedge" and "validation" in written["chosen_by"]
    assert doc["summary"]["fedlora r=8"]["upload_bytes_per_client_round"] > 2 * doc["summary"][doc["chosen"]][
        "upload_bytes_per_client_round"]
