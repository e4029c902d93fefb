"""TaskEdge vs TaskEdge + LoRA vs LoRA at about equal trainable parameters, and the cost of N:M, side by side.

    python -m benchmarks.compare_variants --workers 2      # results/compare_variants.json (+ a markdown table)

Accuracy: centralised fine-tuning (benchmarks/central.py, the federation's own build/train code)
on every suite task x `--seeds` seeds, `--epochs` epochs, each method at its tuned rates
(common/defaults.json; taskedge-lora's from `benchmarks.sweep --methods taskedge-lora`), test split
reported, validation recorded. Variants (embedded ViT; trainable counts are printed):

  taskedge            2 % mask (4,269 entries), paper score
  taskedge-lora       dW = M ⊙ (B A), A frozen: M = 8 % mask, B rank 2 (rows x 2 ~ 4.7k trainable)
  lora r=1            HF peft LoRA at the rank whose adapter count matches (4,352)
  ... nm=2:4          the same with the base weights pruned to 2:4 along the input dimension by the
                      TaskEdge score and the mask chosen among kept entries (the N:M accuracy cost)

Cost (one process, `--threads` torch threads, batch `--batch` of the suite's 32 px images): per
variant the simultaneous peak of tensor bytes over one training step (benchmarks.profiling.step_live_peak)
and the step time, median / min / max of `--reps` interleaved repetitions, also as ratios to the
frozen-backbone floor (backprop to the input only).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.central import Run, mean_sd, run_many

TE_BUDGET = 0.02
TE_LORA = {"budget": 0.08, "lora_rank": 2}  # the shape benchmarks/sweep.py tunes taskedge-lora at
MATCHED_RANK = 1

VARIANTS = (  # label, Run overrides
    ("taskedge", {"method": "taskedge", "budget": TE_BUDGET}),
    ("taskedge-lora", {"method": "taskedge-lora", **TE_LORA}),
    (f"lora r={MATCHED_RANK}", {"method": "fedlora", "lora_rank": MATCHED_RANK}),
    ("taskedge nm=2:4", {"method": "taskedge", "budget": TE_BUDGET, "nm": "2:4"}),
    ("taskedge-lora nm=2:4", {"method": "taskedge-lora", **TE_LORA, "nm": "2:4"}),
)


def _runs(tasks, seeds, epochs) -> list[Run]:
    from common.settings import METHOD_HEAD_LR, METHOD_LR

    return [Run(task, kw["method"], METHOD_LR[kw["method"]], METHOD_HEAD_LR[kw["method"]], seed=seed, epochs=epochs,
                tag=label, **{k: v for k, v in kw.items() if k != "method"})
            for task in tasks for seed in seeds for label, kw in VARIANTS]


def accuracy(tasks, seeds, epochs, workers) -> dict:
    results = run_many(_runs(tasks, seeds, epochs), workers)
    out: dict[str, dict] = {}
    for r in results:
        if "error" in r:
            raise RuntimeError(f"{r['tag']} {r['task']} seed {r['seed']}: {r['error']}\n{r.get('traceback', '')}")
        d = out.setdefault(r["tag"], {"tasks": {}, "trainable": [], "lr": r["lr"], "head_lr": r["head_lr"]})
        t = d["tasks"].setdefault(r["task"], {"test": [], "val": []})
        t["test"].append(r["test_acc"])
        t["val"].append(r["val_acc"])
        d["trainable"].append(r["trainable_body"])
    for d in out.values():
        for t in d["tasks"].values():
            t["acc_mean"], t["acc_sd"] = (round(v, 4) for v in mean_sd(t["test"]))
        n = min(len(t["test"]) for t in d["tasks"].values())
        per_seed = [sum(t["test"][i] for t in d["tasks"].values()) / len(d["tasks"]) for i in range(n)]
        d["suite_mean"], d["suite_sd"] = (round(v, 4) for v in mean_sd(per_seed))
        d["suite_val_mean"] = round(mean_sd([sum(t["val"][i] for t in d["tasks"].values()) / len(d["tasks"])
                                             for i in range(n)])[0], 4)
        d["trainable"] = round(sum(d["trainable"]) / len(d["trainable"]))
    return out


def cost(batch: int, reps: int, threads: int, task: str) -> dict:
    """Peak tensor memory and step time per variant, and of the frozen floor, on one task's images."""
    import statistics

    import torch

    from common.data.splits import make_split
    from common.data.tasks import get_task
    from common.methods import base_model
    from benchmarks.profiling import interleaved_times, step_live_peak, train_step
    from common.train import make_optimizer
    from benchmarks.central import prepare

    torch.set_num_threads(threads)
    spec = get_task(task)
    x, y = make_split(spec, "train", n=batch)
    calib = make_split(spec, "calib", n=256)
    models, opts = {}, {}
    floor = base_model("taskedge-vit-tiny", spec.num_classes)
    for p in floor.parameters():
        p.requires_grad_(False)
    models["floor"], opts["floor"] = floor, None
    for run in _runs([task], [0], epochs=1):  # one per variant, built exactly as the accuracy runs build it
        models[run.tag], _ = prepare(run, base_model("taskedge-vit-tiny", spec.num_classes), calib)
        opts[run.tag] = make_optimizer(models[run.tag], run.lr, head_lr=run.head_lr)
    peak = {}
    for k, m in models.items():
        train_step(m, opts[k], x, y, k == "floor")  # warm-up (optimizer state exists)
        peak[k] = step_live_peak(m, opts[k], x, y, floor=k == "floor")["peak"]
    wall, _ = interleaved_times({k: (lambda k=k: train_step(models[k], opts[k], x, y, k == "floor")) for k in models},
                                warmup=2, reps=reps)
    f_med = statistics.median(wall["floor"])
    out = {}
    for k in models:
        ratios = [w / f for w, f in zip(wall[k], wall["floor"])]  # per repetition, side by side
        out[k] = {"peak_mib": round(peak[k] / 2**20, 2), "mem_ratio": round(peak[k] / peak["floor"], 3),
                  "step_ms_median": round(1e3 * statistics.median(wall[k]), 1),
                  "step_ratio_median": round(statistics.median(wall[k]) / f_med, 3),
                  "step_ratio_min": round(min(ratios), 3), "step_ratio_max": round(max(ratios), 3)}
    return {"batch": batch, "reps": reps, "threads": threads, "task": task, "methods": out}


def table(acc: dict, cst: dict) -> str:
    rows = ["| variant | trainable | suite test acc (mean ± sd) | peak tensor MiB (× floor) | step (× floor, median [min–max]) |",
            "| --- | ---: | --- | --- | --- |"]
    f = cst["methods"]["floor"]
    rows.append(f"| frozen floor | 0 | – | {f['peak_mib']:.1f} (1.00×) | {f['step_ms_median']:.0f} ms (1.00×) |")
    for label, _ in VARIANTS:
        a, c = acc[label], cst["methods"][label]
        rows.append(f"| {label} | {a['trainable']:,} | {a['suite_mean']:.3f} ± {a['suite_sd']:.3f} | "
                    f"{c['peak_mib']:.1f} ({c['mem_ratio']:.2f}×) | {c['step_ratio_median']:.2f}× "
                    f"[{c['step_ratio_min']:.2f}–{c['step_ratio_max']:.2f}] |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--tasks", default="", help="comma list (default: the suite)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=Path("results/compare_variants.json"))
    args = ap.parse_args(argv)
    from common.data.tasks import SUITE

    tasks = [t for t in args.tasks.split(",") if t] or list(SUITE)
    t0 = time.perf_counter()
    acc = accuracy(tasks, list(range(args.seeds)), args.epochs, args.workers)
    t_acc = time.perf_counter() - t0
    cst = cost(args.batch, args.reps, args.threads, tasks[0])
    md = table(acc, cst)
    doc = {"setup": {"tasks": tasks, "seeds": args.seeds, "epochs": args.epochs, "variants": dict(VARIANTS),
                     "command": "python -m benchmarks.compare_variants"},
           "accuracy": acc, "cost": cst, "table_md": md,
           "seconds": {"accuracy": round(t_acc, 1), "total": round(time.perf_counter() - t0, 1)}}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2))
    print(md)
    return doc


if __name__ == "__main__":
    main()
