"""Your own data in a federation (in-process, the real apps): a run-config data-path partitioned over the
simulated nodes, node-config data-paths in a deployment, classes agreed by name, the exported model."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from client.client_app import app as client_app
from common.settings import parse_run_config
from server.inprocess import InProcessGrid
from server.runner import run_federation


def image_folder(root: Path, classes, per_class=12, size=(20, 24), seed=0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for k, cls in enumerate(classes):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
            pixels[..., k % 3] = 255  # a learnable colour cue per class
            Image.fromarray(pixels).save(root / cls / f"{i}.png")
    return root


def _cfg(weights, tmp_path, **kw):
    base = {"weights-path": weights, "num-server-rounds": 1, "calib-size": 8, "batch-size": 8, "output-dir":
            str(tmp_path / "runs"), "min-nodes": 1, "local-epochs": 1, "partitioner": "iid", "test-fraction": 0.25}
    return parse_run_config(base, **kw)


def test_run_config_data_path_is_partitioned_over_simulated_nodes(weights, tmp_path):
    data = image_folder(tmp_path / "imgs", ["ant", "bee", "cat"], per_class=20)
    cfg = _cfg(weights, tmp_path, data_path=str(data), num_partitions=2)
    fed, summary = run_federation(InProcessGrid(client_app, 2, cfg.to_dict()), cfg)
    assert fed.cfg.classes == ["ant", "bee", "cat"] and fed.cfg.num_classes == 3
    assert fed.arrays["head.weight"].shape == (3, 64)  # the head from the data's classes, not the task's 10
    assert summary["rounds"] == 1 and not fed.dropped and summary["final_acc"] is None  # no server test set
    assert fed.history[-1]["fed_acc"] is not None  # the headline is the federated evaluation
    config = json.loads((fed.run_dir / "config.json").read_text())
    assert config["num-classes"] == 3 and json.loads(config["class-names"]) == ["ant", "bee", "cat"]
    # the exported model loads back as a plain model with its classes and transform
    from PIL import Image

    from common.export import load_model

    model, transform, names = load_model(fed.run_dir / "final_model.safetensors")
    assert names == ["ant", "bee", "cat"]
    x = transform(Image.open(data / "bee" / "0.png")).unsqueeze(0)
    assert x.shape == (1, 3, 32, 32) and model(x).shape == (1, 3)


def test_server_data_path_gives_the_headline_and_classes_map_by_name(weights, tmp_path):
    """Two nodes with their own folders whose class lists differ: the union, by name; the server scores the
    model on its own test set, labels mapped onto the same names."""
    a = image_folder(tmp_path / "a", ["bee", "cat"])
    b = image_folder(tmp_path / "b", ["ant", "cat"], seed=1)
    test = image_folder(tmp_path / "test", ["ant", "bee", "cat"], per_class=4, seed=2)
    cfg = _cfg(weights, tmp_path, server_data_path=str(test))
    grid = InProcessGrid(client_app, 2, cfg.to_dict(), node_configs={0: {"data-path": str(a)},
                                                                     1: {"data-path": str(b)}})
    fed, summary = run_federation(grid, cfg)
    assert fed.cfg.classes == ["ant", "bee", "cat"] and not fed.dropped
    assert summary["final_acc"] is not None and fed.history[0]["central_acc"] is not None
    # the server's test split of a flat folder is the carved 20 %: 12 images -> 2 or 3, all of known classes
    from common.partition import server_test_set

    x, y = server_test_set(fed.cfg)
    assert len(x) == round(12 * 0.2) and set(y.tolist()) <= {0, 1, 2}


def test_a_node_whose_classes_fall_outside_the_fixed_list_is_refused_with_the_reason(weights, tmp_path):
    a = image_folder(tmp_path / "a", ["bee", "cat"])
    odd = image_folder(tmp_path / "odd", ["bee", "zebra"], seed=3)
    cfg = _cfg(weights, tmp_path, class_names="bee,cat", num_server_rounds=2)
    grid = InProcessGrid(client_app, 2, cfg.to_dict(), node_configs={0: {"data-path": str(a)},
                                                                     1: {"data-path": str(odd)}})
    fed, summary = run_federation(grid, cfg)
    odd_id = sorted(grid.contexts)[1]
    reasons = [d["reason"] for d in fed.dropped if d["node"] == odd_id]
    assert reasons and all("outside the federation's 2" in r and "'zebra'" in r for r in reasons[1:])
    doc = json.loads((fed.run_dir / "results.json").read_text())
    assert doc["status"].startswith("degraded: 1 node(s) failed every round")  # not 'complete'
    assert doc["summary"]["failed_nodes"][0]["node"] == odd_id


def test_a_missing_node_data_path_makes_the_run_degraded(weights, tmp_path):
    cfg = _cfg(weights, tmp_path)
    grid = InProcessGrid(client_app, 2, cfg.to_dict(), node_configs={1: {"data-path": str(tmp_path / "nope")}})
    fed, summary = run_federation(grid, cfg)
    assert summary["status"].startswith("degraded") and "no such file or folder" in summary["status"]


def test_one_class_in_the_data_is_an_error_before_training(weights, tmp_path):
    one = image_folder(tmp_path / "one", ["only"])
    cfg = _cfg(weights, tmp_path, data_path=str(one))
    with pytest.raises(RuntimeError, match="one class only"):
        run_federation(InProcessGrid(client_app, 2, cfg.to_dict()), cfg)


def test_batchnorm_model_trains_on_a_last_batch_of_one(tmp_path):
    """289 examples, batch 32: the last training batch holds one example (BatchNorm cannot train on it)."""
    import timm

    from common.train import train_epochs

    model = timm.create_model("resnet10t", num_classes=3)
    x, y = torch.randn(33, 3, 16, 16), torch.arange(33) % 3
    train_epochs(model, x, y, epochs=1, batch_size=32, lr=1e-3)  # raised ValueError in BatchNorm before


def test_nodes_with_more_examples_than_the_built_in_task_are_not_refused(weights, tmp_path):
    """The reply bound was the built-in task's 1,000 training examples; a node with its own larger folder sent
    a num-examples above it and was dropped every round."""
    from server.phases import max_examples

    big = image_folder(tmp_path / "big", ["ant", "bee"], per_class=1000, size=(8, 8))  # 1,050 local training
    cfg = _cfg(weights, tmp_path, calib_size=4, batch_size=256, fraction_evaluate=0.0, server_test_size=0)
    grid = InProcessGrid(client_app, 1, cfg.to_dict(), node_configs={0: {"data-path": str(big)}})
    fed, summary = run_federation(grid, cfg)
    assert not fed.dropped and summary["status"] == "complete"
    assert max_examples(fed.cfg) == 10_000_000 and max_examples(cfg) == 1000
