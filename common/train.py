"""Plain training / evaluation loops over in-memory tensors (no Flower): shared by every entry point."""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW over the trainable tensors only: optimizer state exists for values + head, nothing dense."""
    params = trainable_parameters(model)
    if not params:
        raise ValueError("the model has no trainable parameters; apply a mask or unfreeze a head first")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool, seed: int = 0):
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(len(x))
    for s in range(0, len(x), batch_size):
        sel = order[s:s + batch_size]
        yield x[sel], y[sel]


def train_epochs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, batch_size: int,
                 lr: float, seed: int = 0, optimizer: torch.optim.Optimizer | None = None,
                 progress: bool = False, weight_decay: float = 0.0) -> dict[str, float]:
    """Cross-entropy training; returns the mean loss and accuracy of the last epoch."""
    if len(x) == 0:
        return {"loss": 0.0, "acc": 0.0, "examples": 0}
    opt = optimizer or make_optimizer(model, lr, weight_decay)
    model.train()
    loss_sum = correct = seen = 0.0
    for epoch in range(epochs):
        loss_sum = correct = seen = 0.0
        it = batches(x, y, batch_size, shuffle=True, seed=seed * 1000 + epoch)
        if progress:
            it = tqdm(it, total=(len(x) + batch_size - 1) // batch_size, desc=f"epoch {epoch + 1}/{epochs}", leave=False)
        for xb, yb in it:
            opt.zero_grad(set_to_none=True)
            out = model(xb)
            loss = nn.functional.cross_entropy(out, yb)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(xb)
            correct += float((out.detach().argmax(1) == yb).sum())
            seen += len(xb)
    return {"loss": loss_sum / seen, "acc": correct / seen, "examples": int(len(x))}


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
