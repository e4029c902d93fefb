"""benchmarks.edge_suite --quick end to end (CI's run of the edge benchmark) and its resume cache."""
import json

from benchmarks import edge_suite


def test_quick_mode_writes_table_figures_and_resumes(tmp_path, capsys):
    cache = tmp_path / "runs.jsonl"
    argv = ["--quick", "--workers", "1", "--out", str(tmp_path), "--cache", str(cache)]
    res = edge_suite.main(argv)
    data = json.loads((tmp_path / "edge_suite.json").read_text())
    (model,) = data["test"]
    assert model == "taskedge-vit-tiny" and set(data["test"][model]) == {"linear", "taskedge"}
    lin, te = data["test"][model]["linear"], data["test"][model]["taskedge"]
    # the suite mean is the mean of the raw test runs in the cache (read independently of the summary)
    raw = [json.loads(line) for line in cache.read_text().splitlines()]
    for label, summary in (("linear", lin), ("taskedge", te)):
        accs = [r["acc"] for r in raw if r["tag"] == label and r["eval_split"] == "test"]
        assert accs and summary["suite_mean"] == sum(accs) / len(accs), label
    assert lin["trainable"] == lin["trainable_head"] and te["trainable_body"] > 0  # TaskEdge trains entries too
    # upload per round: the head alone (float32) for the linear probe; more for TaskEdge
    assert data["upload"][model]["linear"] == 4 * lin["trainable_head"]
    assert data["upload"][model]["taskedge"] > data["upload"][model]["linear"]
    assert data["upload"][model]["full"] > data["upload"][model]["lora"] > data["upload"][model]["taskedge"]
    cost = data["cost"]["models"][model]["methods"]
    assert set(cost) == {"head-only", "taskedge"}  # the cost rows under the registry's names
    assert cost["taskedge"]["peak_mb"] >= 4 * 214_003 / 1e6  # at least the float32 parameters are resident
    md = (tmp_path / "edge_suite.md").read_text()
    assert f"| {model} | taskedge |" in md and f"| {model} | linear |" in md
    for name in ("edge_acc_vs_trainable.png", "edge_shift_unseen.png", "edge_cost.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    assert len(cache.read_text().splitlines()) == 4  # 2 tuning + 2 test runs
    capsys.readouterr()
    again = edge_suite.main(argv)  # everything from the cache: same numbers, nothing re-run
    out = capsys.readouterr().out
    assert "[tune] 2 of 2 runs from the cache" in out and "[test] 2 of 2 runs from the cache" in out
    assert again["test"] == res["test"]
    assert len(cache.read_text().splitlines()) == 4


def test_readme_block_is_replaced_between_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{edge_suite.README_BEGIN}\nold table\n{edge_suite.README_END}\noutro\n")
    assert edge_suite.update_readme(readme, "| new |")
    assert readme.read_text() == f"intro\n{edge_suite.README_BEGIN}\n| new |\n{edge_suite.README_END}\noutro\n"
    plain = tmp_path / "OTHER.md"
    plain.write_text("no markers\n")
    assert not edge_suite.update_readme(plain, "| new |") and plain.read_text() == "no markers\n"


def test_results_doc_shows_the_committed_edge_table():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    table = (root / "results" / "edge_suite.md").read_text().strip()
    readme = (root / "docs" / "results.md").read_text()
    block = readme.split(edge_suite.README_BEGIN, 1)[1].split(edge_suite.README_END, 1)[0].strip()
    assert block == table  # regenerate both with: python -m benchmarks.edge_suite
