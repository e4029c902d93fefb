"""The method registry: every fine-tuning method of the project under one name, declared once.

One vocabulary for the run config, `taskedge-finetune`, the centralised runs and every benchmark: the
names below. Older spellings that entry points used to accept (``linear``, ``full``, ``lora``,
``bn_head``, ``lora_dw``) are declared as aliases and resolved here, so a saved command keeps working
and nothing else in the code compares against them.

This module is metadata only (no torch, no Flower), so the run-config schema and `check_config` read
it at once; `common.methods` holds the builders, one per registered name (a test checks both agree).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodInfo:
    """One method: its name, one line of help, and what the code paths need to know about it.

    federated: has a wire form (`common.methods.get_arrays`), so a federation can run it.
    uses_mask: trains on the TaskEdge mask (the federation runs the statistics and mask phases first).
    optimizer: "adamw" (two AdamW groups, `common.train.make_optimizer`) or "galore" (GaLore's projected AdamW).
    aliases: older spellings resolved to `name`.
    """

    name: str
    help: str
    federated: bool = True
    uses_mask: bool = False
    optimizer: str = "adamw"
    aliases: tuple[str, ...] = ()


METHODS: dict[str, MethodInfo] = {m.name: m for m in (
    MethodInfo("taskedge", "sparse delta on the TaskEdge mask (k entries per output neuron) + dense head",
               uses_mask=True),
    MethodInfo("fedavg-full", "every weight (full fine-tuning)", aliases=("full",)),
    MethodInfo("fedlora", "HF peft LoRA (rank r, alpha 2r) on the same target modules + dense head",
               aliases=("lora",)),
    MethodInfo("taskedge-lora", "dW = M ⊙ (B A) on the TaskEdge mask, A frozen and shared by seed + dense head",
               uses_mask=True),
    MethodInfo("head-only", "the dense classifier head alone (a linear probe)", aliases=("linear",)),
    MethodInfo("bn-head", "normalisation layers (BatchNorm, or LayerNorm on a ViT) + head", federated=False,
               aliases=("bn_head",)),
    MethodInfo("bitfit", "every bias + head (BitFit)", federated=False),
    MethodInfo("dora", "HF peft DoRA (rank r) + head", federated=False),
    MethodInfo("galore", "every weight, with GaLore's low-rank projected optimizer state", federated=False,
               optimizer="galore"),
    MethodInfo("lora-dw", "peft LoRA also on depthwise convs at r = groups, the only rank peft accepts there "
               "(cost study)", federated=False, aliases=("lora_dw",)),
)}
FEDERATED_METHODS = tuple(n for n, m in METHODS.items() if m.federated)
MASK_METHODS = tuple(n for n, m in METHODS.items() if m.uses_mask)
ALIASES = {a: m.name for m in METHODS.values() for a in m.aliases}


def resolve_method(name: str, allowed: tuple[str, ...] | None = None) -> str:
    """The registered name of `name` (an alias resolved); a ValueError naming the allowed names otherwise."""
    allowed = tuple(METHODS) if allowed is None else allowed
    canonical = ALIASES.get(name, name)
    if canonical not in allowed:
        raise ValueError(f"method must be one of {', '.join(allowed)}; got {name!r}")
    return canonical


def method_info(name: str) -> MethodInfo:
    return METHODS[resolve_method(name)]


def methods_table() -> str:
    """The registry as the markdown table of docs/configuration.md (a test keeps the two equal)."""
    rows = ["| method | trains | federated | older spellings |", "|---|---|---|---|"]
    rows += [f"| `{m.name}` | {m.help.replace('|', chr(92) + '|')} | {'yes' if m.federated else 'no (centralised and cost studies)'} | "
             f"{', '.join(f'`{a}`' for a in m.aliases)} |" for m in METHODS.values()]
    return "\n".join(rows) + "\n"
