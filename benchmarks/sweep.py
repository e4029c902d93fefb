"""Learning-rate sweep on the suite's validation splits -> every method's `lr` and `head_lr` defaults.

    python -m benchmarks.sweep --workers 15            # writes results/sweep.json and common/defaults.json

The same small procedure for every method: centralised fine-tuning (benchmarks/central.py) for
`--epochs` epochs on each suite task's 1,000 training examples, scored on its `val` split (never
`test`), over one grid: lr in LR_GRID (sparse values / LoRA adapters / full weights) x head_lr in
HEAD_GRID (the fresh dense head); head-only has no body, so only head_lr varies (over LR_GRID).
The pair with the best mean validation accuracy over the suite becomes the method's default in
common/defaults.json, which both `finetune` and the federation (`common.settings.METHOD_LR` /
`METHOD_HEAD_LR`) read. TaskEdge is swept with the paper's score; every score/allocation variant
then uses the same rates (benchmarks/compare_scores.py).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.central import Run, mean_sd, run_many

LR_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
HEAD_GRID = (1e-3, 3e-3, 1e-2)
METHODS = ("taskedge", "fedlora", "fedavg-full", "head-only")
# taskedge-lora (opt-in: --methods taskedge-lora) is swept at the shape benchmarks/compare_variants.py
# compares: a mask M of 8 % with B of rank 2, about plain TaskEdge's trainable count at 2 %
TE_LORA_SHAPE = {"budget": 0.08, "lora_rank": 2}


def grid(methods=METHODS, tasks=None, epochs: int = 5, seed: int = 0) -> list[Run]:
    from common.data.tasks import SUITE

    runs = []
    for task in tasks or SUITE:
        for m in methods:
            pairs = [(h, h) for h in LR_GRID] if m == "head-only" else [(lr, h) for lr in LR_GRID for h in HEAD_GRID]
            shape = TE_LORA_SHAPE if m == "taskedge-lora" else {}
            runs += [Run(task, m, lr, h, seed=seed, epochs=epochs, eval_split="val", **shape) for lr, h in pairs]
    return runs


def choose(results: list[dict]) -> dict:
    """Best (lr, head_lr) per method by mean validation accuracy over tasks."""
    table: dict[str, dict[tuple[float, float], list[float]]] = {}
    for r in results:
        if "error" in r:
            raise RuntimeError(f"sweep run failed: {r['key'] if 'key' in r else r['task']}/{r['method']}: {r['error']}")
        table.setdefault(r["method"], {}).setdefault((r["lr"], r["head_lr"]), []).append(r["acc"])
    best = {}
    for m, cells in table.items():
        scored = {k: mean_sd(v)[0] for k, v in cells.items()}
        (lr, head_lr), acc = max(scored.items(), key=lambda kv: (kv[1], -kv[0][0]))
        best[m] = {"lr": lr, "head_lr": head_lr, "val_acc_mean": round(acc, 4),
                   "grid": {f"{a:g},{b:g}": round(s, 4) for (a, b), s in sorted(scored.items())}}
    return best


def write_defaults(best: dict, setup: dict, path: Path) -> dict:
    from common import tuned

    doc = json.loads(path.read_text()) if path.is_file() else {}
    doc.setdefault("methods", {}).update({m: {"lr": v["lr"], "head_lr": v["head_lr"], "val_acc_mean": v["val_acc_mean"]}
                                          for m, v in best.items()})  # a sweep of some methods keeps the others
    doc.setdefault("selection", dict(tuned.FALLBACK_SELECTION))
    if set(best) >= set(METHODS):
        doc["sweep"] = setup
    else:  # an extra method swept on its own: its setup is kept beside the main sweep's
        doc.setdefault("extra_sweeps", {}).update({m: setup for m in best})
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--tasks", default="", help="comma list (default: the suite)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--json", type=Path, default=Path("results/sweep.json"))
    ap.add_argument("--defaults", type=Path, default=None, help="default: common/defaults.json")
    ap.add_argument("--no-write-defaults", action="store_true")
    args = ap.parse_args(argv)
    from common import tuned
    from common.data.tasks import SUITE

    tasks = [t for t in args.tasks.split(",") if t] or list(SUITE)
    runs = grid(tuple(m for m in args.methods.split(",") if m), tasks, args.epochs)
    t0 = time.perf_counter()
    done = [0]

    def tick(r):
        done[0] += 1
        if done[0] % 20 == 0 or done[0] == len(runs):
            print(f"[sweep] {done[0]}/{len(runs)} runs, {time.perf_counter() - t0:.0f} s", flush=True)

    results = run_many(runs, args.workers, tick)
    best = choose(results)
    setup = {"split": "val", "epochs": args.epochs, "tasks": tasks, "lr_grid": list(LR_GRID),
             "head_lr_grid": list(HEAD_GRID), "batch_size": 32, "optimizer": "AdamW, constant rates, no weight decay",
             "selection_rule": "best mean validation accuracy over the tasks", "command": "python -m benchmarks.sweep"}
    if "taskedge-lora" in args.methods.split(","):
        setup["taskedge_lora_shape"] = TE_LORA_SHAPE
    out = {"setup": setup, "best": best, "seconds": round(time.perf_counter() - t0, 1),
           "runs": [{k: v for k, v in r.items() if k not in ("history", "extra")} for r in results]}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    if not args.no_write_defaults:
        write_defaults(best, setup, args.defaults or tuned.DEFAULTS_FILE)
    for m, v in best.items():
        print(f"[sweep] {m}: lr {v['lr']:g}, head_lr {v['head_lr']:g} (mean val acc {v['val_acc_mean']:.3f})")
    return out


if __name__ == "__main__":
    main()
