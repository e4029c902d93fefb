"""Sanity check of the embedded default: is the downstream task worth fine-tuning?

Sparse fine-tuning methods are only comparable on a task where training the
head alone (linear probe) is clearly worse than training everything (full
fine-tuning).  This script measures both on the embedded backbone, for the same
number of epochs, plus a linear probe fitted to convergence (L-BFGS logistic
regression on the frozen features), and prints one JSON line.  ``gap`` is full
fine-tuning minus the better of the two probes, in accuracy points.

    python -m benchmarks.probe_gap [--epochs 8]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
from torch import nn

from common.architectures import DEFAULT_MODEL
from common.backbones import embedded_backbone, embedded_info
from common.data.splits import make_split
from common.data.tasks import DEFAULT_TASK, get_task
from common.models import create_embedded


def _train(model, x, y, *, epochs: int, batch_size: int, lr: float, weight_decay: float, seed: int) -> None:
    """AdamW with a short warm-up and cosine decay, over the trainable parameters only."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    total = epochs * math.ceil(len(x) / batch_size)
    warmup = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / total))
    )
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = order[i : i + batch_size]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()


@torch.no_grad()
def _accuracy(model, x, y, batch_size: int = 500) -> float:
    model.eval()
    hits = sum((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum().item()
               for i in range(0, len(x), batch_size))
    return hits / len(x)


def _linear_probe(model, data, args) -> float:
    """Head only; the frozen backbone stays in eval mode (no dropout / BN updates)."""
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith("head.")
    model.eval()
    _train(model, *data["train"], epochs=args.epochs, batch_size=args.batch_size, lr=args.lp_lr,
           weight_decay=0.0, seed=args.seed)
    return _accuracy(model, *data["test"])


@torch.no_grad()
def _converged_linear_probe(model, data) -> float:
    """Best-effort linear probe: L-BFGS logistic regression on frozen features.

    Shows that the gap is not an artefact of training the head for only a few epochs.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    model.eval()
    feats = {s: torch.cat([model.forward_head(model.forward_features(x[i : i + 500]), pre_logits=True)
                           for i in range(0, len(x), 500)]).numpy() for s, (x, _) in data.items()}
    scaler = StandardScaler().fit(feats["train"])
    clf = LogisticRegression(max_iter=2000, C=1.0).fit(scaler.transform(feats["train"]), data["train"][1].numpy())
    return float(clf.score(scaler.transform(feats["test"]), data["test"][1].numpy()))


def _full_finetune(model, data, args) -> float:
    model.train()
    _train(model, *data["train"], epochs=args.epochs, batch_size=args.batch_size, lr=args.ft_lr,
           weight_decay=0.05, seed=args.seed)
    return _accuracy(model, *data["test"])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default=DEFAULT_TASK)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--ft-lr", type=float, default=2e-3, help="full fine-tuning learning rate")
    ap.add_argument("--lp-lr", type=float, default=0.1,
                    help="head-only learning rate: the frozen features are badly conditioned, so it must be large")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    weights = embedded_backbone(model=args.model)  # pre-trains once, then cached
    spec = get_task(args.task)
    data = {s: make_split(spec, s, seed=args.seed) for s in ("train", "test")}
    start = time.perf_counter()
    accs = {}
    for method, run in (("linear_probe_acc", _linear_probe), ("full_ft_acc", _full_finetune)):
        torch.manual_seed(args.seed)  # same fresh head for both methods
        accs[method] = run(create_embedded(spec.num_classes, model=args.model), data, args)
    frozen = create_embedded(spec.num_classes, model=args.model)
    accs["linear_probe_converged_acc"] = _converged_linear_probe(frozen, data)
    best_probe = max(accs["linear_probe_acc"], accs["linear_probe_converged_acc"])
    result = {  # accuracies and gap in percentage points
        **{k: round(100 * v, 2) for k, v in accs.items()},
        # conservative: against the better of the two probes, so a slow-converging head cannot inflate it
        "gap": round(100 * (accs["full_ft_acc"] - best_probe), 2),
        "gap_same_epochs": round(100 * (accs["full_ft_acc"] - accs["linear_probe_acc"]), 2),
        "seconds": round(time.perf_counter() - start, 1),
        "upstream_acc": round(100 * float(embedded_info(weights).get("upstream_test_acc", "nan")), 2),
        "task": spec.name,
        "model": args.model,
        "epochs": args.epochs,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
