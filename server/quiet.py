"""Keep Flower's per-round chatter out of the run's log, so each round reads as one line.

`Strategy.start` logs, every round, the sampling, the reply counts, every aggregated MetricRecord and,
at the end, a multi-line dump of all results; with the project's own one-line round summary
(server/recorder.py) and the results files, that is noise for a user watching `flwr run --stream`.
A logging filter on Flower's logger drops exactly those messages (warnings and errors always pass);
records still go through Flower's logger, so log streaming is untouched.
"""
from __future__ import annotations

import contextlib
import logging

CHATTER = ("configure_train: Sampled", "configure_evaluate: Sampled", "aggregate_train: Received",
           "aggregate_evaluate: Received", "[ROUND ", "Global evaluation", "Initial global evaluation",
           "Final results", "Starting ")


class FlowerChatterFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        msg = record.getMessage()
        return not (msg == "" or msg.startswith("\t") or msg.startswith(CHATTER))


@contextlib.contextmanager
def quiet_flower():
    """Install the filter on Flower's logger for the duration of a run."""
    logger, flt = logging.getLogger("flwr"), FlowerChatterFilter()
    logger.addFilter(flt)
    try:
        yield
    finally:
        logger.removeFilter(flt)
