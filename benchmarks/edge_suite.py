"""PEFT at the edge, measured on the task suite: TaskEdge vs linear probe, BN + head, BitFit, full FT,
LoRA, DoRA and GaLore on a ViT, a ResNet and a MobileNetV2 (all three embedded, pre-trained by the
same upstream recipe), with accuracy, trainable parameters, memory, FLOPs, step time and upload.

    nice -n 10 .venv/bin/python -m benchmarks.edge_suite --workers 2     # everything (see README for time)
    .venv/bin/python -m benchmarks.edge_suite --quick --out /tmp/q       # CI smoke: 1 model, 2 methods

Stages (finished fine-tuning runs are kept in ``--cache``, JSON lines, so a rerun resumes):

1. **tune** — every method in TUNED, per model, by one procedure: centralised fine-tuning
   (``benchmarks/central.py``, the federation's own build path) for ``--epochs`` epochs on each suite
   task's 1,000 training examples, seed 0, scored on the ``val`` split; ``lr`` over LR_GRID (adapter /
   delta / weight rate; the linear probe's head rate), the head at HEAD_LR. The best suite-mean
   validation accuracy picks the rate. The TaskEdge ablations (ABLATIONS) reuse TaskEdge's rate.
2. **test** — each method at its rate, ``--seeds`` seeds x every suite task, ``test`` split.
3. **sweeps** — LoRA / DoRA / GaLore ranks RANKS and TaskEdge budgets BUDGETS (test split,
   ``--sweep-seeds`` seeds; the main table's rank 8 / budget 2 % are its middle points).
4. **cost** — one AdamW step per (model, method) from ``benchmarks/bench_edge.py`` (simultaneous
   peak tensor memory, FLOPs with the depthwise weight-gradient over-count corrected, step time),
   plus the TaskEdge statistics pass vs a plain forward.
5. **upload** — bytes a client sends per round, for the methods the federation runs (taskedge,
   fedlora, fedavg-full, head-only): the float32 arrays of ``common.methods.get_arrays``.

Writes ``<out>/edge_suite.json``, ``edge_suite.md`` (the table in docs/results.md) and the figures
``edge_acc_vs_trainable.png``, ``edge_shift_unseen.png``, ``edge_cost.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.central import Run, run_many
from common.registry import METHODS

MODELS = ("taskedge-vit-tiny", "taskedge-resnet-tiny", "taskedge-mobilenetv2-tiny")
LR_GRID = (1e-3, 3e-3, 1e-2, 3e-2)
HEAD_LR = 1e-2
RANK = 8  # LoRA / DoRA / GaLore rank of the main table
BUDGET = 0.02  # TaskEdge's default budget (common/defaults.json "selection")
# (label, central method, Run fields): tuned on the validation split
TUNED = (
    ("linear", "head-only", {}),
    ("bn-head", "bn-head", {}),
    ("bitfit", "bitfit", {}),
    ("full", "fedavg-full", {}),
    ("lora", "fedlora", {"lora_rank": RANK}),
    ("dora", "dora", {"lora_rank": RANK}),
    ("galore", "galore", {"lora_rank": RANK}),
    ("taskedge", "taskedge", {"budget": BUDGET}),  # the default score = the paper's |W|·‖X‖
)
# TaskEdge ablations at TaskEdge's tuned rate and budget (the fidelity study's variants)
ABLATIONS = (
    ("taskedge gradient", "taskedge", {"budget": BUDGET, "score": "gradient"}),
    ("taskedge |W|", "taskedge", {"budget": BUDGET, "score": "magnitude"}),
    ("taskedge random", "taskedge", {"budget": BUDGET, "score": "random"}),
    ("taskedge global", "taskedge", {"budget": BUDGET, "allocation": "global"}),
)
RANKS = (1, 2, 16)
BUDGETS = (0.001, 0.005, 0.08)
# the table's labels -> the registered method (common.registry) of its cost row and, where one exists, its federation
COST_NAME = {label: method for label, method, _ in TUNED}
FED_METHODS = {label: method for label, method, _ in TUNED if METHODS[method].federated}
SHIFT, UNSEEN = "shapes-shift", "shapes-downstream"


# --- runs ---------------------------------------------------------------------------------------

def _run(model: str, method: str, fields: dict, task: str, lr: float, seed: int, split: str, epochs: int,
         label: str) -> Run:
    head_lr = lr if method == "head-only" else HEAD_LR
    return Run(task, method, lr, head_lr, seed=seed, epochs=epochs, eval_split=split, model=model, tag=label,
               **fields)


def run_cached(runs: list[Run], workers: int, cache: Path | None, label: str) -> list[dict]:
    """Run what the cache does not hold (appending each finished run), return all in order."""
    done = {}
    if cache is not None and cache.is_file():
        for line in cache.read_text().splitlines():
            rec = json.loads(line)
            done[rec["key"]] = rec
    todo = [r for r in runs if r.key() not in done]
    print(f"[{label}] {len(runs) - len(todo)} of {len(runs)} runs from the cache, {len(todo)} to run", flush=True)
    t0, count = time.perf_counter(), [0]

    def on_result(res: dict) -> None:
        count[0] += 1
        if "error" in res:
            print(f"[{label}] ERROR {res['model']} {res['tag']} {res['task']}: {res['error']}", flush=True)
            return
        key = Run(**{k: res[k] for k in Run.__dataclass_fields__ if k != "extra"}).key()
        res = {**res, "key": key}
        res.pop("history", None)
        done[key] = res
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            with open(cache, "a") as fh:
                fh.write(json.dumps(res) + "\n")
        print(f"[{label}] {count[0]}/{len(todo)} {res['model']} {res['tag']} {res['task']} s{res['seed']} "
              f"lr {res['lr']:g}: {res['eval_split']} {res['acc']:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)

    run_many(todo, workers, on_result)
    missing = [r for r in runs if r.key() not in done]
    if missing:
        raise SystemExit(f"[{label}] {len(missing)} runs failed (see ERROR lines above); nothing written")
    return [done[r.key()] for r in runs]


def _suite_mean(results: list[dict], tasks) -> float:
    return statistics.fmean(r["acc"] for r in results if r["task"] in tasks)


def tune(models, methods, tasks, epochs, grid, workers, cache) -> dict:
    """{model: {label: {"lr": best, "val_by_lr": {lr: suite-mean val acc}}}}."""
    runs = [_run(m, method, fields, t, lr, 0, "val", epochs, label)
            for m in models for label, method, fields in methods for lr in grid for t in tasks]
    res = run_cached(runs, workers, cache, "tune")
    out: dict = {}
    for m in models:
        for label, _method, _fields in methods:
            scores = {lr: _suite_mean([r for r in res if r["model"] == m and r["tag"] == label and r["lr"] == lr],
                                      tasks) for lr in grid}
            best = max(scores, key=lambda lr: (scores[lr], -lr))
            val = {f"{lr:g}": round(a, 4) for lr, a in scores.items()}
            out.setdefault(m, {})[label] = {"lr": best, "val_by_lr": val}
    return out


def _summary(rows: list[dict], tasks, seeds) -> dict:
    """Per task mean ± sd over seeds, and the suite mean's mean ± sd over seeds."""
    per_task = {}
    for t in tasks:
        accs = [r["acc"] for r in rows if r["task"] == t]
        per_task[t] = {"mean": statistics.fmean(accs), "sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                       "accs": accs}
    suite = [statistics.fmean(r["acc"] for r in rows if r["seed"] == s) for s in seeds]
    r0 = rows[0]
    return {"suite_mean": statistics.fmean(suite), "suite_sd": statistics.stdev(suite) if len(suite) > 1 else 0.0,
            "per_task": per_task, "trainable": r0["trainable"], "trainable_body": r0["trainable_body"],
            "trainable_head": r0["trainable_head"], "lr": r0["lr"], "head_lr": r0["head_lr"],
            "peft_refused": r0.get("peft_refused", 0), "train_s_mean": statistics.fmean(r["train_s"] for r in rows)}


def evaluate_methods(models, methods, rates, tasks, seeds, epochs, workers, cache, label="test") -> dict:
    runs = [_run(m, method, fields, t, rates[m][lab], s, "test", epochs, lab)
            for m in models for lab, method, fields in methods for s in seeds for t in tasks]
    res = run_cached(runs, workers, cache, label)
    return {m: {lab: _summary([r for r in res if r["model"] == m and r["tag"] == lab], tasks, seeds)
                for lab, _, _ in methods} for m in models}


def sweeps(models, rates, tasks, seeds, epochs, workers, cache) -> dict:
    """LoRA / DoRA / GaLore over RANKS and TaskEdge over BUDGETS at each method's tuned rate."""
    variants = []
    for base_label, method, fields in TUNED:
        if base_label in ("lora", "dora", "galore"):
            variants += [(f"{base_label} r{r}", method, {**fields, "lora_rank": r}, base_label) for r in RANKS]
        if base_label == "taskedge":
            variants += [(f"taskedge {b:.1%}", method, {**fields, "budget": b}, base_label) for b in BUDGETS]
    sweep_rates = {m: {lab: rates[m][base] for lab, _, _, base in variants} for m in models}
    return evaluate_methods(models, [v[:3] for v in variants], sweep_rates, tasks, seeds, epochs, workers, cache,
                            "sweep")


def upload_bytes(models, num_classes: int = 10) -> dict:
    """Bytes a client uploads per round (float32 arrays of common.methods.get_arrays) per federated method,
    each model built as the accuracy runs build it (`central.prepare`, calibrated on 64 examples)."""
    from common.data.splits import make_split
    from common.methods import base_model, get_arrays
    from benchmarks.central import prepare

    calib = make_split(UNSEEN, "calib", n=64)
    out = {}
    for m in models:
        out[m] = {}
        for label, method in FED_METHODS.items():
            run = Run(UNSEEN, method, 0.0, 0.0, budget=BUDGET, lora_rank=RANK, model=m)
            model, _ = prepare(run, base_model(m, num_classes), calib)
            out[m][label] = int(sum(a.nbytes for a in get_arrays(method, model).values()))
    return out


def cost(models, quick: bool) -> dict:
    from benchmarks import bench_edge

    methods = ["head-only", "taskedge"] if quick else list(bench_edge.METHODS)
    argv = ["--models", ",".join(models), "--methods", ",".join(methods), "--budget", str(BUDGET), "--json", "",
            "--png", ""]
    if quick:
        argv += ["--reps", "3", "--batch", "4", "--importance-reps", "0", "--dw-probe", "0"]
    return bench_edge.run(bench_edge.parse_args(argv))


# --- report -------------------------------------------------------------------------------------

def table(res: dict) -> str:
    tasks = res["settings"]["tasks"]
    intro = (f"Suite mean = test accuracy over {len(tasks)} tasks, mean ± sd over {len(res['settings']['seeds'])} "
             f"seeds; `{SHIFT}` = distribution shift, `{UNSEEN}` = unseen classes. Memory / FLOPs / time: one AdamW "
             f"step, batch {res['cost']['settings']['batch']}, 32 px, 1 thread (`benchmarks/bench_edge.py`). Trainable "
             f"scalars (incl. the head) and upload bytes are for a 10-class task.")
    header = ("| model | method | trainable (%) | lr | suite mean | shift | unseen | peak MiB | GFLOPs/step | "
              "step ms | upload B/round |")
    lines = [intro, "", header, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, rows in res["test"].items():
        base = res["cost"]["models"].get(m, {}).get("base_params")
        cmeth = res["cost"]["models"].get(m, {}).get("methods", {})
        for lab, r in rows.items():
            c = cmeth.get(COST_NAME.get(lab.split(" ")[0] if lab.startswith("taskedge") else lab, ""), {})
            pct = f" ({100 * r['trainable'] / base:.2f}%)" if base else ""
            up = res["upload"].get(m, {}).get(lab)
            cells = [m, lab, f"{r['trainable']:,}{pct}", f"{r['lr']:g}",
                     f"{r['suite_mean']:.3f} ± {r['suite_sd']:.3f}",
                     f"{r['per_task'][SHIFT]['mean']:.3f}" if SHIFT in r["per_task"] else "—",
                     f"{r['per_task'][UNSEEN]['mean']:.3f}" if UNSEEN in r["per_task"] else "—",
                     f"{c['peak_mb']:.2f}" if "peak_mb" in c else "—",
                     f"{c['gflops']:.3f}" if "gflops" in c else "—",
                     f"{c['step_ms']:.1f}" if "step_ms" in c else "—",
                     f"{up:,}" if up else "—"]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    passes = {m: c["importance_pass"]["ratio"] for m, c in res["cost"]["models"].items() if "importance_pass" in c}
    if passes:
        lines += ["", "TaskEdge's statistics (importance) pass over a plain forward of the same batches: "
                  + ", ".join(f"{m} {r:.2f}×" for m, r in passes.items()) + "."]
    if res.get("sweeps"):
        title = (f"Rank / budget sweeps (suite-mean test accuracy, mean ± sd over {len(res['settings']['sweep_seeds'])} "
                 "seeds; trainable scalars incl. head):")
        lines += ["", title, "", "| model | variant | trainable | suite mean |", "|---|---|---|---|"]
        for m, rows in res["sweeps"].items():
            for lab, r in rows.items():
                lines.append(f"| {m} | {lab.replace('|', chr(92) + '|')} | {r['trainable']:,} | "
                             f"{r['suite_mean']:.3f} ± {r['suite_sd']:.3f} |")
    return "\n".join(lines)


README_BEGIN, README_END = "<!-- edge-suite table: begin -->", "<!-- edge-suite table: end -->"


def update_readme(path: Path, md: str) -> bool:
    """Replace the text between the README's edge-suite markers with `md` (False: no markers there)."""
    text = path.read_text()
    if README_BEGIN not in text or README_END not in text:
        return False
    head, rest = text.split(README_BEGIN, 1)
    path.write_text(f"{head}{README_BEGIN}\n{md}\n{README_END}{rest.split(README_END, 1)[1]}")
    return True


def figures(res: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks import bench_edge

    paths = []
    models = list(res["test"])
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 4.2), squeeze=False)
    for ax, m in zip(axes[0], models):
        for lab, r in res["test"][m].items():
            marker = "*" if lab == "taskedge" else ("x" if lab.startswith("taskedge ") else "o")
            ax.errorbar(r["trainable"], r["suite_mean"], yerr=r["suite_sd"], fmt=marker, ms=9 if marker == "*" else 6,
                        capsize=2)
            ax.annotate(lab, (r["trainable"], r["suite_mean"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        for fam in ("lora", "dora", "taskedge"):
            pts = sorted((r["trainable"], r["suite_mean"]) for lab, r in {**res.get("sweeps", {}).get(m, {}),
                                                                          **res["test"][m]}.items()
                         if lab == fam or (lab.startswith(fam + " ") and (lab[len(fam) + 1] in "r0123456789")))
            if len(pts) > 1:
                ax.plot(*zip(*pts), "-", lw=0.8, alpha=0.6, label=f"{fam} sweep")
        ax.set_xscale("log")
        ax.set_xlabel("trainable scalars (incl. head)")
        ax.set_ylabel("suite-mean test accuracy")
        ax.set_title(m, fontsize=10)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("Accuracy vs trainable parameters (mean ± sd over seeds)", fontsize=10)
    fig.tight_layout()
    p = out / "edge_acc_vs_trainable.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(str(p))

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    labels = list(res["test"][models[0]])
    w = 0.8 / len(labels)
    colours = plt.get_cmap("tab20").colors  # more methods than the default 10-colour cycle
    for ax, task, title in ((axes[0], SHIFT, "distribution shift"), (axes[1], UNSEEN, "unseen classes")):
        for i, lab in enumerate(labels):
            vals = [res["test"][m].get(lab, {}).get("per_task", {}).get(task, {}) for m in models]
            ax.bar([j + i * w for j in range(len(models))], [v.get("mean", 0) for v in vals], w,
                   yerr=[v.get("sd", 0) for v in vals], capsize=1.5, label=lab, color=colours[i % len(colours)])
        ax.set_xticks([j + w * (len(labels) - 1) / 2 for j in range(len(models))])
        ax.set_xticklabels(models, fontsize=8)
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{task} ({title})", fontsize=10)
        ax.set_ylim(0, 1)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    p = out / "edge_shift_unseen.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(str(p))

    if res["cost"]["models"]:
        p = out / "edge_cost.png"
        bench_edge.plot(res["cost"], p)
        paths.append(str(p))
    return paths


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--workers", type=int, default=2, help="parallel runs of one torch thread each")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--sweep-seeds", type=int, default=3)
    p.add_argument("--tasks", default="", help="comma list (default: the whole suite)")
    p.add_argument("--no-sweeps", action="store_true")
    p.add_argument("--cache", type=Path, default=Path("results/edge_runs.jsonl"))
    p.add_argument("--out", type=Path, default=Path("results"))
    p.add_argument("--readme", type=Path, default=Path("docs/results.md"),
                   help="document whose edge-suite block gets the table (not with --quick; '' = none)")
    p.add_argument("--quick", action="store_true", help="one model, two methods, one task, 1 epoch, 1 seed")
    p.add_argument("--replot", action="store_true", help="run nothing: table, figures and README from <out>/edge_suite.json")
    a = p.parse_args(argv)
    if a.seeds < 1 or a.epochs < 1 or a.workers < 1:
        p.error("--seeds, --epochs and --workers must be >= 1")
    return a


def main(argv=None) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from common.data.tasks import SUITE

    a = parse_args(argv)
    if a.replot:
        res = json.loads((a.out / "edge_suite.json").read_text())
        return _write(res, a)
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()] or list(SUITE)
    methods, ablations, grid = TUNED, ABLATIONS, LR_GRID
    if a.quick:
        models, tasks, methods, ablations, grid = models[:1], tasks[:1], (TUNED[0], TUNED[-1]), (), (1e-2,)
        a.epochs, a.seeds, a.no_sweeps = 1, 1, True
    seeds, sweep_seeds = list(range(a.seeds)), list(range(min(a.sweep_seeds, a.seeds)))
    t0 = time.perf_counter()
    tuned = tune(models, methods, tasks, a.epochs, grid, a.workers, a.cache)
    rates = {m: {lab: v["lr"] for lab, v in tuned[m].items()} for m in models}
    for m in models:
        rates[m].update({lab: rates[m]["taskedge"] for lab, _, _ in ablations})
    res = {"settings": {"models": models, "tasks": tasks, "seeds": seeds, "sweep_seeds": sweep_seeds,
                        "epochs": a.epochs, "lr_grid": list(grid), "head_lr": HEAD_LR, "rank": RANK, "budget": BUDGET,
                        "tuning": "seed 0, val split, best suite-mean val accuracy; ablations use taskedge's lr",
                        "loadavg_start": os.getloadavg()[0]},
           "tuning": tuned}
    res["test"] = evaluate_methods(models, list(methods) + list(ablations), rates, tasks, seeds, a.epochs,
                                   a.workers, a.cache)
    res["sweeps"] = {} if a.no_sweeps else sweeps(models, rates, tasks, sweep_seeds, a.epochs, a.workers, a.cache)
    res["upload"] = upload_bytes(models)
    res["cost"] = cost(models, a.quick)
    res["settings"]["seconds"] = round(time.perf_counter() - t0, 1)
    res["settings"]["loadavg_end"] = os.getloadavg()[0]
    return _write(res, a)


def _write(res: dict, a) -> dict:
    res["table_md"] = table(res)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "edge_suite.json").write_text(json.dumps(res, indent=2) + "\n")
    (a.out / "edge_suite.md").write_text(res["table_md"] + "\n")
    res["figures"] = figures(res, a.out)
    if not a.quick and str(a.readme) not in ("", ".") and update_readme(a.readme, res["table_md"]):
        print(f"[edge-suite] table written into {a.readme}", flush=True)
    print(res["table_md"])
    return res


if __name__ == "__main__":
    main()
