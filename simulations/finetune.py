"""Centralised TaskEdge fine-tuning (no Flower): the single-device path of the project.

    python -m simulations.finetune                      # embedded offline default
    python -m simulations.finetune --method head-only   # head only (linear probe)
    python -m simulations.finetune --model vit_small_patch16_224 --weights vit_s.safetensors --data-path ./my_folder

Prints the trainable parameters, per-epoch validation and test accuracy, writes a results JSON (data path,
classes, split sizes, preprocessing, history) and saves the merged model with its class names and
preprocessing (`common.export.load_model` loads it back). Your data (`--data-path`: an ImageFolder or a
saved Hugging Face dataset) gets the model's own preprocessing (timm's data config; `--img-size` overrides)
and keeps the splits it has; a missing validation / test split is carved deterministically. A mistake in
the model name, the weights file or the data is one line on stderr, exit code 2, before any training.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

# Only light imports at module level, so `--help` and option errors answer at once; torch, timm and
# the training code are imported where they are used.
from common import tuned
from common.taskedge.config import ALLOCATIONS, SAVE_DTYPES, SCORES
from common.registry import FEDERATED_METHODS, METHODS as REGISTERED, resolve_method
from common.settings import parse_run_config

if TYPE_CHECKING:
    import torch

METHODS = FEDERATED_METHODS  # common.registry: the methods with tuned rates (common/defaults.json)
DEFAULT_MODEL = "taskedge-vit-tiny"  # = common.architectures.DEFAULT_MODEL (tests check), without importing torch
DEFAULT_TASK = "shapes-downstream"  # = common.data.tasks.DEFAULT_TASK

# option -> run-config key: these options follow the federation's rules (common.settings)
FEDERATION_RULES = {"budget": "budget", "budget_per_neuron": "budget-per-neuron", "epochs": "local-epochs", "batch_size": "batch-size", "calib": "calib-size",
                    "lr": "lr", "head_lr": "head-lr", "seed": "seed"}
_SELECTION = tuned.selection()


def build_model(args, num_classes: int) -> torch.nn.Module:
    from common.methods import takes_img_size
    from common.architectures import EMBEDDED_MODELS
    from common.models import create_embedded, create_model

    if args.model in EMBEDDED_MODELS and args.weights is None:
        return create_embedded(num_classes, model=args.model)
    kw = {"img_size": args.img_size} if args.img_size and takes_img_size(args.model) else {}
    return create_model(args.model, num_classes=num_classes, pretrained=args.pretrained, weights=args.weights, **kw)


def class_names_of(args) -> list[str]:
    """The classes: a user's data's own (folder names / ClassLabel names), or the built-in task's."""
    if args.data_path:
        from common.userdata import inspect_data

        return list(inspect_data(args.data_path).class_names)
    from common.data.tasks import get_task

    return list(get_task(args.task).class_names)


def load_data(args, model=None) -> dict:
    """The splits as tensors, with the model's preprocessing (common/preprocess.py; --img-size overrides):
    a user's data with the splits it has, the missing ones carved (common/userdata.py), or the built-in task.
    Returns {"train", "val" (None for the built-in task), "test", "calib": (x, y), "class_names",
    "preprocess", "skipped": images that could not be decoded, "bad": the first of them}."""
    import torch

    from common.preprocess import resolve_preprocess

    pre = resolve_preprocess(args.model, args.img_size or None, model=model)
    if args.data_path:
        from common.userdata import load_data as load_split

        parts = {s: load_split(args.data_path, s, pre) for s in ("train", "val", "test")}
        skipped = sum(p.corrupt for p in parts.values())
        if skipped:
            bad = [b for p in parts.values() for b in p.bad]
            print(f"skipped {skipped} image(s) that could not be decoded (first: {bad[0]})")
        (xtr, ytr), n = parts["train"][:2], len(parts["train"].x)
        pick = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed))[:args.calib]  # all classes
        return {"train": (xtr, ytr), "val": tuple(parts["val"][:2]), "test": tuple(parts["test"][:2]),
                "calib": (xtr[pick], ytr[pick]), "class_names": parts["train"].class_names, "preprocess": pre,
                "skipped": skipped, "bad": [b for p in parts.values() for b in p.bad][:20]}
    from common.data.splits import make_split
    from common.data.tasks import get_task

    spec = get_task(args.task)
    return {"train": make_split(spec, "train", n=args.train_size, seed=args.seed), "val": None,
            "test": make_split(spec, "test", seed=args.seed), "calib": make_split(spec, "calib", n=args.calib,
                                                                                   seed=args.seed),
            "class_names": list(spec.class_names), "preprocess": pre, "skipped": 0, "bad": []}


def prepare(model, args, calib):
    """Make `model` the method's trainable model (`common.methods.build_calibrated`, the registry's one build
    path); returns (model, the TaskEdge mask or None)."""
    from common.methods import build_calibrated
    from common.taskedge.config import TaskEdgeConfig
    from common.train import batches

    cfg = TaskEdgeConfig(budget=args.budget, score=args.score, allocation=args.allocation,
                         save_dtype=args.save_dtype, seed=args.seed, per_neuron=args.budget_per_neuron or 0.0)
    calib_batches = list(batches(*calib, batch_size=args.batch_size, shuffle=False))
    return build_calibrated(args.method, model, cfg, calib_batches, args.lora_rank, args.seed)


def run(args) -> dict:
    import torch

    from common.train import evaluate, make_optimizer, train_epochs
    from common.taskedge.tuner import print_trainable_parameters
    from common.userdata import DataError

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    try:
        class_names = class_names_of(args)
        model = build_model(args, len(class_names))
        data = load_data(args, model)
    except DataError as err:
        fail(f"argument --data-path {str(err).removeprefix('data-path ')}")
    (xtr, ytr), (xte, yte), val, pre = data["train"], data["test"], data["val"], data["preprocess"]
    sizes = {"train": len(xtr), "val": len(val[0]) if val else 0, "test": len(xte)}
    if args.data_path and (sizes["train"] < 2 or sizes["test"] < 1):
        fail(f"argument --data-path '{args.data_path}': {sizes['train']} training and {sizes['test']} test images "
             f"after the split; need at least 2 and 1 (add images, or a test/ folder)")
    from common.train import BATCH_NORMS

    if args.batch_size == 1 and any(isinstance(m, BATCH_NORMS) for m in model.modules()):
        fail(f"argument --batch-size: 1 with {args.model}, which has BatchNorm (it needs at least 2 examples per "
             f"training batch); use --batch-size 2 or more")
    print(f"data: {args.data_path or 'task ' + args.task} | classes {len(class_names)} | "
          + " ".join(f"{k} {v}" for k, v in sizes.items()) + f" | input {pre.img_size} px")
    t0 = time.perf_counter()
    model, _mask = prepare(model, args, data["calib"])
    setup_s = time.perf_counter() - t0
    line = print_trainable_parameters(model) if args.method == "taskedge" else None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"method={args.method} trainable tensors={trainable:,}")
    opt = make_optimizer(model, args.lr, head_lr=args.head_lr)

    def scores() -> dict:
        out = {f"test_{k}": v for k, v in evaluate(model, xte, yte).items()}
        if val and len(val[0]):
            out.update({f"val_{k}": v for k, v in evaluate(model, *val).items()})
        return out

    history = [{"epoch": 0, **scores()}]
    print(f"epoch 0: test acc {history[0]['test_acc']:.4f}")
    t0 = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        tr = train_epochs(model, xtr, ytr, epochs=1, batch_size=args.batch_size, lr=args.lr,
                          seed=args.seed + epoch, optimizer=opt, progress=not args.quiet,
                          label=f"epoch {epoch}/{args.epochs}")
        history.append({"epoch": epoch, "train_loss": tr["loss"], "train_acc": tr["acc"], **scores()})
        val_text = f" val acc {history[-1]['val_acc']:.4f} |" if "val_acc" in history[-1] else ""
        print(f"epoch {epoch}: train loss {tr['loss']:.4f} acc {tr['acc']:.4f} |{val_text} test acc "
              f"{history[-1]['test_acc']:.4f}")
    config = {**vars(args), "task": None if args.data_path else args.task}
    result = {"config": config, "data": args.data_path or f"task {args.task}",
              "task": None if args.data_path else args.task, "num_classes": len(class_names),
              "class_names": class_names, "preprocess": pre.to_dict(), "splits": sizes,
              "skipped_images": data["skipped"], "skipped_files": data["bad"], "trainable_line": line,
              "trainable": trainable, "setup_s": setup_s, "train_s": time.perf_counter() - t0, "history": history,
              "final_test_acc": history[-1]["test_acc"]}
    if args.save_model:
        from common.export import save_model
        from common.methods import export

        plain = export(args.method, model)
        save_model(plain, args.save_model, model_name=args.model, class_names=class_names, preprocess=pre,
                   extra_meta={"method": args.method, "data": result["data"], "epochs": args.epochs,
                               "final-test-acc": result["final_test_acc"]})
        result["model_path"] = str(args.save_model)
        print(f"saved the merged model to {args.save_model} (load it with common.export.load_model)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return result


def fail(message: str):
    """A mistake in the user's model, weights or data: one line on stderr, exit code 2 (no usage text)."""
    print(f"finetune: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _method(text: str) -> str:
    """A registered method name; an older spelling (linear, full, lora) resolves to its registered name."""
    try:
        return resolve_method(text, METHODS)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("method ")) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer > 0, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be an integer > 0, got {value}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="embedded model (taskedge-vit-tiny, taskedge-resnet-tiny, taskedge-mobilenetv2-tiny; offline) or any timm model "
                        "name (default: %(default)s)")
    p.add_argument("--weights", default=None, help="local .safetensors/.pth state dict (offline pre-trained weights)")
    p.add_argument("--pretrained", action="store_true", help="download timm weights from the hub (needs network)")
    p.add_argument("--task", default=DEFAULT_TASK,
                   help="built-in generated task (default: %(default)s); decides classes and image size")
    p.add_argument("--data-path", default=None, help="your data instead of the built-in task: an ImageFolder (<class>/<images>, optionally under "
                        "train/ val/ test/) or a saved Hugging Face Dataset / DatasetDict (its splits are used)")
    p.add_argument("--method", type=_method, choices=METHODS, default="taskedge", metavar="METHOD",
                   help="; ".join(f"{m} = {REGISTERED[m].help}" for m in METHODS) + " (default: %(default)s)")
    p.add_argument("--lora-rank", type=_positive_int, default=8,
                   help="rank of fedlora's adapters; of B for taskedge-lora (default: %(default)s)")
    p.add_argument("--budget", type=float, default=_SELECTION["budget"],
                   help="TaskEdge budget: fraction of backbone params in (0, 1), or an integer entry count >= 1 "
                        "(default: %(default)s)")
    p.add_argument("--budget-per-neuron", type=float, default=None,
                   help="entries per output neuron; > 0 replaces --budget (the same meaning on every model size: "
                        "ViT-B/16 at 1 is the paper's 0.1 %%)")
    p.add_argument("--score", choices=SCORES, default=_SELECTION["score"],
                   help="importance score (default, from common/defaults.json: %(default)s)")
    p.add_argument("--allocation", choices=ALLOCATIONS, default=_SELECTION["allocation"],
                   help="neuron = k entries per output neuron, neuron-cap = the same with a per-column cap, "
                        "global = top entries overall (default: %(default)s)")
    p.add_argument("--save-dtype", choices=SAVE_DTYPES, default="float32",
                   help="precision of the activations kept for the sparse backward pass (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=5, help="training epochs, > 0 (default: %(default)s)")
    p.add_argument("--lr", type=float, default=None,
                   help="AdamW rate of the deltas / weights, >= 0; omitted or 0 = the method's tuned default "
                        "(common/defaults.json, shared with the federation)")
    p.add_argument("--head-lr", type=float, default=None,
                   help="AdamW rate of the dense head, >= 0; omitted or 0 = the method's tuned default")
    p.add_argument("--batch-size", type=int, default=64, help="training batch size, > 0 (default: %(default)s)")
    p.add_argument("--train-size", type=_positive_int, default=None,
                   help="training examples of the generated task (default: the task's full train split)")
    p.add_argument("--calib", type=int, default=256,
                   help="calibration examples for the importance pass, > 0 (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed, >= 0 (default: %(default)s)")
    p.add_argument("--threads", type=_positive_int, default=min(2, os.cpu_count() or 1),
                   help="torch CPU threads (default: %(default)s)")
    p.add_argument("--img-size", type=int, default=0,
                   help="input size; 0 = the model's own (timm's data config; embedded models: 32)")
    p.add_argument("--json", default="results/finetune.json", help="where to write the results (default: %(default)s)")
    p.add_argument("--save-model", default=None,
                   help="where to save the merged model with its classes and preprocessing ('' = not saved; "
                        "default: next to --json, <json stem>_model.safetensors)")
    p.add_argument("--quiet", action="store_true", help="no per-batch progress bar")
    return p


def validate(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The federation's rules (common.settings) for the shared options; p.error (exit code 2) names the option."""
    given = {key: getattr(args, opt) for opt, key in FEDERATION_RULES.items() if getattr(args, opt) is not None}
    try:
        parse_run_config(given)
    except ValueError as err:
        msg = str(err)
        for opt, key in FEDERATION_RULES.items():
            prefix = f"run config '{key}': "
            if msg.startswith(prefix):
                p.error(f"argument --{opt.replace('_', '-')}: {msg[len(prefix):]}")
        p.error(msg)
    from common import preflight

    args.data_path = args.data_path or None  # '' = the built-in task
    if args.img_size < 0:
        p.error(f"argument --img-size: must be >= 0, got {args.img_size}")
    for problem in (preflight.weights_file(args.weights, "--weights") if args.weights is not None else "",
                    preflight.data_path(args.data_path, "--data-path") if args.data_path is not None else ""):
        if problem:
            fail(f"argument {problem}")


def validate_names(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--task and --model need the registries (torch, timm): checked after the cheap checks."""
    from common.data.tasks import TASKS

    if args.task not in TASKS:
        p.error(f"argument --task: unknown task {args.task!r}; choose from {', '.join(sorted(TASKS))}")
    from common import preflight

    problem = preflight.model_name(args.model, "--model")
    if not problem and args.weights is not None:
        problem = preflight.model_fits(args.model, args.weights, args.img_size, "--weights", "--model")
    if problem:
        fail(f"argument {problem}")


def main(argv=None) -> dict:
    p = parser()
    args = p.parse_args(argv)
    validate(p, args)
    validate_names(p, args)
    if args.budget >= 1:
        args.budget = int(args.budget)
    if args.save_model is None:
        args.save_model = str(Path(args.json).with_name(Path(args.json).stem + "_model.safetensors")) if args.json else ""
    if not args.lr:
        args.lr = tuned.method_lr()[args.method]
    if not args.head_lr:
        args.head_lr = tuned.method_head_lr()[args.method]
    return run(args)


if __name__ == "__main__":
    main()
