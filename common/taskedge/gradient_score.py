"""A gradient-informed reference score (GPS-style): |sum of dL/dW over the calibration set|.

TaskEdge's score |W|·‖X_j‖ never looks at the labels. This reference asks the loss instead: one
backward pass per calibration batch through the frozen backbone gives, for every target weight,
the first-order change of the task loss if that entry moved, and the entries with the largest
|Σ dL/dW| are the ones a few steps of training would move most (the idea behind GPS, Zhang et al.
2024, which picks the top-|gradient| inputs of every neuron). Used with the same allocations as
the other scores (neuron-level top-k per row by default), so it is compared at equal entries.

Why a probe first: the downstream head is fresh (random), and the gradient through a random head
says more about that head than about the task. The head is therefore first fitted as a linear
probe on the calibration features (`probe_steps` Adam steps on cached features; cheap), and the
gradients are taken through the fitted head. GPS avoids the same problem with a contrastive loss.

In a federation every node sends its signed sums (`signed=True`, each through its own probe of
its own calibration data) in the statistics round and the server takes |Σ_nodes| — exact for
the pooled calibration loss up to the nodes' different probes. It costs one dense upload per node
once, of the target weights only (float32: autograd accumulates in float32, so float64 would only
double the bytes), which is why it is opt-in there. The sums are sums: SecAgg+ and the DP
statistics release carry them like the activation statistics (common.privacy `grad_contribution`:
each node's sums / calib-size clipped to `grad-clip-norm`; server/privacy.py). With N:M the base
weights are pruned by Wanda's |W|·‖X‖ from the pooled statistics (`tuner.prune_score`) and the
gradient picks the trainable entries among the kept ones.
Hand-written because no library exposes GPS's selection; the code is one probe fit and one
accumulation loop.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn import functional as F


def _fit_probe(model: nn.Module, head: nn.Module, xs: list[torch.Tensor], ys: list[torch.Tensor],
               steps: int, lr: float) -> None:
    """Fit `head` (in place) on the frozen backbone's features of the calibration batches."""
    with torch.no_grad():
        feats = torch.cat([model.forward_head(model.forward_features(x), pre_logits=True) for x in xs])
    y = torch.cat(ys)
    params = [p for p in head.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(head(feats), y).backward()
        opt.step()


def calibration_gradients(model: nn.Module, modules: dict[str, nn.Module], head_name: str | None,
                          batches: Iterable, probe_steps: int = 100, probe_lr: float = 1e-2,
                          signed: bool = False) -> dict[str, torch.Tensor]:
    """|Σ_batches dL/dW| for every module in `modules` (names as in `model`), as (rows, width) float32;
    with `signed` the sums themselves (float32, as accumulated), for a server to add up over nodes.

    `batches` yields (x, y) pairs. The model itself is not modified (a copy is probed and differentiated).
    """
    pairs = [(b[0], b[1]) for b in batches if isinstance(b, (tuple, list)) and len(b) >= 2]
    if not pairs:
        raise ValueError("score='gradient' needs labelled calibration batches: an iterable of (x, y) pairs")
    work = copy.deepcopy(model).eval()
    for p in work.parameters():
        p.requires_grad_(False)
    if head_name and probe_steps > 0 and hasattr(work, "forward_features") and hasattr(work, "forward_head"):
        head = work.get_submodule(head_name)
        _fit_probe(work, head, [x for x, _ in pairs], [y for _, y in pairs], probe_steps, probe_lr)
        for p in head.parameters():
            p.requires_grad_(False)
    targets = {name: work.get_submodule(name) for name in modules}
    for mod in targets.values():
        mod.weight.requires_grad_(True)
    for x, y in pairs:
        F.cross_entropy(work(x), y, reduction="sum").backward()  # .grad accumulates over the batches
    if signed:
        return {name: mod.weight.grad.detach().reshape(mod.weight.shape[0], -1).float() for name, mod in targets.items()}
    return {name: mod.weight.grad.detach().abs().reshape(mod.weight.shape[0], -1).float()
            for name, mod in targets.items()}

