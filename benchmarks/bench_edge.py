"""PEFT at the edge, measured: TaskEdge vs LoRA, DoRA, GaLore, BitFit, BN+head, linear probe and full FT.

Per (model, method) one training step (AdamW, cross-entropy, batch ``--batch``) of a randomly
initialised model (cost figures do not depend on the weights; no accuracy is measured here):

trainable, trainable_pct
    trainable scalars (adapter / delta entries + head), and as % of the base model's parameters.
peak_mb  (the simultaneous peak)
    ``benchmarks.profiling.step_live_peak``: the high-water mark of live tensor bytes over one step,
    run after a warm-up step — parameters + buffers + optimizer state (+ GaLore's projection
    matrices) + the input batch, plus every storage the step's aten ops create, added when created
    and removed when freed (saved activations, gradients as they accumulate, the temporaries of
    backward and of the optimizer step). Allocator-independent tensor bytes; not RSS.
retained_mb
    the older, additive accounting of ``benchmarks.profiling.step_memory`` (params + everything saved
    for backward + all gradients + optimizer state), for comparison; it ignores that saved tensors
    are freed during backward and misses transient temporaries.
flops  (per training step, ``benchmarks.flops.step_flops``)
    forward + backward + optimizer. torch's FlopCounterMode (2 FLOPs per MAC of matmuls / convs),
    with the grouped/depthwise conv weight gradient corrected by ``groups``, TaskEdge's sparse value
    gradient added analytically (2·T·E), and AdamW's elementwise update as 14 FLOPs per optimizer
    state element. ``flops_torch_raw`` is torch's uncorrected total (what the paper's kind of
    profiler reports). GaLore: its projection matmuls are counted; its SVD (every
    ``--galore-gap`` steps, not in the measured step) is not.
step_ms
    median / min / max wall time of ``--reps`` (>= 3) steps per method, methods interleaved
    round-robin (one warm-up step each), ``--threads`` torch threads.

Methods (``common.registry`` names, built by ``common.methods.build_calibrated``; the older spellings
``linear``, ``bn_head``, ``full``, ``lora``, ``lora_dw`` are accepted): ``head-only``, ``bn-head`` (normalisation
layers — BatchNorm, or LayerNorm on the ViT — plus head), ``bitfit`` (every bias plus head; the CNNs' convs
have no bias, so only the normalisation biases), ``fedavg-full``, ``fedlora`` / ``dora`` (HF peft, r=``--rank``,
on every Linear/Conv2d outside the head that peft accepts: depthwise convs are refused at r < groups and are
left frozen; ``lora-dw`` forces them in with r = groups on those layers — peft's only accepted rank — to show the
bloat), ``galore`` (galore-torch's GaLoreAdamW, rank ``--rank``, on every Linear/Conv2d weight
outside the head, conv gradients flattened to (C_out, C_in/g·k·k) by ``FlatGaLore``; the rest plain
AdamW in the same optimizer) and ``taskedge`` (budget ``--budget``, calibrated
on random batches, plus dense head).

Writes ``--json`` (default results/bench_edge.json) and ``--png`` (memory and FLOPs per method and
architecture). ``--quick``: one model, two methods, a few steps (the test runs it).

    nice -n 10 .venv/bin/python -m benchmarks.bench_edge
    nice -n 10 .venv/bin/python -m benchmarks.bench_edge --quick --json /tmp/q.json --png ''
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
from functools import partial
from pathlib import Path

import torch
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import baselines
from benchmarks import flops as flopslib
from benchmarks import profiling
from common.taskedge.config import TaskEdgeConfig
from common.models import create_model
from common.train import make_optimizer
from common.methods import build_calibrated
from common.registry import ALIASES, method_info
from common.taskedge.tuner import collect_norms, target_modules

MIB = profiling.MIB
METHODS = ("head-only", "bn-head", "bitfit", "fedavg-full", "fedlora", "lora-dw", "dora", "galore", "taskedge")  # common.registry
# (name, image size, constructor kwargs)
MODELS = {
    "taskedge-vit-tiny": (32, {}),
    "resnet18": (64, {}),
    "mobilenetv2_050": (64, {}),
    "taskedge-resnet-tiny": (32, {}),
    "taskedge-mobilenetv2-tiny": (32, {}),
}
DEFAULT_MODELS = ("taskedge-vit-tiny", "resnet18", "mobilenetv2_050")
MethodUnavailable = baselines.MethodUnavailable
FlatGaLore = baselines.FlatGaLore


# --- setup -------------------------------------------------------------------------------------

def make_model(name: str, num_classes: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(name, num_classes=num_classes, **MODELS.get(name, (0, {}))[1]).float()


def _depthwise_names(model: nn.Module) -> list[str]:
    return [n for n, m in target_modules(model, TaskEdgeConfig()).items() if isinstance(m, nn.Conv2d) and m.groups > 1]


def setup_method(method: str, args, model_name: str, calib, lrs: tuple[float, float] = (1e-3, 1e-3)):
    """(model, optimizer, trainable scalars, notes), built by `common.baselines` (the accuracy runs'
    code). Raises MethodUnavailable where it cannot run. ``lrs``: (body / adapter / delta, head)."""
    model = make_model(model_name, args.num_classes, args.seed)
    notes: dict = {}
    lr, head_lr = lrs
    if method_info(method).optimizer == "galore":
        opt = baselines.galore_optimizer(model, lr, head_lr, args.rank, args.galore_gap)
        model.train()
        return model, opt, sum(p.numel() for p in model.parameters()), {"galore_layers": len(opt.pairs)}
    # the registry's one build path; peft's head trains as a plain parameter (no modules_to_save copy)
    model, _mask = build_calibrated(method, model, TaskEdgeConfig(budget=args.budget, conv_grad=args.conv_grad),
                                    calib, args.rank, args.seed, save_head=False)
    if getattr(model, "peft_refused", 0):
        notes["peft_refused"] = model.peft_refused
    model.train()
    opt = make_optimizer(model, lr, weight_decay=0.01, head_lr=head_lr)  # AdamW's default decay, as before
    return model, opt, sum(p.numel() for p in model.parameters() if p.requires_grad), notes


def peft_depthwise_probe(model_name: str, args) -> list[dict]:
    """What HF peft does with each depthwise conv: refusal at r=--rank, adapter size at r=groups."""
    from peft import LoraConfig, get_peft_model

    model = make_model(model_name, args.num_classes, args.seed)
    mods = dict(model.named_modules())
    rows = []
    for name in _depthwise_names(model)[: args.dw_probe]:
        conv = mods[name]
        base = sum(p.numel() for p in conv.parameters())
        row = {"module": name, "shape": list(conv.weight.shape), "groups": conv.groups, "base_params": base}
        try:
            get_peft_model(make_model(model_name, args.num_classes, args.seed),
                           LoraConfig(r=args.rank, target_modules=[name]))
            row[f"r{args.rank}"] = "accepted"
        except Exception as e:  # noqa: BLE001 -- what peft says is the result
            row[f"r{args.rank}"] = f"{type(e).__name__}: {str(e)[:160]}"
        pm = get_peft_model(make_model(model_name, args.num_classes, args.seed),
                            LoraConfig(r=conv.groups, target_modules=[name]))
        row["adapter_params_at_r_groups"] = sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n)
        row["adapter_over_base"] = row["adapter_params_at_r_groups"] / base
        rows.append(row)
    return rows


# --- measuring ---------------------------------------------------------------------------------

def _batches(args, img: int):
    gen = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(args.batch, 3, img, img, generator=gen)
    y = torch.randint(0, args.num_classes, (args.batch,), generator=gen)
    calib = [(torch.randn(args.batch, 3, img, img, generator=gen), y) for _ in range(2)]
    return x, y, calib


def _extra_state(opt) -> int:
    return opt.projector_bytes() if isinstance(opt, FlatGaLore) else 0


def measure_static(method: str, args, model_name: str, x, y, calib) -> dict:
    """Memory and FLOPs of one step, one model alive at a time."""
    gc.collect()
    base_params = sum(p.numel() for p in make_model(model_name, args.num_classes, args.seed).parameters())
    model, opt, trainable, notes = setup_method(method, args, model_name, calib)
    profiling.train_step(model, opt, x, y)  # warm-up: optimizer state, index caches, GaLore projectors
    live = profiling.step_live_peak(model, opt, x, y, extra_state=_extra_state(opt))
    parts = profiling.step_memory(model, opt, x, y)
    parts["optim"] += _extra_state(opt)
    fl = flopslib.step_flops(model, opt, x, y)
    with torch.utils.flop_counter.FlopCounterMode(display=False) as raw:
        profiling.train_step(model, opt, x, y)
    row = {"trainable": int(trainable), "trainable_pct": 100.0 * trainable / base_params,
           "peak_mb": live["peak"] / MIB, "base_mb": live["base"] / MIB,
           "retained_mb": sum(parts.values()) / MIB, "retained_parts_mb": {k: v / MIB for k, v in parts.items()},
           "flops": fl, "gflops": fl["total"] / 1e9, "flops_torch_raw": int(raw.get_total_flops()), **notes}
    del model, opt
    gc.collect()
    return row


def measure_times(methods: list[str], args, model_name: str, x, y, calib) -> dict:
    steps = {}
    for m in methods:
        model, opt, _, _ = setup_method(m, args, model_name, calib)
        steps[m] = partial(profiling.train_step, model, opt, x, y)
    wall, _ = profiling.interleaved_times(steps, 1, args.reps)
    del steps
    gc.collect()
    return {m: {"step_ms": 1e3 * statistics.median(w), "step_ms_min": 1e3 * min(w), "step_ms_max": 1e3 * max(w)}
            for m, w in wall.items()}


def bench_model(model_name: str, methods: list[str], args) -> dict:
    img = MODELS.get(model_name, (args.img_size, {}))[0] or args.img_size
    x, y, calib = _batches(args, img)
    rows, ok = {}, []
    for m in methods:
        try:
            rows[m] = measure_static(m, args, model_name, x, y, calib)
            ok.append(m)
        except MethodUnavailable as e:
            rows[m] = {"unavailable": str(e)}
        print(f"[{model_name}] {m}: {rows[m]}", file=sys.stderr, flush=True)
    for m, t in measure_times(ok, args, model_name, x, y, calib).items():
        rows[m].update(t)
    out = {"img_size": img, "batch": args.batch,
           "base_params": sum(p.numel() for p in make_model(model_name, args.num_classes, args.seed).parameters()),
           "methods": rows}
    if args.importance_reps:
        model = make_model(model_name, args.num_classes, args.seed)
        cfg = TaskEdgeConfig(budget=args.budget)
        out["importance_pass"] = profiling.importance_pass_times(
            model, lambda: collect_norms(model, cfg, calib), calib, args.importance_reps)
        print(f"[{model_name}] importance pass: {out['importance_pass']}", file=sys.stderr, flush=True)
    if args.dw_probe and _depthwise_names(make_model(model_name, args.num_classes, args.seed)):
        out["peft_depthwise"] = peft_depthwise_probe(model_name, args)
    return out


# --- output ------------------------------------------------------------------------------------

def table(result: dict) -> str:
    """Markdown table (README text)."""
    lines = ["| model | method | trainable (%) | peak MiB | GFLOPs/step (torch raw) | step ms median [min–max] |",
             "|---|---|---|---|---|---|"]
    for model, mres in result["models"].items():
        for m, r in mres["methods"].items():
            if "unavailable" in r:
                lines.append(f"| {model} | {m} | — | — | — | not run: {r['unavailable']} |")
                continue
            lines.append(f"| {model} | {m} | {r['trainable']:,} ({r['trainable_pct']:.2f}%) | {r['peak_mb']:.1f} | "
                         f"{r['gflops']:.3f} ({r['flops_torch_raw'] / 1e9:.3f}) | "
                         f"{r['step_ms']:.1f} [{r['step_ms_min']:.1f}–{r['step_ms_max']:.1f}] |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(result["models"])
    methods = [m for m in METHODS if any(m in result["models"][k]["methods"] for k in models)]
    fig, axes = plt.subplots(1, 2, figsize=(13.5, 4.2))
    w = 0.8 / max(1, len(methods))
    for ax, key, label in ((axes[0], "peak_mb", "peak training tensor memory (MiB)"),
                           (axes[1], "gflops", "GFLOPs per training step (corrected)")):
        for i, m in enumerate(methods):
            vals = []
            for k in models:
                r = result["models"][k]["methods"].get(m, {})
                vals.append(r.get(key, 0.0) if "unavailable" not in r else 0.0)
            xs = [j + i * w for j in range(len(models))]
            ax.bar(xs, vals, w, label=m)
            if key == "gflops":  # torch's uncorrected count (grouped-conv weight gradient x groups)
                raw = [result["models"][k]["methods"].get(m, {}).get("flops_torch_raw", 0) / 1e9 for k in models]
                ax.scatter([x for x, r, v in zip(xs, raw, vals) if r > 1.05 * v > 0],
                           [r for r, v in zip(raw, vals) if r > 1.05 * v > 0], marker="x", color="k", s=18, zorder=3,
                           label="torch raw count" if i == 0 else None)
        ax.set_xticks([j + w * (len(methods) - 1) / 2 for j in range(len(models))])
        ax.set_xticklabels([f"{k}\n({result['models'][k]['img_size']}px, b{result['models'][k]['batch']})"
                            for k in models], fontsize=8)
        ax.set_ylabel(label)
        ax.set_yscale("log")
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("One AdamW training step, random init (cost only, no accuracy)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(DEFAULT_MODELS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--img-size", type=int, default=32, help="for models not in MODELS")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--rank", type=int, default=8, help="LoRA / DoRA / GaLore rank")
    p.add_argument("--galore-gap", type=int, default=200)
    p.add_argument("--budget", type=float, default=0.01, help="TaskEdge budget (fraction of backbone params)")
    p.add_argument("--conv-grad", default="auto", choices=("auto", "sparse", "dense"),
                   help="TaskEdge's conv value gradient (TaskEdgeConfig.conv_grad)")
    p.add_argument("--reps", type=int, default=5, help="timed steps per method (>= 3)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dw-probe", type=int, default=3, help="depthwise convs probed with peft (0 = off)")
    p.add_argument("--importance-reps", type=int, default=5,
                   help="TaskEdge statistics pass vs plain forward, interleaved reps (0 = off)")
    p.add_argument("--quick", action="store_true", help="one model, two methods, 3 reps")
    p.add_argument("--json", default="results/bench_edge.json")
    p.add_argument("--png", default="results/bench_edge.png", help="'' = no figure")
    a = p.parse_args(argv)
    if a.quick:
        a.models, a.methods, a.reps, a.batch, a.dw_probe = "taskedge-mobilenetv2-tiny", "fedavg-full,taskedge", 3, 4, 1
        a.importance_reps = 0
    if a.reps < 3:
        p.error("--reps must be >= 3")
    return a


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    methods = [ALIASES.get(m.strip(), m.strip()) for m in args.methods.split(",") if m.strip()]
    bad = set(methods) - set(METHODS)
    if bad:
        raise SystemExit(f"unknown method(s) {sorted(bad)}; choose from {METHODS}")
    res = {"models": {}, "settings": {
        "batch": args.batch, "rank": args.rank, "budget": args.budget, "conv_grad": args.conv_grad, "reps": args.reps,
        "threads": args.threads,
        "galore_gap": args.galore_gap, "optimizer": "AdamW lr 1e-3", "init": "random (cost figures only)",
        "torch": torch.__version__, "loadavg_start": os.getloadavg()[0],
        "memory": "simultaneous peak of live tensor bytes over one step (benchmarks.profiling.step_live_peak)",
        "flops": "benchmarks.flops.step_flops: torch FlopCounterMode, grouped-conv weight grad / groups, "
                 "TaskEdge value grad 2*T*E, AdamW 14/state element; SVD not counted"}}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        res["models"][name] = bench_model(name, methods, args)
    res["settings"]["loadavg_end"] = os.getloadavg()[0]
    return res


def main(argv=None) -> dict:
    args = parse_args(argv)
    res = run(args)
    text = table(res)
    res["table_md"] = text
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    if args.png and res["models"]:
        plot(res, Path(args.png))
    return res


if __name__ == "__main__":
    main()
