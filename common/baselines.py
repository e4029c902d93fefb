"""The edge-PEFT baselines TaskEdge is measured against (no Flower): BN + head, BitFit, peft LoRA/DoRA
and GaLore, built on the same pre-trained model and target modules as TaskEdge.

Shared by the cost benchmark (`benchmarks/bench_edge.py`) and the accuracy runs
(`benchmarks/central.py`), so a number in either comes from the same model. LoRA and DoRA are HF
peft's; GaLore is galore-torch's optimizer. Written here only: the choice of which parameters a
baseline trains, the peft target list (peft refuses depthwise convs unless the rank is a multiple of
the channels: those stay frozen and are counted) and a small wrapper that gives galore-torch 2-D
views of conv weights (it projects 2-D gradients only).
"""
from __future__ import annotations

import importlib.util
import sys
import types

import torch
from torch import nn

from common.taskedge.config import TaskEdgeConfig
from common.taskedge.tuner import find_head, target_modules

NORMS = (nn.BatchNorm2d, nn.BatchNorm1d, nn.LayerNorm, nn.GroupNorm)
# head + a few parameters (common.registry names): which parameters each trains besides the head
FEW_PARAM_METHODS = ("head-only", "bn-head", "bitfit")


class MethodUnavailable(RuntimeError):
    """A method cannot be set up for this model (a result to record, not a crash)."""


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    head = find_head(model)
    return list(model.get_submodule(head).parameters()) if head else []


def train_only(model: nn.Module, method: str) -> nn.Module:
    """Freeze everything but what `method` trains: the head, plus the normalisation layers (bn-head:
    BatchNorm, or LayerNorm on a ViT) or every bias (bitfit; convs followed by BN have none, so on
    the CNNs that is the normalisation biases); `fedavg-full` trains everything. In place."""
    if method not in FEW_PARAM_METHODS + ("fedavg-full",):
        raise ValueError(f"unknown method {method!r}; allowed: {FEW_PARAM_METHODS + ('fedavg-full',)}")
    model.requires_grad_(method == "fedavg-full")
    for p in head_parameters(model):
        p.requires_grad_(True)
    if method == "bn-head":
        for m in model.modules():
            if isinstance(m, NORMS):
                m.requires_grad_(True)
    if method == "bitfit":
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.requires_grad_(True)
    return model


def peft_targets(model: nn.Module, r: int, config: TaskEdgeConfig | None = None) -> tuple[list[str], list[str]]:
    """(accepted, refused): TaskEdge's target modules under `config` (default: every Linear/Conv2d
    outside the head); peft refuses a grouped conv whose `groups` does not divide r."""
    mods = target_modules(model, config or TaskEdgeConfig())
    refused = [n for n, m in mods.items() if isinstance(m, nn.Conv2d) and m.groups > 1 and r % m.groups]
    return [n for n in mods if n not in refused], refused


def peft_lora(model: nn.Module, r: int, *, dora: bool = False, seed: int = 0, save_head: bool = True,
              force_grouped: bool = False, config: TaskEdgeConfig | None = None):
    """HF peft LoRA (or DoRA) of rank r, alpha 2r, on TaskEdge's target modules; the head trains
    densely (`modules_to_save`, so peft's state dict carries it). Grouped convs peft refuses stay
    frozen (their count is `model.peft_refused`); `force_grouped` adds them at r = groups, the only
    rank peft accepts there, to show the cost."""
    from peft import LoraConfig, get_peft_model

    names, refused = peft_targets(model, r, config)
    rank_pattern = {}
    if force_grouped:
        if not refused:
            raise MethodUnavailable("no depthwise/grouped convs in this model")
        mods = dict(model.named_modules())
        rank_pattern = {f"^{n}$": mods[n].groups for n in refused}
        names, refused = names + refused, []
    head = find_head(model, config.head if config else None)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        out = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=names, lora_dropout=0.0,
                                               use_dora=dora, rank_pattern=rank_pattern,
                                               modules_to_save=[head] if head and save_head else None))
    if head and not save_head:
        for p in head_parameters(out.get_base_model()):
            p.requires_grad_(True)
    out.peft_refused = len(refused)
    return out


def load_galore_adamw():
    """galore-torch's GaLoreAdamW. The 1.0 wheel's package ``__init__`` imports its 8-bit optimizer,
    which needs bitsandbytes (not installed, and unused); the package is loaded without running that
    ``__init__`` so that ``galore_torch.adamw`` imports on its own. MethodUnavailable if missing."""
    if "galore_torch" not in sys.modules:
        spec = importlib.util.find_spec("galore_torch")
        if spec is None:
            raise MethodUnavailable("galore-torch is not installed (pip install --no-deps galore-torch)")
        try:
            import galore_torch  # noqa: F401
        except ImportError:
            sys.modules.pop("galore_torch", None)
            pkg = types.ModuleType("galore_torch")
            pkg.__path__, pkg.__spec__ = list(spec.submodule_search_locations), spec
            sys.modules["galore_torch"] = pkg
    from galore_torch.adamw import AdamW
    return AdamW


class FlatGaLore:
    """GaLoreAdamW on 2-D views of conv weights: galore-torch 1.0 projects 2-D gradients only (a 4-D
    conv gradient fails in ``diag()``). Each weight gets a 2-D parameter that *shares its storage*,
    shape (C_out, C_in/g·k·k); before every step its ``.grad`` is the flattened view of the real
    gradient, and the optimizer's in-place update lands in the real weight. Other parameters go to
    plain AdamW groups of the same optimizer. Exposes zero_grad / step / state / param_groups."""

    def __init__(self, galore_params, other_params, lr, rank, gap, scale=0.25):
        AdamW = load_galore_adamw()
        self.pairs = [(p, nn.Parameter(p.detach().view(p.shape[0], -1))) for p in galore_params]
        groups = [{"params": [s for _, s in self.pairs], "rank": rank, "update_proj_gap": gap, "scale": scale,
                   "proj_type": "std"}]
        other_params = list(other_params)
        if other_params and isinstance(other_params[0], dict):  # parameter groups
            groups = other_params + groups
        elif other_params:
            groups.insert(0, {"params": other_params})
        self.inner = AdamW(groups, lr=lr, weight_decay=0.0, no_deprecation_warning=True)

    @property
    def state(self):
        return self.inner.state

    @property
    def param_groups(self):
        return self.inner.param_groups

    def zero_grad(self, set_to_none: bool = True):
        self.inner.zero_grad(set_to_none=set_to_none)
        for p, _ in self.pairs:
            p.grad = None

    def step(self):
        for p, s in self.pairs:
            s.grad = None if p.grad is None else p.grad.view(s.shape)
        self.inner.step()
        for _, s in self.pairs:
            s.grad = None

    def projector_bytes(self) -> int:
        """Bytes of the projection matrices (held in the state as objects, not tensors)."""
        n = 0
        for st in self.inner.state.values():
            m = getattr(st.get("projector"), "ortho_matrix", None)
            if torch.is_tensor(m):
                n += m.numel() * m.element_size()
        return n


def galore_optimizer(model: nn.Module, lr: float, head_lr: float, rank: int, gap: int = 200) -> FlatGaLore:
    """Full fine-tuning with GaLore on every target weight (rank `rank`, projection refreshed every
    `gap` steps); all other parameters plain AdamW, the head at `head_lr`. Trains the model in place."""
    gal = [m.weight for m in target_modules(model, TaskEdgeConfig()).values()]
    gal_ids = set(map(id, gal))
    head_ids = set(map(id, head_parameters(model)))
    model.requires_grad_(True)
    others = [p for p in model.parameters() if id(p) not in gal_ids]
    groups = [{"params": [p for p in others if id(p) not in head_ids], "lr": lr},
              {"params": [p for p in others if id(p) in head_ids], "lr": head_lr}]
    return FlatGaLore(gal, [g for g in groups if g["params"]], lr, rank, gap)
