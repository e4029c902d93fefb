"""Plots of federated runs: accuracy vs round and vs cumulative bytes, several runs/methods at once.

    python -m benchmarks.plots runs/<run-a> runs/<run-b> --out compare.png
    python -m benchmarks.plots --bench results/bench_federation.json --out bench.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from server.recorder import plot_rounds


def load_run(run_dir: str | Path) -> tuple[str, list[dict]]:
    doc = json.loads((Path(run_dir) / "results.json").read_text())
    return doc["config"].get("method", Path(run_dir).name), doc["rounds"]


def plot_runs(run_dirs: list[str | Path], out: str | Path, title: str = "") -> Path:
    series = {}
    for d in run_dirs:
        label, rounds = load_run(d)
        series[label if label not in series else f"{label} ({Path(d).name})"] = rounds
    return plot_rounds([], out, title=title, series=series)


def plot_bench(result: dict, out: str | Path) -> Path:
    """The per-round histories that bench_federation.py stores for each method."""
    if "methods" not in result:  # the suite benchmark's format: suite-mean curves, mean +- sd over seeds
        from benchmarks.figures import fig_rounds

        return fig_rounds(result, Path(out))
    series = {k.replace("_", "-"): m["history"] for k, m in result["methods"].items() if m.get("history")}
    setup = result.get("setup", {})
    title = f"{setup.get('nodes', '?')} clients, {setup.get('num-server-rounds', '?')} rounds"
    return plot_rounds([], out, title=title, series=series)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="*", help="run folders (output-dir/<timestamp>-<method>)")
    ap.add_argument("--bench", type=Path, help="a bench_federation.py JSON instead of run folders")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.bench:
        print(plot_bench(json.loads(args.bench.read_text()), args.out))
    elif args.runs:
        print(plot_runs(args.runs, args.out))
    else:
        ap.error("give run folders or --bench")


if __name__ == "__main__":
    main()
