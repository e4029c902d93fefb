"""Numbers in README.md come from committed results: the headline federated table row by row."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rows(md: str) -> dict[str, list[str]]:
    out = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 2 and not set(cells[1]) <= {"-"}:
            out[cells[0]] = cells[1:]
    return out


def test_readme_headline_table_matches_the_federated_results_table():
    section = (ROOT / "README.md").read_text().split("## Results", 1)[1].split("\n## ", 1)[0]
    readme = section.split("![", 1)[0]
    committed = _rows((ROOT / "results" / "results_table.md").read_text().split("\n\n", 1)[0])
    names = {"TaskEdge, default (2 %, paper score)": "TaskEdge, default selection",
             "TaskEdge, random mask": "random mask"}
    rows = _rows(readme)
    assert len(rows) >= 5
    for name, cells in rows.items():
        if name == "method":
            continue
        ref = committed[names.get(name, name)]
        dirichlet, iid, upload = cells
        assert ref[0].startswith(dirichlet) and ref[1].startswith(iid) and ref[3] == upload, name
    numbers = re.findall(r"\d+\.\d+", section.split("Honestly:", 1)[1])  # the prose: every figure in docs/results
    assert numbers and all(n in (ROOT / "docs" / "results.md").read_text() for n in numbers)
