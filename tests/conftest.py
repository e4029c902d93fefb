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
def simulate():
    """Run the real ServerApp and ClientApp on Flower's Ray simulation (3 SuperNodes, 1 CPU each), with
    `overrides` as the run config (the server sends it to the nodes). Returns the ServerApp's LAST."""
    def run(overrides: dict, num_supernodes: int = 3) -> dict:
        from benchmarks.ray_simulation import run_ray_simulation
        from server import server_app

        run_ray_simulation(num_supernodes, num_cpus=2, run_config=overrides)
        return server_app.LAST

    return run
