"""One federation run on any Grid: used by the ServerApp and by the in-process benchmark/tests."""
from __future__ import annotations

from pathlib import Path

from flwr.serverapp import Grid

from client.settings import AppConfig

from .results import new_run_dir
from .strategy import TaskEdgeStrategy


def run_federation(grid: Grid, cfg: AppConfig, run_dir: str | Path | None = "auto") -> tuple[TaskEdgeStrategy, dict]:
    """Reconcile, train `num-server-rounds` rounds, export. run_dir="auto": output-dir/<timestamp>-<method>."""
    if run_dir == "auto":
        run_dir = new_run_dir(cfg.output_dir, cfg.method)
    strategy = TaskEdgeStrategy(cfg, run_dir)
    initial = strategy.initialize(grid)
    strategy.start(grid=grid, initial_arrays=initial, num_rounds=max(cfg.num_server_rounds - strategy.round_offset, 0),
                   timeout=cfg.round_timeout, evaluate_fn=strategy.central_evaluate)
    return strategy, strategy.finish()
