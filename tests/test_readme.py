"""The README's Python snippet runs as written (on the embedded, committed backbone)."""
import re
from pathlib import Path


def test_centralised_snippet_runs(capsys):
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## Centralised TaskEdge", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - our own documentation
    printed = capsys.readouterr().out
    claimed = re.search(r"print_trainable_parameters\(model\)\s+# (.*)", code).group(1).strip()
    assert claimed in printed, (claimed, printed)  # the comment in the README is what it prints
    plain, model = scope["plain"], scope["model"]
    assert not any("values" in n for n, _ in plain.named_parameters())  # merged: a plain model
    assert scope["mask"].num_entries > 0 and model is not plain
