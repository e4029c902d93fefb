"""The in-process federation (what the benchmarks use) gives the same run as Flower's simulation runtime.

Same setting as tests/test_federation_e2e.py (embedded default, 3 supernodes), 2 rounds: once through
`flwr.simulation.run_simulation` (Ray, one process per ClientApp actor) and once through
`server.inprocess.InProcessGrid` with the same run config. Per-round centralised accuracy and the
final trained values must agree (up to float summation order in the aggregation). Slow (~1-2 min).
"""

import numpy as np
import pytest


@pytest.mark.slow
def test_inprocess_equals_run_simulation(tmp_path, simulate):
    from client.client_app import app as client_app
    from common.settings import parse_run_config
    from server.checkpoint import load_checkpoint
    from server.inprocess import InProcessGrid
    from server.runner import run_federation

    overrides = {"num-server-rounds": 2, "output-dir": str(tmp_path / "ray"), "server-test-size": 300,
                 "min-nodes": 3, "local-epochs": 1, "client-threads": 1}
    last = simulate(overrides)
    ray_hist = last["history"]
    ray_ck = load_checkpoint(last["run_dir"])

    cfg = parse_run_config({**overrides, "output-dir": str(tmp_path / "inproc")})
    grid = InProcessGrid(client_app, 3, cfg.to_dict())
    (tmp_path / "inproc" / "run").mkdir(parents=True)
    fed, summary = run_federation(grid, cfg, run_dir=tmp_path / "inproc" / "run")
    ours_ck = load_checkpoint(tmp_path / "inproc" / "run")

    ray_acc = [r["central_acc"] for r in ray_hist]
    our_acc = [r["central_acc"] for r in fed.history]
    assert len(ray_acc) == len(our_acc) == 3
    assert np.allclose(ray_acc, our_acc, atol=1 / 300 + 1e-9), (ray_acc, our_acc)  # at most one test example apart
    assert set(ray_ck.arrays) == set(ours_ck.arrays)
    for key in ray_ck.arrays:
        np.testing.assert_allclose(ray_ck.arrays[key], ours_ck.arrays[key], rtol=1e-4, atol=1e-5, err_msg=key)
    assert summary["upload_bytes_per_client_round"] == pytest.approx(
        np.mean([r["bytes_up_per_client"] for r in ray_hist if r.get("bytes_up_per_client")]), rel=0.01)
