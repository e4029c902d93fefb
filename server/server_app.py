"""ServerApp (Flower Message API): parse + validate the run config, then run the federation.

`LAST` keeps the latest run's summary for in-process callers (pytest, run_simulation):
`flwr.simulation.run_simulation` returns None. `create_app(run_config)` gives such callers their run config.
"""
from __future__ import annotations

from logging import ERROR, INFO

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from common.architectures import EMBEDDED_MODELS
from common.backbones import embedded_backbone
from common.settings import parse_run_config

from .quiet import quiet_flower
from .runner import run_federation

LAST: dict = {}


def create_app(run_config: dict | None = None) -> ServerApp:
    """The ServerApp; `run_config` entries win over the context's (`flwr.simulation.run_simulation` passes
    none, so in-process callers give theirs here; the nodes get the result in every message)."""
    server = ServerApp()
    server.main()(lambda grid, context: main(grid, context, run_config))
    return server


def main(grid: Grid, context: Context, overrides: dict | None = None) -> None:
    cfg = parse_run_config({**context.run_config, **(overrides or {})})  # fails here, naming the key
    if cfg.model in EMBEDDED_MODELS and not cfg.weights_path:
        embedded_backbone(model=cfg.model)  # no shipped weights: fail now naming TASKEDGE_WEIGHTS_DIR, not later
    LAST.clear()
    with quiet_flower():
        fed, summary = run_federation(grid, cfg)
    LAST.update(summary=summary, history=fed.history, dropped=fed.dropped, run_dir=str(fed.run_dir))
    log(INFO, "Results: %s", fed.run_dir)
    source = "server test set" if summary.get("final_acc") is not None else "federated evaluation"
    acc = summary.get("final_acc") if summary.get("final_acc") is not None else summary.get("final_fed_acc")
    log(INFO, "Final accuracy %s (%s) after %d rounds; %.0f B up / %.0f B down per client per round",
        acc, source, summary["rounds"], summary["upload_bytes_per_client_round"],
        summary["download_bytes_per_client_round"])
    if str(summary.get("status", "")).startswith("degraded"):
        for f in summary["failed_nodes"]:
            log(ERROR, "Node %d failed every round: %s", f["node"], f["reason"])
        raise RuntimeError(f"run {summary['status']}")  # Flower marks the run failed: a non-zero exit


app = create_app()
