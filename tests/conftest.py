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
    from server.inprocess import task_identity as identity

    with identity():
        yield


@pytest.fixture(scope="session")
def weights(tmp_path_factory):
    """A random-init copy of the embedded ViT as a local weights file: nothing pre-trains."""
    import torch
    from safetensors.torch import save_file

    from common.models import create_model

    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = create_model("taskedge-vit-tiny", num_classes=10)
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return str(path)


@pytest.fixture
def simulate(monkeypatch):
    """Run the real ServerApp and ClientApp on Flower's Ray simulation (3 SuperNodes, 1 CPU each).

    `run_simulation` gives the apps an empty run config, so `overrides` are set as the server's
    defaults (the server sends them to the clients in every message). Returns the ServerApp's LAST.
    """
    import shutil
    import tempfile
    from pathlib import Path

    def run(overrides: dict, num_supernodes: int = 3) -> dict:
        root = Path(__file__).resolve().parents[1]
        ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's AF_UNIX socket paths must stay < 108 bytes
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
        from flwr.simulation import run_simulation

        import common.settings as settings
        import server.server_app as server_app
        from client.client_app import app as client_app

        for key, value in overrides.items():
            monkeypatch.setitem(settings.DEFAULTS, key, value)
        try:
            run_simulation(server_app=server_app.app, client_app=client_app, num_supernodes=num_supernodes,
                           backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                           "init_args": {"num_cpus": 2, "num_gpus": 0, "include_dashboard": False,
                                                         "logging_level": "WARNING"}})
        finally:
            shutil.rmtree(ray_tmp, ignore_errors=True)
        return server_app.LAST

    return run
