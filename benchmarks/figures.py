"""Every figure and the README results table of the suite study, from the results JSON files.

    python -m benchmarks.figures          # results/*.png + results/results_table.md

Inputs (whatever exists): results/bench_federation.json (benchmarks/bench_federation.py),
results/compare_scores.json and results/central_budget.json (benchmarks/compare_scores.py),
results/fed_budget.json (bench_federation.py --budget-sweep), results/sweep.json.
Outputs: fed_accuracy_rounds.png (suite-mean accuracy vs round, mean +- sd over partition seeds,
one panel per partition), fed_accuracy_rounds_tasks.png (per task, Dirichlet), acc_vs_trainable.png
(TaskEdge budget sweep vs LoRA rank sweep, central and federated), acc_vs_upload.png (accuracy vs
cumulative upload per client), fed_acc_vs_upload.png (the same with the setup upload, every method,
± sd bands, one panel per partition; also written by bench_federation.py) and results_table.md.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

LABELS = {
    "taskedge-paper": "TaskEdge, paper score |W|·‖X‖",
    "taskedge-best": "TaskEdge, default selection",
    "taskedge-gradient": "TaskEdge mask, gradient score (opt-in)",
    "random": "random mask",
    "magnitude": "|W|-only mask",
    "global-topk": "global top-k (paper score)",
    "fedlora": "FedLoRA r=8 (peft)",
    "fedlora-r1": "FedLoRA r=1 (≈ TaskEdge's count)",
    "fedavg-full": "FedAvg, full model",
    "head-only": "head only",
}
STYLE = {
    "taskedge-paper": ("tab:blue", "-"), "taskedge-best": ("tab:cyan", "--"), "taskedge-gradient": ("tab:green", "-"),
    "random": ("tab:gray", "-"),
    "magnitude": ("tab:olive", "-"), "global-topk": ("tab:purple", ":"), "fedlora": ("tab:orange", "-"),
    "fedlora-r1": ("tab:orange", "--"), "fedavg-full": ("tab:red", "-"), "head-only": ("black", ":"),
}


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, out: Path, dpi: int = 110, **layout) -> Path:
    """Lay the figure out (``layout``: tight_layout's arguments), write it to `out` and close it."""
    fig.tight_layout(**layout)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def _suite_curves(bench: dict, part: str) -> dict[str, tuple[np.ndarray, np.ndarray, int, int]]:
    """method -> (mean curve, sd curve, seeds, tasks): the suite-mean curve of every seed that has all
    tasks, then mean and sd over those seeds; tasks without a full seed set are left out (said in the title)."""
    runs = [r for r in bench.get("runs", []) if r.get("partition") == part and "error" not in r]
    tasks = bench["setup"]["tasks"]
    out = {}
    for key in dict.fromkeys(r["key"] for r in runs):
        by_seed: dict[int, dict[str, list]] = {}
        for r in runs:
            if r["key"] == key:
                by_seed.setdefault(r["seed"], {})[r["task"]] = [h["central_acc"] for h in r["history"]]
        full = [s for s, d in by_seed.items() if all(t in d for t in tasks)]
        use_tasks = tasks
        if not full:  # partial benchmark: the tasks every seed has
            common = set.intersection(*(set(d) for d in by_seed.values()))
            use_tasks, full = sorted(common), list(by_seed)
            if not use_tasks:
                continue
        curves = np.array([np.mean([by_seed[s][t] for t in use_tasks], axis=0) for s in full])
        sd = curves.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros(curves.shape[1])
        out[key] = (curves.mean(axis=0), sd, len(full), len(use_tasks))
    return out


def fig_rounds(bench: dict, out: Path) -> Path:
    plt = _plt()
    parts = [p for p in ("dirichlet", "iid") if any(r.get("partition") == p for r in bench.get("runs", []))]
    fig, axes = plt.subplots(1, len(parts), figsize=(6.2 * len(parts), 4.6), squeeze=False)
    setup = bench["setup"]
    for ax, part in zip(axes[0], parts):
        curves = _suite_curves(bench, part)
        seeds = tasks = 0
        for key, (m, sd, seeds, tasks) in sorted(curves.items(), key=lambda kv: -kv[1][0][-1]):
            colour, ls = STYLE.get(key, (None, "-"))
            x = np.arange(len(m))
            ax.plot(x, m, ls, color=colour, label=f"{LABELS.get(key, key)}: {m[-1]:.3f}", lw=1.6)
            ax.fill_between(x, m - sd, m + sd, color=colour, alpha=0.12)
        name = "Dirichlet α=0.5" if part == "dirichlet" else "IID"
        ax.set_title(f"{name}: mean over {tasks} task{'s' if tasks != 1 else ''}, ±1 sd over {seeds} partition "
                     f"seed{'s' if seeds != 1 else ''}", fontsize=9)
        ax.set_xlabel("round (0 = before training)")
        ax.set_ylabel("test accuracy (suite mean)")
        ax.set_xticks(range(0, setup["rounds"] + 1, max(1, setup["rounds"] // 10)))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Federated fine-tuning, {setup['nodes']} clients, {setup['local_epochs']} local epoch/round", fontsize=11)
    return _save(plt, fig, out)


def fig_rounds_tasks(bench: dict, out: Path, part: str = "dirichlet") -> Path | None:
    plt = _plt()
    tab = bench.get(part, {}).get("tasks", {})
    tasks = [t for t in bench["setup"]["tasks"] if t in tab]
    if not tasks:
        return None
    cols = min(3, len(tasks))
    rows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.5 * rows), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        for key, cell in sorted(tab[task].items(), key=lambda kv: -kv[1]["acc_mean"]):
            colour, ls = STYLE.get(key, (None, "-"))
            m = np.array([np.nan if v is None else v for v in cell["curve_mean"]])
            sd = np.array([0 if v is None else v for v in cell["curve_sd"]])
            x = np.arange(len(m))
            ax.plot(x, m, ls, color=colour, lw=1.3, label=LABELS.get(key, key))
            ax.fill_between(x, m - sd, m + sd, color=colour, alpha=0.1)
        n = len(next(iter(tab[task].values()))["acc_per_seed"])
        ax.set_title(f"{task} ({n} seed{'s' if n > 1 else ''})", fontsize=9)
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=7)
    fig.suptitle(f"Per task, {part}, mean ± sd over partition seeds", fontsize=11)
    return _save(plt, fig, out, dpi=100, rect=(0, 0.07, 1, 0.96))


def _budget_series(doc: dict) -> dict[str, list[tuple[int, float, float]]]:
    """'taskedge' / 'lora' -> [(trainable body params, suite mean, sd)] from a compare/budget JSON."""
    series: dict[str, list] = {"taskedge": [], "lora": []}
    for tag, d in doc.get("points", doc.get("variants", {})).items():
        fam = "lora" if d["method"] == "fedlora" else "taskedge" if d["method"] == "taskedge" else None
        if fam:
            series[fam].append((d["trainable_body"], d["suite_mean"], d["suite_sd"]))
    return {k: sorted(v) for k, v in series.items()}


def fig_trainable(central_budget: dict | None, compare: dict | None, fed_budget: dict | None, bench: dict | None,
                  out: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    ax = axes[0]
    points: dict = {}
    if central_budget:
        points.update(central_budget["points"])
    if compare:  # the equal-budget comparison's points at the default budget and LoRA r=1 / r=8 (more seeds)
        v, sel = compare["variants"], compare["selection"]["label"]
        points.update({k: v[k] for k in (sel, "lora r=1", "lora r=8") if k in v})
    if points:
        s = _budget_series({"points": points})
        for fam, colour, label in (("taskedge", "tab:blue", "TaskEdge (default selection), budget sweep"),
                                   ("lora", "tab:orange", "LoRA (peft), rank sweep")):
            if s[fam]:
                x, y, e = zip(*s[fam])
                ax.errorbar(x, y, yerr=e, marker="o", color=colour, label=label, capsize=3)
        nb = len(central_budget["setup"]["seeds"]) if central_budget else 0
        nc = len(compare["setup"]["seeds"]) if compare else 0
        ax.set_title(f"Central, 10 epochs: suite-mean test accuracy\n(2 %, r=1, r=8: {nc} seeds, ±1 sd; "
                     f"other points: {nb} seed)", fontsize=9)
    if compare:
        v = compare["variants"]
        for tag, marker, colour in (("full fine-tuning", "s", "tab:red"),):
            if tag in v:
                ax.scatter([v[tag]["trainable_body"]], [v[tag]["suite_mean"]], marker=marker, color=colour,
                           label=f"{tag}", zorder=3)
        if "head-only" in v:
            ax.axhline(v["head-only"]["suite_mean"], color="black", ls=":", label="head only (linear probe)")
    ax2 = axes[1]
    fed = None
    if fed_budget:
        head = (bench or {}).get("dirichlet", {}).get("suite_mean", {}).get("head-only", {}).get("trainable", 0)
        fed = _budget_series({"points": {k: {**d, "method": "fedlora" if k.startswith("lora") else "taskedge",
                                              "trainable_body": d["trainable"] - head, "suite_mean": d["acc_mean"],
                                              "suite_sd": d["acc_sd"]}
                                         for k, d in fed_budget["points"]["suite_mean"].items()}})
        sm = (bench or {}).get("dirichlet", {}).get("suite_mean", {})  # + the benchmark's 3-seed points
        for key, fam in (("taskedge-best", "taskedge"), ("fedlora-r1", "lora"), ("fedlora", "lora")):
            if key in sm:
                fed[fam] = sorted(fed[fam] + [(sm[key]["trainable"] - head, sm[key]["acc_mean"], sm[key]["acc_sd"])])
        for fam, colour, label in (("taskedge", "tab:blue", "TaskEdge budget sweep"), ("lora", "tab:orange", "FedLoRA rank sweep")):
            if fed[fam]:
                x, y, e = zip(*fed[fam])
                ax2.errorbar(x, y, yerr=e, marker="o", color=colour, label=label, capsize=3)
        ax2.set_title("Federated (Dirichlet α=0.5, 10 rounds): suite-mean test accuracy\n"
                      "(2 %, r=1, r=8: 3 seeds, ±1 sd; other points: seed 0)", fontsize=9)
        if "fedavg-full" in sm:
            ax2.scatter([sm["fedavg-full"]["trainable"] - head], [sm["fedavg-full"]["acc_mean"]], marker="s",
                        color="tab:red", label="FedAvg, full model", zorder=3)
        if "head-only" in sm:
            ax2.axhline(sm["head-only"]["acc_mean"], color="black", ls=":", label="head only")
    elif bench:
        sm = bench.get("dirichlet", {}).get("suite_mean", {})
        head = sm.get("head-only", {}).get("trainable", 0)  # the head's size, to count the body only as on the left
        for key in ("taskedge-best", "taskedge-paper", "random", "fedlora-r1", "fedlora", "fedavg-full"):
            if key in sm:
                colour, _ = STYLE[key]
                ax2.errorbar([max(sm[key]["trainable"] - head, 1)], [sm[key]["acc_mean"]], yerr=[sm[key]["acc_sd"]],
                             marker="o", color=colour, label=LABELS[key], capsize=3, ls="none")
        if "head-only" in sm:
            ax2.axhline(sm["head-only"]["acc_mean"], color="black", ls=":", label="head only")
        ax2.set_title("Federated (Dirichlet α=0.5), the benchmark's methods (no budget sweep run)", fontsize=9)
    for a in axes:
        a.set_xscale("log")
        a.set_xlabel("trainable parameters besides the head (log)")
        a.set_ylabel("test accuracy (suite mean)")
        a.grid(alpha=0.3, which="both")
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    return _save(plt, fig, out)


def fig_upload(bench: dict, out: Path, part: str = "dirichlet") -> Path | None:
    plt = _plt()
    tab = bench.get(part, {}).get("tasks", {})
    if not tab:
        return None
    tasks = [t for t in bench["setup"]["tasks"] if t in tab]
    keys = [k for k in LABELS if all(k in tab[t] for t in tasks)]
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for key in keys:
        cells = [tab[t][key] for t in tasks]
        acc = np.mean([[v for v in c["curve_mean"]][1:] for c in cells], axis=0)
        up = np.mean([c["cum_upload_per_client"][1:] for c in cells], axis=0)
        colour, ls = STYLE[key]
        ax.plot(up, acc, ls, marker="o", ms=3, color=colour, label=LABELS[key])
    ax.set_xscale("log")
    ax.set_xlabel("cumulative upload per client (bytes, log; values + head, statistics round not counted)")
    ax.set_ylabel(f"test accuracy (mean over {len(tasks)} tasks)")
    ax.set_title(f"Accuracy vs upload, {part}, rounds 1..{bench['setup']['rounds']}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _save(plt, fig, out)


def fig_fed_upload(bench: dict, out: Path) -> Path | None:
    """Accuracy vs cumulative upload per client (setup included, log x), every method, mean ± sd over seeds of
    the suite-mean curve, one panel per partition: which method is best at a given upload budget (issue 21)."""
    parts = [p for p in ("dirichlet", "iid") if any("cum_upload_per_client_with_setup" in c
                                                    for c in bench.get(p, {}).get("suite_mean", {}).values())]
    if not parts:
        return None
    plt = _plt()
    budgets = bench.get("protocol_notes", {}).get("upload_budgets_bytes", {})
    fig, axes = plt.subplots(1, len(parts), figsize=(6.4 * len(parts), 5.4), squeeze=False, sharey=True)
    handles: dict = {}
    for ax, part in zip(axes[0], parts):
        sm = bench[part]["suite_mean"]
        seeds = 0
        for key in [k for k in LABELS if k in sm] + [k for k in sm if k not in LABELS]:
            c = sm[key]
            if "cum_upload_per_client_with_setup" not in c:
                continue
            x = np.array(c["cum_upload_per_client_with_setup"][1:])
            n = min(len(x), len(c["curve_mean"]) - 1, len(c["curve_sd"]) - 1)
            x, m, sd = x[:n], np.array(c["curve_mean"][1:n + 1]), np.array(c["curve_sd"][1:n + 1])
            colour, ls = STYLE.get(key, (None, "-"))
            (line,) = ax.plot(x, m, ls, color=colour, lw=1.5, marker="o", ms=2)
            ax.fill_between(x, m - sd, m + sd, color=colour, alpha=0.12)
            handles.setdefault(f"{LABELS.get(key, key)} ({c.get('rounds', n)} rounds)", line)
            seeds = max(seeds, c.get("seeds_in_curve_sd", 0))
        for label, b in budgets.items():
            ax.axvline(b, color="grey", lw=0.8, ls=":")
            ax.text(b, 0.99, f" {label}", transform=ax.get_xaxis_transform(), fontsize=7, color="grey", va="top")
        ntasks = len(bench["setup"]["tasks"])
        name = "Dirichlet α=0.5" if part == "dirichlet" else "IID"
        ax.set_title(f"{name}: mean over {ntasks} task{'s' if ntasks != 1 else ''},\n±1 sd over {seeds} partition "
                     f"seed{'s' if seeds != 1 else ''} (of the suite-mean curve)", fontsize=9)
        ax.set_xscale("log")
        ax.set_xlabel("cumulative upload per client (bytes, log; setup statistics included)", fontsize=8)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("test accuracy (suite mean)")
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=3, fontsize=7)
    setup = bench["setup"]
    fig.suptitle(f"Accuracy vs upload: {setup['nodes']} clients, {setup['local_epochs']} local epoch/round, "
                 f"one point per round", fontsize=10)
    rows = -(-len(handles) // 3)
    return _save(plt, fig, out, rect=(0, 0.035 * rows + 0.01, 1, 1))


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def table(bench: dict | None, compare: dict | None, central_budget: dict | None) -> str:
    lines = []
    if bench:
        fl = {p: bench.get(p, {}).get("suite_mean", {}).get("fedlora") for p in ("dirichlet", "iid")}
        lines += ["| method | Dirichlet α=0.5 | IID | trainable (incl. head) | upload B/client/round | vs FedLoRA r=8 |",
                  "|---|---|---|---|---|---|"]
        sm_d = bench.get("dirichlet", {}).get("suite_mean", {})
        sm_i = bench.get("iid", {}).get("suite_mean", {})
        for key in sorted(set(sm_d) | set(sm_i), key=lambda k: (-(sm_d.get(k) or sm_i.get(k))["acc_mean"], k)):
            d, i = sm_d.get(key), sm_i.get(key)
            ref = d or i
            ratio = (f"{ref['upload_bytes_per_client_round'] / fl['dirichlet']['upload_bytes_per_client_round']:.2f}×"
                     if fl.get("dirichlet") else "")
            fmt = lambda c: f"{c['acc_mean']:.3f} ± {c['acc_sd']:.3f} ({len(c['acc_per_seed'])} seeds)" if c else "–"
            lines.append(f"| {_md(LABELS.get(key, key))} | {fmt(d)} | {fmt(i)} | {ref['trainable']:,} | "
                         f"{ref['upload_bytes_per_client_round']:,} | {ratio} |")
        lines.append("")
        tab = bench.get("dirichlet", {}).get("tasks", {})
        if tab:
            tasks = [t for t in bench["setup"]["tasks"] if t in tab]
            keys = [k for k in LABELS if any(k in tab[t] for t in tasks)]
            lines += ["| Dirichlet, per task | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
            for key in keys:
                cells = [tab[t].get(key) for t in tasks]
                lines.append(f"| {_md(LABELS[key])} | " + " | ".join(
                    f"{c['acc_mean']:.3f} ± {c['acc_sd']:.3f} (n={len(c['acc_per_seed'])})" if c else "–" for c in cells)
                    + " |")
            lines.append("")
    if compare:
        v = compare["variants"]
        lines += ["| central, equal entries | test, suite mean ± sd (seeds) | val | body params | columns touched | "
                  "top-5 column share |", "|---|---|---|---|---|---|"]
        for tag, d in sorted(v.items(), key=lambda kv: -kv[1]["suite_mean"]):
            cols = [t.get("columns_touched") for t in d["tasks"].values() if t.get("columns_touched") is not None]
            tot = [t.get("columns_total") for t in d["tasks"].values() if t.get("columns_total") is not None]
            share = [t.get("top5_column_share") for t in d["tasks"].values() if t.get("top5_column_share") is not None]
            n = len(next(iter(d["tasks"].values()))["test"])
            lines.append(f"| {_md(tag)} | {d['suite_mean']:.4f} ± {d['suite_sd']:.4f} ({n}) | {d['suite_val_mean']:.4f} | "
                         f"{d['trainable_body']:,} | "
                         + (f"{np.mean(cols):.0f} / {tot[0]}" if cols else "–") + " | "
                         + (f"{np.mean(share):.2f}" if share else "–") + " |")
        lines.append(f"\nDefault selection (best suite-mean *validation* accuracy): **{compare['selection']['label']}**.\n")
    if central_budget:
        lines += ["| central budget / rank | body params | test, suite mean |", "|---|---|---|"]
        for tag, d in sorted(central_budget["points"].items(), key=lambda kv: (kv[1]["method"], kv[1]["trainable_body"])):
            lines.append(f"| {tag} | {d['trainable_body']:,} | {d['suite_mean']:.4f} ± {d['suite_sd']:.4f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=Path("results"))
    ap.add_argument("--bench", type=Path, default=None, help="default: results/bench_federation.json")
    args = ap.parse_args(argv)
    r = args.results
    bench = _load(args.bench or r / "bench_federation.json")
    compare, central_budget = _load(r / "compare_scores.json"), _load(r / "central_budget.json")
    fed_budget = _load(r / "fed_budget.json")
    written = []
    if bench:
        written += [fig_rounds(bench, r / "fed_accuracy_rounds.png"), fig_rounds_tasks(bench, r / "fed_accuracy_rounds_tasks.png"),
                    fig_upload(bench, r / "acc_vs_upload.png"), fig_fed_upload(bench, r / "fed_acc_vs_upload.png")]
    if central_budget or compare or fed_budget or bench:
        written.append(fig_trainable(central_budget, compare, fed_budget, bench, r / "acc_vs_trainable.png"))
    md = table(bench, compare, central_budget)
    (r / "results_table.md").write_text(md + "\n")
    written.append(r / "results_table.md")
    for w in written:
        if w:
            print(w)
    return {"written": [str(w) for w in written if w]}


if __name__ == "__main__":
    main()
