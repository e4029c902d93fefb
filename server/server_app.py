"""ServerApp (Flower Message API): parse + validate the run config, then run the federation.

`LAST` keeps the latest run's summary for in-process callers (pytest, run_simulation):
`flwr.simulation.run_simulation` returns None.
"""
from __future__ import annotations

from logging import INFO

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from common.settings import parse_run_config

from .quiet import quiet_flower
from .runner import run_federation

app = ServerApp()
LAST: dict = {}


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = parse_run_config(context.run_config)  # fails here, naming the key, on a bad value
    LAST.clear()
    with quiet_flower():
        fed, summary = run_federation(grid, cfg)
    LAST.update(summary=summary, history=fed.history, dropped=fed.dropped, run_dir=str(fed.run_dir))
    log(INFO, "Results: %s", fed.run_dir)
    log(INFO, "Final accuracy %s after %d rounds; %.0f B up / %.0f B down per client per round",
        summary.get("final_acc"), summary["rounds"], summary["upload_bytes_per_client_round"],
        summary["download_bytes_per_client_round"])
