"""Plain training / evaluation loops over in-memory tensors (no Flower): shared by every entry point."""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)

# Attribute a method's model may carry (set by `common.methods.method_model`): the head's learning
# rate, used when a caller does not pass `head_lr` itself.
HEAD_LR_ATTR = "taskedge_head_lr"


def head_parameters(model: nn.Module, head: str | None = None) -> list[nn.Parameter]:
    """Trainable parameters of the classifier head (also inside a peft model's `modules_to_save`)."""
    from common.taskedge.tuner import find_head

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = find_head(base, head)
    if name is None:
        return []
    return [p for p in base.get_submodule(name).parameters() if p.requires_grad]


def param_groups(model: nn.Module, lr: float, head_lr: float | None = None, head: str | None = None) -> list[dict]:
    """Two AdamW groups: everything trainable but the head at `lr` (sparse values, adapters or full
    weights), the dense head at `head_lr` (None: `lr`). Empty groups are left out."""
    params = trainable_parameters(model)
    if not params:
        raise ValueError("the model has no trainable parameters; apply a mask or unfreeze a head first")
    if head_lr is None:
        return [{"params": params, "lr": lr, "name": "all"}]
    head_ids = {id(p) for p in head_parameters(model, head)}
    groups = [{"params": [p for p in params if id(p) not in head_ids], "lr": lr, "name": "body"},
              {"params": [p for p in params if id(p) in head_ids], "lr": head_lr, "name": "head"}]
    return [g for g in groups if g["params"]]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0,
                   head_lr: float | None = None) -> torch.optim.Optimizer:
    """AdamW over the trainable tensors only: optimizer state exists for values + head, nothing dense.

    `head_lr` (default: the model's `taskedge_head_lr` attribute, else `lr`) is the head's rate."""
    if head_lr is None:
        head_lr = getattr(model, HEAD_LR_ATTR, None)
    return torch.optim.AdamW(param_groups(model, lr, head_lr), lr=lr, weight_decay=weight_decay)


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool, seed: int = 0):
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(len(x))
    for s in range(0, len(x), batch_size):
        sel = order[s:s + batch_size]
        yield x[sel], y[sel]


def train_epochs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, batch_size: int,
                 lr: float, seed: int = 0, optimizer: torch.optim.Optimizer | None = None,
                 progress: bool = False, weight_decay: float = 0.0, head_lr: float | None = None,
                 label: str | None = None) -> dict[str, float]:
    """Cross-entropy training; returns the mean loss and accuracy of the last epoch (`label`: the progress
    bar's text, for callers that run one epoch at a time).

    A model with BatchNorm drops a training batch of one example (the shuffled epoch's last batch when
    len(x) % batch_size == 1): BatchNorm cannot take batch statistics of one value per channel (it raises
    once the spatial size is 1 x 1), and one example's step is noise anyway; the loss and accuracy count
    the examples trained on. `batch_size=1` with BatchNorm is refused (ValueError). Evaluation is
    unaffected (eval mode uses the running statistics)."""
    if len(x) == 0:
        return {"loss": 0.0, "acc": 0.0, "examples": 0}
    skip_single = any(isinstance(m, BATCH_NORMS) for m in model.modules())
    if skip_single and batch_size == 1 and len(x) > 1:
        raise ValueError("batch size 1 with a BatchNorm model: BatchNorm needs at least 2 examples per training "
                         "batch; use a batch size >= 2")
    opt = optimizer or make_optimizer(model, lr, weight_decay, head_lr)
    model.train()
    steps = len(x) // batch_size + int(len(x) % batch_size > int(skip_single))
    loss_sum = correct = seen = 0.0
    for epoch in range(epochs):
        loss_sum = correct = seen = 0.0
        it = batches(x, y, batch_size, shuffle=True, seed=seed * 1000 + epoch)
        if progress:
            it = tqdm(it, total=steps, desc=label or f"epoch {epoch + 1}/{epochs}",
                      leave=False)
        for xb, yb in it:
            if skip_single and len(xb) == 1:
                continue
            opt.zero_grad(set_to_none=True)
            out = model(xb)
            loss = nn.functional.cross_entropy(out, yb)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(xb)
            correct += float((out.detach().argmax(1) == yb).sum())
            seen += len(xb)
    return {"loss": loss_sum / max(seen, 1), "acc": correct / max(seen, 1), "examples": int(len(x))}


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> dict[str, float]:
    model.eval()
    loss_sum = correct = 0.0
    for xb, yb in batches(x, y, batch_size, shuffle=False):
        out = model(xb)
        loss_sum += float(nn.functional.cross_entropy(out, yb, reduction="sum"))
        correct += float((out.argmax(1) == yb).sum())
    n = max(len(x), 1)
    return {"loss": loss_sum / n, "acc": correct / n, "examples": int(len(x))}
