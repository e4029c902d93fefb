"""Centralised fine-tuning of a timm model on your own data, as the README shows it, and the saved model."""
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.preprocess import resolve_preprocess
from common.userdata import load_data
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
    assert res["task"] is None and res["config"]["task"] is None  # not "shapes-downstream"
    assert res["preprocess"]["img_size"] == 32 and res["preprocess"]["mean"] == [0.485, 0.456, 0.406]  # timm's
    assert res["preprocess"] == resolve_preprocess("resnet10t", 32).to_dict()
    # 30 images, no splits in the folder: 20 % carved for test, 10 % for validation, the rest trains
    assert res["splits"] == {"train": 21, "val": 3, "test": 6}
    assert res["history"][-1]["test_examples"] == 6 and res["history"][-1]["val_examples"] == 3
    assert json.loads((d / "ft.json").read_text())["class_names"] == ["ant", "bee", "cat"]
    from PIL import Image

    from common.export import load_model, stored_preprocess

    model, transform, names = load_model(res["model_path"])
    assert names == ["ant", "bee", "cat"] and res["model_path"] == str(d / "ft_model.safetensors")
    x = transform(Image.open(data / "bee" / "0.png"))
    assert x.shape == (3, 32, 32) and model(x.unsqueeze(0)).shape == (1, 3)
    # the saved model with its stored preprocessing scores the test split exactly as training did
    pre = stored_preprocess(res["model_path"])
    test = load_data(data, "test", pre)
    per_file = torch.stack([transform(Image.open(f)) for f in test.items])
    assert torch.equal(per_file, test.x)
    with torch.no_grad():
        acc = float((model(per_file).argmax(1) == test.y).float().mean())
    assert acc == pytest.approx(res["final_test_acc"], abs=1e-9)


def test_a_dataset_dicts_own_test_split_is_used(tmp_path):
    import datasets

    from common.data.loading import to_hf_dataset

    parts = {s: to_hf_dataset(torch.rand(n, 3, 16, 16), torch.arange(n) % 2, ["no", "yes"])
             for s, n in (("train", 20), ("test", 8))}
    datasets.DatasetDict(parts).save_to_disk(str(tmp_path / "hf"))
    res = main(["--method", "head-only", "--data-path", str(tmp_path / "hf"), "--epochs", "1", "--quiet",
                "--json", str(tmp_path / "r.json")])
    assert res["class_names"] == ["no", "yes"]
    assert res["splits"] == {"train": 18, "val": 2, "test": 8}  # the 8-row test split; validation carved from train
    assert res["history"][-1]["test_examples"] == 8


def test_the_progress_bar_shows_each_epoch(tiny, tmp_path, capsys):
    d, data = tiny
    main(["--method", "head-only", "--data-path", str(data), "--epochs", "2", "--batch-size", "8",
          "--json", str(tmp_path / "r.json"), "--save-model", ""])
    err = capsys.readouterr().err
    assert "epoch 1/2" in err and "epoch 2/2" in err and "epoch 1/1" not in err
    assert not (tmp_path / "r_model.safetensors").exists()  # --save-model '' saves nothing


def test_a_stock_vit_gets_its_224_px_input(tmp_path):
    """timm's vit_tiny_patch16_224 with its own weights file and no --img-size: fed 224 px, as timm says."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file(timm.create_model("vit_tiny_patch16_224").state_dict(), str(tmp_path / "vit.safetensors"))
    data = image_folder(tmp_path / "imgs", ["a", "b"], per_class=4, size=(20, 30))
    res = main(["--model", "vit_tiny_patch16_224", "--weights", str(tmp_path / "vit.safetensors"), "--data-path",
                str(data), "--method", "head-only", "--epochs", "1", "--quiet", "--json", str(tmp_path / "r.json")])
    assert res["preprocess"] == resolve_preprocess("vit_tiny_patch16_224").to_dict()
    assert res["preprocess"]["img_size"] == 224 and res["preprocess"]["crop_pct"] == 0.9
    assert res["splits"] == {"train": 5, "val": 1, "test": 2}


def test_batchnorm_drops_a_last_training_batch_of_one():
    """33 examples, batch 32: the shuffled epoch's last batch holds one example, which BatchNorm cannot train on
    (at 16 px resnet10t's last feature map is 1 x 1); it is dropped, evaluation keeps every example."""
    import timm

    from common.train import evaluate, make_optimizer, train_epochs

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=3)
    x, y = torch.randn(33, 3, 16, 16), torch.arange(33) % 3
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        model.train()(x[:1])  # what the last batch did before
    opt = make_optimizer(model, 1e-3)
    steps = []
    opt.register_step_post_hook(lambda *_: steps.append(1))
    out = train_epochs(model, x, y, epochs=2, batch_size=32, lr=1e-3, optimizer=opt)
    assert len(steps) == 2 and out["examples"] == 33
    assert evaluate(model, x, y)["examples"] == 33
    with pytest.raises(ValueError, match="batch size 1 with a BatchNorm model"):
        train_epochs(model, x, y, epochs=1, batch_size=1, lr=1e-3)
    plain = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 3))  # no BatchNorm: all kept
    opt = make_optimizer(plain, 1e-3)
    steps.clear()
    opt.register_step_post_hook(lambda *_: steps.append(1))
    train_epochs(plain, x, y, epochs=1, batch_size=32, lr=1e-3, optimizer=opt)
    assert len(steps) == 2


def test_save_and_load_model_give_the_same_logits(tmp_path):
    """load_model rebuilds the architecture by name (a ViT at the size it was trained at), loads the weights
    and returns the stored transform: the same logits on the same input."""
    import timm
    from PIL import Image

    from common.export import load_model, read_metadata, save_model
    from common.preprocess import apply

    torch.manual_seed(0)
    for name, size in (("resnet10t", 40), ("vit_tiny_patch16_224", 32)):
        kw = {"img_size": size} if name.startswith("vit") else {}
        model = timm.create_model(name, num_classes=3, **kw).eval()
        pre = resolve_preprocess(name, size)
        path = save_model(model, tmp_path / "out" / f"{name}.safetensors", model_name=name, class_names=["x", "y", "z"],
                          preprocess=pre, extra_meta={"method": "full", "rounds": 3})
        meta = read_metadata(path)
        assert meta["model"] == name and meta["num-classes"] == "3" and json.loads(meta["class-names"]) == ["x", "y", "z"]
        assert json.loads(meta["preprocess"]) == pre.to_dict() and meta["rounds"] == "3" and meta["method"] == "full"
        loaded, transform, names = load_model(path)
        img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
        x = apply(pre, [img])
        assert torch.equal(transform(img).unsqueeze(0), x) and names == ["x", "y", "z"] and not loaded.training
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x))


def test_mistakes_are_one_line_on_stderr_with_exit_code_2(tiny, tmp_path, capsys, monkeypatch):
    from PIL import Image

    d, data = tiny
    one = image_folder(tmp_path / "one", ["only"], per_class=2)
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "flat" / "x.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "w.png")
    bad = tmp_path / "bad"
    for cls in ("a", "b"):
        (bad / cls).mkdir(parents=True)
        (bad / cls / "0.png").write_bytes(b"not an image")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    weights = str(d / "resnet10t.safetensors")
    cases = [
        (["--data-path", str(one)], f"argument --data-path '{one}': one class only ('only')"),
        (["--data-path", str(tmp_path / "flat")], "no class sub-folders"),
        (["--data-path", "someone/images"], "'someone/images': no such file or folder"),
        (["--model", "resnet18", "--weights", str(tmp_path / "w.png")], f"argument --weights '{tmp_path}/w.png': an image"),
        (["--model", "resnet18", "--weights", str(tmp_path / "none.pth")], "no such file"),
        (["--model", "resnet18", "--weights", weights], "does not fit resnet18: of 120 model tensors, 64 missing"),
        (["--model", "resnet10t", "--weights", weights, "--data-path", str(bad), "--method", "head-only"],
         f"argument --data-path '{bad}': no readable image among"),
        (["--model", "resnet10t", "--data-path", str(data), "--batch-size", "1"], "argument --batch-size: 1 with"),
    ]
    for argv, words in cases:
        with pytest.raises(SystemExit) as exc:
            main(argv + ["--epochs", "1", "--quiet", "--json", str(tmp_path / "r.json")])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.count("\n") == 1 and len(err) < 700, err
        assert err.startswith("finetune: error: ") and words in err, err


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
