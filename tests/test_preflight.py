"""Mistakes with your own model, weights and data are answered in one line before Flower starts (check_config)
and before training (finetune). The checks that need no model must not import torch (what keeps them well
under 2 s here: importing torch alone takes ~2 s); the key/shape check builds the model on the meta device."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.test_byo_federation import image_folder
from tests.test_userdata import folder, saved_dataset

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def check(run_config: str) -> tuple[int, str, bool]:
    """check_config's exit code, its stderr line, and whether the check imported torch."""
    code = ("import sys; from simulations.check_config import main; rc = main(['--run-config', sys.argv[1]]); "
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH'); sys.exit(rc)")
    proc = subprocess.run([PY, "-c", code, run_config], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return proc.returncode, proc.stderr.strip(), "NO-TORCH" not in proc.stdout


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import timm
    from PIL import Image
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("pre")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "picture.png")
    save_file({k: v.contiguous() for k, v in timm.create_model("resnet10t").state_dict().items()},
              str(d / "r10.safetensors"))
    image_folder(d / "one", ["only"], per_class=2)
    image_folder(d / "two", ["a", "b"], per_class=2)
    (d / "flat").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "flat" / "x.png")
    (d / "random.bin").write_bytes(np.random.default_rng(0).integers(0, 255, 64, dtype=np.uint8).tobytes())
    (folder(d / "empty", {"a": 2, "b": 2}) / "c").mkdir()
    folder(d / "splits" / "val", {"a": 1, "b": 1})
    saved_dataset(d / "dd", {"train": 6, "test": 2})
    (d / "weights_dir").mkdir()
    return d


@pytest.mark.parametrize("run_config, key, words", [
    ("data-path='{d}/missing'", "data-path", "no such file or folder"),
    ("data-path='{d}/flat'", "data-path", "no class sub-folders"),
    ("data-path='{d}/one'", "data-path", "one class only ('only')"),
    ("data-path='{d}/empty'", "data-path", "'{d}/empty': class 'c' has no images"),
    ("data-path='{d}/splits'", "data-path", "'{d}/splits': has val/ but no train/"),
    ("data-path='owner/name'", "data-path", "'owner/name': no such file or folder, and HF_HUB_OFFLINE is set"),
    ("weights-path='{d}/random.bin'", "weights-path", "'{d}/random.bin': not a weights file"),
    ("weights-path='{d}/weights_dir'", "weights-path", "'{d}/weights_dir' is a folder"),
    ("data-path='{d}/picture.png'", "data-path", "is a file"),
    ("server-data-path='{d}/missing'", "server-data-path", "no such file or folder"),
    ("weights-path='{d}/nothing.safetensors'", "weights-path", "no such file"),
    ("weights-path='{d}/picture.png'", "weights-path", "an image (expected a .safetensors file or a torch state dict"),
])
def test_file_and_folder_mistakes_are_one_line_without_torch(files, run_config, key, words):
    rc, err, torch_imported = check(run_config.format(d=files))
    assert rc == 2 and err.count("\n") == 0, err
    assert err.startswith(f"error: run config '{key}': ") and words.format(d=files) in err, err
    assert not torch_imported  # the model-free checks stay cheap


def test_model_and_weights_are_checked_against_each_other(files):
    rc, err, _ = check("model='resnet181'")
    assert rc == 2 and "run config 'model': 'resnet181': neither an embedded model" in err and "resnet18" in err
    rc, err, _ = check(f"model='resnet18' weights-path='{files}/r10.safetensors'")
    assert rc == 2 and err.count("\n") == 0 and len(err) < 700, err
    assert "does not fit resnet18: of 120 model tensors" in err and "of another shape (e.g." in err
    rc, err, _ = check(f"model='resnet10t' weights-path='{files}/r10.safetensors' data-path='{files}/two'")
    assert rc == 0, err


@pytest.mark.parametrize("run_config", ["data-path='{d}/two'", "data-path='{d}/dd'"])
def test_good_data_passes_without_torch(files, run_config):
    rc, err, torch_imported = check(run_config.format(d=files))
    assert rc == 0 and err == "" and not torch_imported, err


def test_the_default_model_is_checked_against_a_weights_file_too(files):
    rc, err, _ = check(f"weights-path='{files}/r10.safetensors'")
    assert rc == 2 and "does not fit taskedge-vit-tiny: of 53 model tensors, 53 missing" in err, err


def test_a_model_that_cannot_be_built_is_one_line(files, monkeypatch):
    import timm

    from common.preflight import model_fits

    def refuse(*args, **kwargs):
        raise AssertionError("Input image size (30*30) doesn't match model (224*224).\nmore text")

    monkeypatch.setattr(timm, "create_model", refuse)
    problem = model_fits("vit_tiny_patch16_224", str(files / "r10.safetensors"), img_size=30)
    assert problem == ("model 'vit_tiny_patch16_224': cannot be built at img-size 30 (AssertionError: Input image "
                       "size (30*30) doesn't match model (224*224).)")


def test_finetune_answers_the_same_mistakes_with_its_option_names(files):
    for args, words in ((["--data-path", str(files / "one")], "argument --data-path"),
                        (["--weights", str(files / "picture.png"), "--model", "resnet18"], "argument --weights"),
                        (["--model", "resnet18", "--weights", str(files / "r10.safetensors")], "does not fit")):
        proc = subprocess.run([PY, "-m", "simulations.finetune", *args, "--epochs", "1"], capture_output=True,
                              text=True, cwd=ROOT, timeout=120)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and words in last and "Traceback" not in proc.stderr, proc.stderr[-1500:]
