"""The one way the benchmark entry points hand back their results: JSON on stdout and, if asked, in a file."""
from __future__ import annotations

import json
from pathlib import Path


def emit(result: dict, path: str | Path | None = None, indent: int = 2) -> str:
    """Print `result` as JSON and write it to `path` (parent folders created) when given."""
    text = json.dumps(result, indent=indent)
    print(text)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
    return text
