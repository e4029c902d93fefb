"""Centralised fine-tuning of a timm model on your own data, as the README shows it, and the saved model."""
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from simulations.finetune import main
from tests.test_byo_federation import image_folder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import timm
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("byo")
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in timm.create_model("resnet10t").state_dict().items()},
              str(d / "resnet10t.safetensors"))
    return d, image_folder(d / "my_images", ["ant", "bee", "cat"], per_class=10, size=(20, 30))


def test_finetune_on_an_image_folder_saves_a_model_that_loads_back(tiny):
    d, data = tiny
    res = main(["--model", "resnet10t", "--weights", str(d / "resnet10t.safetensors"), "--data-path", str(data),
                "--img-size", "32", "--epochs", "1", "--batch-size", "7", "--json", str(d / "ft.json"), "--quiet"])
    assert res["data"] == str(data) and res["class_names"] == ["ant", "bee", "cat"] and res["num_classes"] == 3
    assert res["preprocess"]["img_size"] == 32 and res["preprocess"]["mean"] == [0.485, 0.456, 0.406]  # timm's
    # 30 images, no splits in the folder: 20 % carved for test (6), 10 % for validation, the rest trains
    assert round(res["history"][-1]["test_acc"] * 6) == res["history"][-1]["test_acc"] * 6
    from PIL import Image

    from common.export import load_model

    model, transform, names = load_model(res["model_path"])
    assert names == ["ant", "bee", "cat"] and res["model_path"] == str(d / "ft_model.safetensors")
    x = transform(Image.open(data / "bee" / "0.png"))
    assert x.shape == (3, 32, 32) and model(x.unsqueeze(0)).shape == (1, 3)


def test_a_dataset_dicts_own_test_split_is_used(tmp_path):
    import datasets

    from common import data as D

    parts = {s: D.to_hf_dataset(torch.rand(n, 3, 16, 16), torch.arange(n) % 2, ["no", "yes"])
             for s, n in (("train", 20), ("test", 8))}
    datasets.DatasetDict(parts).save_to_disk(str(tmp_path / "hf"))
    res = main(["--method", "linear", "--data-path", str(tmp_path / "hf"), "--epochs", "1", "--quiet",
                "--json", str(tmp_path / "r.json")])
    assert res["class_names"] == ["no", "yes"]
    assert round(res["history"][-1]["test_acc"] * 8, 6).is_integer()  # scored on the 8-row test split


@pytest.mark.slow
def test_readme_byo_commands_run_as_written(tiny, tmp_path):
    """The README's centralised and simulated-federation commands, with its placeholders pointed at a tiny timm
    model file and a tiny ImageFolder (the deployment line is exercised by tests/test_deploy*.py)."""
    d, data = tiny
    text = (ROOT / "README.md").read_text()
    block = text.split("## Bring your own model and data", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = [ln for ln in block.splitlines() if ln.strip() and not ln.startswith("#")]
    central = next(ln for ln in lines if "simulations.finetune" in ln)
    federated = next(ln for ln in lines if "run_flwr.sh" in ln)
    weights = str(d / "resnet10t.safetensors")
    sub = lambda s: (s.replace("/abs/resnet18.safetensors", weights).replace("resnet18.safetensors", weights)  # noqa: E731
                     .replace("resnet18", "resnet10t").replace("/abs/my_images", str(data))
                     .replace("my_images/", str(data)))
    argv = shlex.split(sub(central))
    assert argv[:3] == [".venv/bin/python", "-m", "simulations.finetune"]
    proc = subprocess.run([sys.executable, *argv[1:], "--epochs", "1", "--img-size", "32", "--quiet", "--json",
                           str(tmp_path / "ft.json")], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "ft.json").read_text())["class_names"] == ["ant", "bee", "cat"]
    cmd = sub(federated)
    cmd = re.sub(r'--run-config "', f'--run-config "num-server-rounds=1 local-epochs=1 img-size=32 partitioner=\'iid\' '
                                    f'output-dir=\'{tmp_path}/runs\' ', cmd)
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, cwd=ROOT, timeout=900,
                          env={**__import__("os").environ, "VENV_BIN": str(Path(sys.executable).parent)})
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-2000:])
    (run,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    doc = json.loads((run / "results.json").read_text())
    assert doc["status"] == "complete" and json.loads(doc["config"]["class-names"]) == ["ant", "bee", "cat"]
