"""Training-step time and memory: frozen floor vs TaskEdge vs LoRA vs full fine-tuning.

One process, one model architecture (re-created from the same seed for every method, random
init, no downloads), one fixed batch. For each method:

* ``floor``    frozen backbone, backprop to the input only (``x.requires_grad_(True)``, no
               parameter requires grad): the cost of a backward pass with no weight gradients.
The registered methods are built by ``common.methods.build_calibrated`` (one build path for every entry
point; older spellings ``lora`` / ``full`` are accepted for ``fedlora`` / ``fedavg-full``):

* ``taskedge`` budget ``--budget`` (default 0.001), score "taskedge", calibration on
               ``--calib-batches`` batches, + dense head, AdamW.
* ``fedlora``  HF peft LoRA r=8 on the modules TaskEdge wraps + dense head, AdamW (grouped /
               depthwise convs that peft rejects at r=8 are left frozen).
* ``fedavg-full``  every parameter trainable, AdamW.
* ``floor-stem``  (opt-in) the floor with the backward stopped at the output of the first Conv2d /
               Linear (a forward hook makes that output the leaf): no input gradient of the stem,
               which TaskEdge does not compute either (it trains the stem's entries but needs no
               gradient of the image). A timing reference only: how much of the floor is the
               image gradient (on ViT-B at 64 px the 16x16/16 patch conv's input gradient).
* ``taskedge-lora``  (opt-in: ``--methods ...,taskedge-lora``): dW = M ⊙ (B A)
               with A frozen, on a TaskEdge mask of ``--te-lora-budget`` (default 0.004, ~4 entries per
               row on ViT-B) at rank ``--te-lora-rank`` (default 1: rows x 1 trainable, about plain
               TaskEdge's 0.1 % count) + dense head, AdamW.

step_s
    Wall time of a whole training step (zero_grad, forward, cross-entropy, backward, optimizer
    step): the median over ``--reps`` repetitions of the median of ``--steps`` steps (after
    ``--warmup`` warm-up steps before the first repetition). All methods are set up side by side
    and their steps interleaved round-robin in every repetition, so that load from other
    processes on a shared machine hits every method alike (the memory figures come from a
    separate, sequential pass, one model alive at a time).
peak_mb  (tensor memory; what ``mem_ratio`` compares)
    Accounted tensor footprint of one training step, in MiB:
        parameters + buffers                      (every storage of the model, once)
      + tensors saved for backward                (``torch.autograd.graph.saved_tensors_hooks``
                                                   on one extra, untimed step; de-duplicated by
                                                   storage ``data_ptr``, counting the whole
                                                   storage a view keeps alive; storages that are
                                                   parameters/buffers are not counted again)
      + gradients                                 (``.grad`` of the trainable parameters and,
                                                   for the floor, of the input)
      + optimizer state                           (AdamW exp_avg / exp_avg_sq / step).
    It is a deterministic, allocator-independent count of what the step must keep alive, not a
    sampled high-water mark: transient temporaries inside one op (e.g. the gradient buffers of
    the backward) are not in it. The same rules are applied to every method.
peak_rss_mb
    Process peak RSS for reference only. Before each method the kernel's high-water mark is
    reset (``/proc/self/clear_refs`` = 5, Linux >= 4.0) and ``VmHWM`` read afterwards; where
    that is impossible it falls back to ``resource.getrusage(...).ru_maxrss``, which is monotone
    over the process (then only the first method's value is its own). RSS includes the Python
    interpreter, torch, allocator caching and the input batch.
step_ratio / step_ratio_min / step_ratio_max / step_ratio_reps
    Per repetition, the method's median step over the floor's median step of the same
    repetition; ``step_ratio`` is the median of those ``--reps`` ratios (default 3), min / max
    their range, ``step_ratio_reps`` all of them (so one noisy repetition cannot decide it).
mem_ratio
    ``peak_mb`` / floor's ``peak_mb``.
trainable
    Number of trainable scalars (TaskEdge: delta entries + head).

``importance_pass`` times TaskEdge's calibration statistics pass (``collect_norms``: forward
pre-hooks that accumulate per-feature squared sums, under no_grad) against a plain no_grad
forward over the same calibration batches (median of ``--calib-repeats`` runs each).

Beside the per-method schema the JSON carries ``timing_detail`` (per method: fastest step,
median process-CPU time per step and both as ratios to the floor, all step times per repetition,
and with ``floor-stem`` run the step ratios against it) and
``settings`` (image size, save dtype, threads, load average at start/end, ...). On a shared,
loaded machine two-thread wall-clock steps stall whenever a worker thread is descheduled
(each parallel op waits for it), which penalises methods with more (small) ops; compare
``--threads 1`` runs (``timing_detail.cpu_ratio``) or set ``OMP_WAIT_POLICY=PASSIVE`` there.

``--conv-micro`` instead times the value gradient alone of depthwise 3x3 / 5x5 convs
(MobileNet-style shapes, one trainable entry per channel) with ``conv_grad`` "sparse"
(SparseDeltaConv2d's flat gather over kernel offsets) vs "dense" (torch's dense weight
gradient, then a gather), interleaved, and writes {"conv_micro": [...]}.

The measuring itself (the accounting rules above, RSS, interleaved timing) is ``benchmarks.profiling``,
tested on hand-computed byte counts; this entry point sets up the methods and writes the JSON.

Default model: ``vit_base_patch16_224`` at img_size=64, batch 32, 2 threads (the issue's
reference prototype; ~4 min on 2 idle cores with the default 3 repetitions x 5 steps, much
longer on a loaded box; ``--model vit_small_patch16_224`` is ~4x faster; the embedded
``taskedge-vit-tiny`` works too).
``--model-kwargs`` passes extra ``timm.create_model`` arguments (e.g. '{"depth": 2}'). Example:

    python -m benchmarks.bench_step --methods floor,taskedge,fedlora,fedavg-full,floor-stem --json results/bench_step.json
    python -m benchmarks.bench_step --model resnet18 --img-size 64 --methods floor,taskedge,fedlora,fedavg-full,floor-stem \
        --json results/bench_step_conv.json
    python -m benchmarks.bench_step --save-dtype bfloat16 --json results/bench_vitb_bf16.json
    python -m benchmarks.bench_step --model mobilenetv3_small_100 --img-size 64
    python -m benchmarks.bench_step --conv-micro
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

if __package__ in (None, ""):  # `python benchmarks/bench_step.py` from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import profiling  # noqa: E402
from common.taskedge.config import TaskEdgeConfig  # noqa: E402
from common.models import create_model  # noqa: E402
from common.methods import build_calibrated  # noqa: E402
from common.registry import ALIASES  # noqa: E402
from common.taskedge.tuner import collect_norms, target_modules  # noqa: E402

# floor / floor-stem: the frozen model's step (the baselines of the ratios); the others are registered methods
METHODS = ("floor", "taskedge", "fedlora", "fedavg-full", "taskedge-lora", "floor-stem")
DEFAULT_METHODS = ("floor", "taskedge", "fedlora", "fedavg-full")
MIB = profiling.MIB
CONV_SHAPES = [  # (batch, channels, input size, kernel, stride): depthwise layers of MobileNet-style nets
    (32, 16, 32, 3, 2), (32, 72, 16, 3, 2), (32, 88, 8, 3, 1), (32, 96, 8, 5, 2), (32, 240, 4, 5, 1),
    (32, 576, 4, 5, 2), (32, 576, 2, 5, 1), (32, 144, 56, 3, 1), (32, 384, 14, 3, 1), (32, 960, 7, 3, 1),
]


def make_model(args) -> nn.Module:
    """The benchmarked architecture, random init, re-created from the same seed for every method."""
    torch.manual_seed(args.seed)
    try:
        model = create_model(args.model, num_classes=args.num_classes, img_size=args.img_size, **args.model_kwargs)
    except TypeError:  # CNNs take no img_size
        torch.manual_seed(args.seed)
        model = create_model(args.model, num_classes=args.num_classes, **args.model_kwargs)
    return model.float()


def make_batches(batch: int, img_size: int, num_classes: int, n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, img_size, img_size, generator=gen),
             torch.randint(0, num_classes, (batch,), generator=gen)) for _ in range(n)]


def setup_method(method: str, args, calib) -> tuple[nn.Module, torch.optim.Optimizer | None, int]:
    """The model and AdamW optimizer of one method, and its number of trainable scalars."""
    model = make_model(args)
    if method == "floor":
        model.requires_grad_(False)
    elif method == "floor-stem":
        model.requires_grad_(False)
        stem = next(m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
        stem.register_forward_hook(lambda _m, _i, out: out.detach().requires_grad_(True))
    else:  # a registered method (common.registry), built by the registry's one path
        lora = method == "taskedge-lora"
        cfg = TaskEdgeConfig(budget=args.te_lora_budget if lora else args.budget, save_dtype=args.save_dtype,
                             conv_grad=args.conv_grad)
        model, _ = build_calibrated(method, model, cfg, calib, args.te_lora_rank if lora else 8, args.seed,
                                    save_head=False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    return model, opt, sum(p.numel() for p in params)


def measure_memory(method: str, args, x, y, calib) -> dict:
    """Tensor accounting of one training step (after one warm-up step) and the peak RSS, with one
    model alive at a time."""
    gc.collect()
    reset_ok = profiling.peak_rss_reset()
    model, opt, trainable = setup_method(method, args, calib)
    floor = method == "floor"
    profiling.train_step(model, opt, x, y, floor)  # warm-up: optimizer state exists from here on
    parts = profiling.step_memory(model, opt, x, y, floor)
    rss = profiling.peak_rss_mb(reset_ok)
    del model, opt
    gc.collect()
    return {"peak_mb": sum(parts.values()) / MIB, "peak_rss_mb": rss, "trainable": int(trainable),
            "_parts": {f"{k}_mb": v / MIB for k, v in parts.items()}}


def measure_time(methods: list[str], args, x, y, calib):
    """Per-step wall and process-CPU times, all methods set up side by side and interleaved, in
    ``args.reps`` repetitions of ``args.steps`` steps each: ({method: [[rep 1 times], ...]}, same
    for CPU)."""
    steps = {}
    for m in methods:
        model, opt, _ = setup_method(m, args, calib)
        steps[m] = partial(profiling.train_step, model, opt, x, y, m == "floor")
    times = {m: [] for m in methods}
    cpu = {m: [] for m in methods}
    for r in range(args.reps):
        wall, c = profiling.interleaved_times(steps, args.warmup if r == 0 else 0, args.steps)
        for m in methods:
            times[m].append(wall[m])
            cpu[m].append(c[m])
    del steps
    gc.collect()
    return times, cpu


def rep_ratios(times: dict[str, list[list[float]]], ref: str = "floor") -> dict[str, list[float]]:
    """Per repetition, each method's median step over ``ref``'s median step of that repetition."""
    return {m: [statistics.median(t) / statistics.median(f) for t, f in zip(reps, times[ref])]
            for m, reps in times.items()}


def importance_pass(args, calib) -> dict:
    """collect_norms (stats hooks, no_grad) vs a plain no_grad forward over the same batches."""
    model = make_model(args)
    cfg = TaskEdgeConfig(budget=args.budget)
    res = profiling.importance_pass_times(model, lambda: collect_norms(model, cfg, calib), calib, args.calib_repeats)
    print(f"[importance] stats {res['stats_s']:.3f}s  forward {res['forward_s']:.3f}s  ratio {res['ratio']:.3f}",
          file=sys.stderr)
    return res


def conv_micro(args) -> list[dict]:
    """Depthwise conv value gradient, sparse vs dense, for each of CONV_SHAPES."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for n, c, s, k, stride in CONV_SHAPES:
        row = profiling.conv_value_grad_times(n, c, s, k, stride, gen, args.warmup, args.steps)
        print(f"[conv-micro] {row['shape']} k{k} s{stride}: value grad sparse {row['sparse_ms']:.3f} ms  "
              f"dense {row['dense_ms']:.3f} ms  ({row['sparse_over_dense']:.2f}x)", file=sys.stderr)
        out.append(row)
    return out


# --- main ------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_base_patch16_224", help="any timm or embedded model name (random init)")
    p.add_argument("--model-kwargs", type=json.loads, default={},
                   help='extra timm.create_model arguments as JSON, e.g. \'{"depth": 2}\'')
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--steps", type=int, default=5, help="timed steps per method and repetition (median taken)")
    p.add_argument("--reps", type=int, default=3,
                   help="interleaved repetitions; the step ratio is the median of the per-repetition ratios")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per method before timing")
    p.add_argument("--budget", type=float, default=0.001)
    p.add_argument("--save-dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--conv-grad", default="auto", choices=("auto", "sparse", "dense"))
    p.add_argument("--calib-batches", type=int, default=2)
    p.add_argument("--calib-repeats", type=int, default=3)
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma list of {', '.join(METHODS)}; floor is always run")
    p.add_argument("--te-lora-budget", type=float, default=0.004, help="taskedge-lora: size of the mask M")
    p.add_argument("--te-lora-rank", type=int, default=1, help="taskedge-lora: rank of B")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-importance", action="store_true", help="skip the importance-pass timing")
    p.add_argument("--conv-micro", action="store_true", help="depthwise conv sparse-vs-dense micro-benchmark only")
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    return p.parse_args(argv)


def _loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    if args.conv_micro:
        return {"conv_micro": conv_micro(args)}
    methods = [ALIASES.get(m.strip(), m.strip()) for m in args.methods.split(",") if m.strip()]
    bad = set(methods) - set(METHODS)
    if bad:
        raise SystemExit(f"unknown method(s) {sorted(bad)}; choose from {METHODS}")
    methods = ["floor"] + [m for m in METHODS[1:] if m in methods]
    load0 = _loadavg()
    x, y = make_batches(args.batch, args.img_size, args.num_classes, 1, args.seed + 1)[0]
    calib = make_batches(args.batch, args.img_size, args.num_classes, args.calib_batches, args.seed + 2)
    result = {"model": args.model, "batch": args.batch, "methods": {}}
    mem = {m: measure_memory(m, args, x, y, calib) for m in methods}
    times, cpu = measure_time(methods, args, x, y, calib)
    ratios = rep_ratios(times)
    for m in methods:
        ratio = ratios[m]
        result["methods"][m] = {"step_s": statistics.median(statistics.median(t) for t in times[m]),
                                "peak_mb": mem[m]["peak_mb"], "peak_rss_mb": mem[m]["peak_rss_mb"],
                                "step_ratio": statistics.median(ratio), "step_ratio_min": min(ratio),
                                "step_ratio_max": max(ratio), "step_ratio_reps": ratio,
                                "mem_ratio": 0.0, "trainable": mem[m]["trainable"]}
    fl = result["methods"]["floor"]
    for m, r in result["methods"].items():
        r["mem_ratio"] = r["peak_mb"] / fl["peak_mb"]
        p = mem[m]["_parts"]
        print(f"[{m:8s}] step {r['step_s']:.3f}s ({r['step_ratio']:.3f}x, reps {r['step_ratio_min']:.3f}-"
              f"{r['step_ratio_max']:.3f})  tensor {r['peak_mb']:7.1f} MiB "
              f"({r['mem_ratio']:.3f}x: params {p['params_mb']:.1f} saved {p['saved_mb']:.1f} "
              f"grads {p['grads_mb']:.1f} optim {p['optim_mb']:.1f})  rss {r['peak_rss_mb']:.0f} MiB  "
              f"trainable {r['trainable']:,}  cpu/step {statistics.median(sum(cpu[m], [])):.3f}s  "
              f"steps {[[round(t, 3) for t in rep] for rep in times[m]]}", file=sys.stderr)
    if not args.no_importance:
        result["importance_pass"] = importance_pass(args, calib)
    # supplementary timing (not part of the per-method schema): on a shared, loaded machine the
    # fastest step and the process CPU time per step are steadier than the wall-clock median
    flat = {m: sum(times[m], []) for m in methods}
    cpu_flat = {m: sum(cpu[m], []) for m in methods}
    cpu_fl = statistics.median(cpu_flat["floor"])
    result["timing_detail"] = {m: {"step_min_s": min(flat[m]), "step_cpu_s": statistics.median(cpu_flat[m]),
                                   "cpu_ratio": statistics.median(cpu_flat[m]) / cpu_fl,
                                   "min_ratio": min(flat[m]) / min(flat["floor"]),
                                   "steps_s": [[round(t, 6) for t in rep] for rep in times[m]]} for m in methods}
    if "floor-stem" in methods:  # the same ratios against the floor without the stem's input gradient
        for m, ratio in rep_ratios(times, "floor-stem").items():
            result["timing_detail"][m]["ratio_to_floor_stem"] = {
                "median": statistics.median(ratio), "min": min(ratio), "max": max(ratio)}
    # run context (not part of the per-method schema): what was measured, and how loaded the box was
    result["settings"] = {
        "img_size": args.img_size, "model_kwargs": args.model_kwargs, "num_classes": args.num_classes, "save_dtype": args.save_dtype,
        "conv_grad": args.conv_grad, "budget": args.budget, "steps": args.steps, "reps": args.reps,
        "warmup": args.warmup,
        "threads": args.threads, "torch": torch.__version__,
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", ""),
        "loadavg_1min_start_end": [round(load0, 2), round(_loadavg(), 2)],
        "memory": "params+buffers + saved-for-backward (saved_tensors_hooks, dedup by storage) + grads + optimizer state",
    }
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
