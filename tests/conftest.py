"""Shared pytest setup: offline Flower environment and the TaskIdentity needed to build Messages."""
import os

# Before anything imports flwr: no telemetry / update-check HTTP calls, no hub downloads.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def task_identity():
    """flwr >= 1.38: Message(...) outside a runtime reads TaskIdentity; set it for every test."""
    try:
        from flwr.supercore.task_identity import TaskIdentity
    except ImportError:  # flwr not installed: tests that need it will skip/fail on their own
        yield
        return
    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old
