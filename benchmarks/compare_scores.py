"""Selection beyond the paper, centrally: every score/allocation at equal trainable entries, over seeds.

    python -m benchmarks.compare_scores --workers 15     # results/compare_scores.json, central_budget.json

Stage 1 (`VARIANTS`): TaskEdge with each score x allocation at the default budget (the same number
of trainable entries for all), plus references (head-only, LoRA at the rank matching TaskEdge's
count, LoRA r=8, full fine-tuning), `--seeds` seeds x every suite task, `--epochs` epochs with
each method's tuned rates (common/defaults.json). Every run is scored on `val` and `test`: the
default selection (written to common/defaults.json "selection") is the variant with the best
suite-mean *validation* accuracy; the tables report *test* accuracy. Column statistics (columns
touched, share of the top-5 columns) show how each rule spreads entries over input columns.

`--only` reruns some variants and merges them into an existing `--json` (the selection is kept).

Stage 2 (budget vs rank): the default selection at budgets BUDGETS vs LoRA at ranks RANKS.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.central import Run, mean_sd, run_many

# (label, score, allocation) at equal entries
VARIANTS = (
    ("taskedge (paper)", "taskedge", "neuron"),
    ("taskedge global top-k", "taskedge", "global"),
    ("taskedge + column cap", "taskedge", "neuron-cap"),
    ("taskedge-sqrt", "taskedge-sqrt", "neuron"),
    ("taskedge-sqrt + column cap", "taskedge-sqrt", "neuron-cap"),
    ("magnitude |W|", "magnitude", "neuron"),
    ("activation ||X||", "activation", "neuron"),
    ("random", "random", "neuron"),
    ("random + column cap", "random", "neuron-cap"),
    ("gradient (central reference)", "gradient", "neuron"),  # GPS-style; opt-in (not a default candidate)
)
BUDGETS = (0.005, 0.01, 0.02, 0.04, 0.08)
RANKS = (1, 2, 4, 8, 16)
MATCHED_RANK = 1  # LoRA r=1 on the embedded ViT: 4,352 adapter entries ~ TaskEdge's 2 % (4,269)


def _rates(method: str) -> tuple[float, float]:
    from common.settings import METHOD_HEAD_LR, METHOD_LR

    return METHOD_LR[method], METHOD_HEAD_LR[method]


def stage1(tasks, seeds, epochs, budget, only: set[str] | None = None) -> list[Run]:
    runs = []
    for task in tasks:
        for seed in seeds:
            lr, hl = _rates("taskedge")
            for label, score, alloc in VARIANTS:
                runs.append(Run(task, "taskedge", lr, hl, seed=seed, epochs=epochs, score=score, allocation=alloc,
                                budget=budget, tag=label))
            for label, method, rank in (("head-only", "head-only", 8), (f"lora r={MATCHED_RANK}", "fedlora", MATCHED_RANK),
                                        ("lora r=8", "fedlora", 8), ("full fine-tuning", "fedavg-full", 8)):
                lr, hl = _rates(method)
                runs.append(Run(task, method, lr, hl, seed=seed, epochs=epochs, lora_rank=rank, tag=label))
    return [r for r in runs if only is None or r.tag in only]


def stage2(tasks, seeds, epochs, score, alloc) -> list[Run]:
    runs = []
    for task in tasks:
        for seed in seeds:
            lr, hl = _rates("taskedge")
            runs += [Run(task, "taskedge", lr, hl, seed=seed, epochs=epochs, score=score, allocation=alloc, budget=b,
                         tag=f"taskedge {b:g}") for b in BUDGETS]
            lr, hl = _rates("fedlora")
            runs += [Run(task, "fedlora", lr, hl, seed=seed, epochs=epochs, lora_rank=r, tag=f"lora r={r}") for r in RANKS]
    return runs


def summarize(results: list[dict], tasks) -> dict:
    """Per tag: per-task mean/sd over seeds (test and val), suite mean, trainable counts, column stats."""
    out: dict[str, dict] = {}
    for r in results:
        if "error" in r:
            raise RuntimeError(f"run failed: {r['tag']} {r['task']} seed {r['seed']}: {r['error']}\n{r.get('traceback', '')}")
        d = out.setdefault(r["tag"], {"method": r["method"], "score": r["score"], "allocation": r["allocation"],
                                      "budget": r["budget"], "lora_rank": r["lora_rank"], "tasks": {}})
        t = d["tasks"].setdefault(r["task"], {"test": [], "val": [], "trainable": r["trainable"],
                                              "trainable_body": r["trainable_body"]})
        t["test"].append(r["test_acc"])
        t["val"].append(r["val_acc"])
        for k in ("columns_touched", "columns_total", "top5_column_share"):
            if k in r:
                t.setdefault(k, []).append(r[k])
    for tag, d in out.items():
        per_seed_test, per_seed_val = [], []
        for task, t in d["tasks"].items():
            t["acc_mean"], t["acc_sd"] = (round(v, 4) for v in mean_sd(t["test"]))
            t["val_mean"] = round(mean_sd(t["val"])[0], 4)
            for k in ("columns_touched", "top5_column_share"):
                if k in t:
                    t[k] = round(mean_sd(t[k])[0], 3)
            if "columns_total" in t:
                t["columns_total"] = t["columns_total"][0]
        n_seeds = min(len(t["test"]) for t in d["tasks"].values())
        for i in range(n_seeds):  # suite mean per seed, then mean +- sd over seeds
            per_seed_test.append(sum(d["tasks"][k]["test"][i] for k in tasks) / len(tasks))
            per_seed_val.append(sum(d["tasks"][k]["val"][i] for k in tasks) / len(tasks))
        d["suite_mean"], d["suite_sd"] = (round(v, 4) for v in mean_sd(per_seed_test))
        d["suite_val_mean"] = round(mean_sd(per_seed_val)[0], 4)
        d["trainable_body"] = round(sum(t["trainable_body"] for t in d["tasks"].values()) / len(d["tasks"]))
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--tasks", default="")
    ap.add_argument("--json", type=Path, default=Path("results/compare_scores.json"))
    ap.add_argument("--budget-json", type=Path, default=Path("results/central_budget.json"))
    ap.add_argument("--skip-budget", action="store_true")
    ap.add_argument("--budget-only", action="store_true",
                    help="only stage 2, with the selection already in common/defaults.json")
    ap.add_argument("--budget-seeds", type=int, default=None, help="seeds of stage 2 (default: --seeds)")
    ap.add_argument("--no-write-defaults", action="store_true")
    ap.add_argument("--only", default="", help="comma list of stage-1 labels to (re)run and merge into --json")
    args = ap.parse_args(argv)
    from common import tuned
    from common.taskedge.scores import get_score
    from common.data.tasks import SUITE
    from common.settings import DEFAULTS

    tasks = [t for t in args.tasks.split(",") if t] or list(SUITE)
    seeds = list(range(args.seeds))
    budget = DEFAULTS["budget"]
    t0 = time.perf_counter()
    if args.budget_only:
        sel = tuned.selection()
        _budget_stage(args, tasks, list(range(args.budget_seeds or args.seeds)), sel,
                      {"tasks": tasks, "epochs": args.epochs, "budget": budget})
        return {"selection": sel}
    if args.only:
        return _merge_only(args, tasks, seeds, budget, t0)
    res1 = run_many(stage1(tasks, seeds, args.epochs, budget), args.workers)
    table = summarize(res1, tasks)
    # this centralised comparison keeps to label-free scores ("gradient", a dense upload per node, is chosen or not
    # by the federated benchmarks/sweep_selection.py, which counts that upload)
    cands = {tag: d for tag, d in table.items() if d["method"] == "taskedge" and not get_score(d["score"]).needs_gradients}
    winner = max(cands, key=lambda tag: cands[tag]["suite_val_mean"])
    sel = {"score": cands[winner]["score"], "allocation": cands[winner]["allocation"], "budget": budget,
           "chosen_by": "best suite-mean validation accuracy in benchmarks/compare_scores.py", "label": winner}
    doc = {"setup": {"tasks": tasks, "seeds": seeds, "epochs": args.epochs, "budget": budget,
                     "rates": {m: _rates(m) for m in ("taskedge", "fedlora", "fedavg-full", "head-only")}},
           "variants": table, "selection": sel, "seconds": round(time.perf_counter() - t0, 1)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2))
    for tag, d in sorted(table.items(), key=lambda kv: -kv[1]["suite_mean"]):
        print(f"[compare] {tag:28s} test {d['suite_mean']:.4f} +- {d['suite_sd']:.4f}  val {d['suite_val_mean']:.4f}  "
              f"body {d['trainable_body']}", flush=True)
    print(f"[compare] default selection: {winner}", flush=True)
    if not args.no_write_defaults:
        path = tuned.DEFAULTS_FILE
        d = json.loads(path.read_text()) if path.is_file() else {}
        d["selection"] = sel
        path.write_text(json.dumps(d, indent=2) + "\n")
    if not args.skip_budget:
        _budget_stage(args, tasks, list(range(args.budget_seeds or args.seeds)), sel, doc["setup"])
    return doc


def _merge_only(args, tasks, seeds, budget, t0) -> dict:
    """Run the `--only` labels and merge them into the existing table (selection and other rows kept)."""
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    runs = stage1(tasks, seeds, args.epochs, budget, only)
    missing = only - {r.tag for r in runs}
    if missing:
        raise SystemExit(f"--only: unknown labels {sorted(missing)}; known: {[v[0] for v in VARIANTS]}")
    doc = json.loads(args.json.read_text())
    if doc["setup"]["tasks"] != tasks or doc["setup"]["seeds"] != seeds or doc["setup"]["epochs"] != args.epochs:
        raise SystemExit(f"--only: {args.json} was made with another setup ({doc['setup']}); rerun it whole")
    table = summarize(run_many(runs, args.workers), tasks)
    doc["variants"].update(table)
    doc.setdefault("reruns", []).append({"labels": sorted(only), "seconds": round(time.perf_counter() - t0, 1)})
    args.json.write_text(json.dumps(doc, indent=2))
    for tag, d in table.items():
        print(f"[compare] {tag:28s} test {d['suite_mean']:.4f} +- {d['suite_sd']:.4f}  val {d['suite_val_mean']:.4f}")
    return doc


def _budget_stage(args, tasks, seeds, sel, setup) -> dict:
    t1 = time.perf_counter()
    res2 = run_many(stage2(tasks, seeds, args.epochs, sel["score"], sel["allocation"]), args.workers)
    bt = summarize(res2, tasks)
    out = {"setup": {**setup, "seeds": seeds, "selection": sel, "budgets": list(BUDGETS), "ranks": list(RANKS)},
           "points": bt, "seconds": round(time.perf_counter() - t1, 1)}
    args.budget_json.parent.mkdir(parents=True, exist_ok=True)
    args.budget_json.write_text(json.dumps(out, indent=2))
    for tag, d in bt.items():
        print(f"[budget] {tag:16s} body {d['trainable_body']:7d}  test {d['suite_mean']:.4f} +- {d['suite_sd']:.4f}")
    return out


if __name__ == "__main__":
    main()
