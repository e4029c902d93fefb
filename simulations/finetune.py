"""Centralised TaskEdge fine-tuning (no Flower): the single-device path of the project.

    python -m simulations.finetune                      # embedded offline default
    python -m simulations.finetune --method linear      # head only (linear probe)
    python -m simulations.finetune --model vit_small_patch16_224 --weights vit_s.safetensors --data-path ./my_folder

Prints the trainable parameters, per-epoch held-out accuracy, and writes a results JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from common.config import TaskEdgeConfig
from common.data import get_task, load_image_folder, make_split
from common.models import DEFAULT_MODEL, EMBEDDED_MODELS, create_embedded, create_model
from common.train import batches, evaluate, make_optimizer, train_epochs
from common.tuner import find_head, get_taskedge_model, mark_trainable, print_trainable_parameters

METHODS = ("taskedge", "linear", "full")


def build_model(args, num_classes: int) -> torch.nn.Module:
    if args.model in EMBEDDED_MODELS and args.weights is None:
        return create_embedded(num_classes, model=args.model)
    return create_model(args.model, num_classes=num_classes, pretrained=args.pretrained, weights=args.weights)


def load_data(args):
    spec = get_task(args.task)
    if args.data_path:
        x, y = load_image_folder(args.data_path)
        n_test = max(1, len(x) // 5)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))
        te, tr = perm[:n_test], perm[n_test:]
        return (x[tr], y[tr]), (x[tr[:args.calib]], y[tr[:args.calib]]), (x[te], y[te]), int(y.max()) + 1
    train = make_split(spec, "train", n=args.train_size, seed=args.seed)
    calib = make_split(spec, "calib", n=args.calib, seed=args.seed)
    test = make_split(spec, "test", seed=args.seed)
    return train, calib, test, spec.num_classes


def prepare(model, args, calib):
    """Make the requested parameters trainable; returns the TaskEdge mask (or None)."""
    head = find_head(model)
    if args.method == "taskedge":
        cfg = TaskEdgeConfig(budget=args.budget, score=args.score, allocation=args.allocation,
                             save_dtype=args.save_dtype, seed=args.seed)
        _, mask = get_taskedge_model(model, cfg, batches(*calib, batch_size=args.batch_size, shuffle=False))
        return mask
    if args.method == "linear":
        mark_trainable(model, head)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    return None


def run(args) -> dict:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    (xtr, ytr), calib, (xte, yte), num_classes = load_data(args)
    model = build_model(args, num_classes)
    t0 = time.perf_counter()
    prepare(model, args, calib)
    setup_s = time.perf_counter() - t0
    line = print_trainable_parameters(model) if args.method == "taskedge" else None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"method={args.method} trainable tensors={trainable:,}")
    opt = make_optimizer(model, args.lr)
    history = [{"epoch": 0, **{f"test_{k}": v for k, v in evaluate(model, xte, yte).items()}}]
    print(f"epoch 0: test acc {history[0]['test_acc']:.4f}")
    t0 = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        tr = train_epochs(model, xtr, ytr, epochs=1, batch_size=args.batch_size, lr=args.lr,
                          seed=args.seed + epoch, optimizer=opt, progress=not args.quiet)
        te = evaluate(model, xte, yte)
        history.append({"epoch": epoch, "train_loss": tr["loss"], "train_acc": tr["acc"],
                        "test_loss": te["loss"], "test_acc": te["acc"]})
        print(f"epoch {epoch}: train loss {tr['loss']:.4f} acc {tr['acc']:.4f} | test acc {te['acc']:.4f}")
    result = {"config": vars(args), "trainable_line": line, "trainable": trainable, "setup_s": setup_s,
              "train_s": time.perf_counter() - t0, "history": history, "final_test_acc": history[-1]["test_acc"]}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return result


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="embedded model or any timm model name")
    p.add_argument("--weights", default=None, help="local .safetensors/.pth state dict (offline pre-trained weights)")
    p.add_argument("--pretrained", action="store_true", help="download timm weights from the hub (needs network)")
    p.add_argument("--task", default="shapes-downstream")
    p.add_argument("--data-path", default=None, help="local image folder / saved HF dataset instead of the embedded task")
    p.add_argument("--method", choices=METHODS, default="taskedge")
    p.add_argument("--budget", type=float, default=0.01, help="fraction of backbone params (<1) or entry count (>=1)")
    p.add_argument("--score", default="taskedge")
    p.add_argument("--allocation", default="neuron")
    p.add_argument("--save-dtype", default="float32")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=None, help="default: 1e-2 taskedge/linear, 1e-3 full")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument("--calib", type=int, default=256, help="calibration examples for the importance pass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--json", default="results/finetune.json")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    if args.budget >= 1:
        args.budget = int(args.budget)
    if args.lr is None:
        args.lr = 1e-3 if args.method == "full" else 1e-2
    return run(args)


if __name__ == "__main__":
    main()
