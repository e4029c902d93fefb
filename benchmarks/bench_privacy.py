"""The cost of privacy on the embedded default: accuracy vs epsilon, and SecAgg+ vs plain aggregation.

    python -m benchmarks.bench_privacy                      # 5 nodes, 5 rounds, 3 seeds (~35-40 min on 2 busy cores)
    python -m benchmarks.bench_privacy --quick              # CI smoke: 3 nodes, 1 round, 1 seed (~1 min)

Runs the real ClientApp and ServerApp code in-process (server/inprocess.py, messages serialised).
Every configuration clips each node's update to the same norm C (`--clip`), so the rows differ
only in what they add:
  plain     FedAvg of the clipped updates, sent in the clear (clip-norm = C)
  secagg    the same through Flower's SecAgg+ (statistics round too): the server learns only sums
  dp eps=E  central DP, client-side clipping (Flower's wrapper + fixedclipping_mod), one noise
            multiplier for the statistics release and every round, chosen with Flower's RDP
            accountant so the whole run (statistics + R rounds) spends exactly E at delta
  (eps = inf is `plain`: clipped, no noise)
Reports final centralised accuracy (mean +- sd over seeds), bytes up per client per round, wall time
per round, the SecAgg+ quantization error bound, and writes a JSON, a figure and the README table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]


def configs(epsilons: list[float], rounds: int, delta: float) -> dict[str, dict]:
    from server.privacy import noise_for_epsilon

    out = {"plain": {}, "secagg": {"secure-aggregation": True}}
    for eps in epsilons:
        if math.isinf(eps):
            continue
        sigma = noise_for_epsilon(eps, rounds, delta, stats_releases=1)
        out[f"dp eps={eps:g}"] = {"dp": "client", "dp-noise-multiplier": sigma, "epsilon": eps}
    return out


def run(name: str, extra: dict, seed: int, args, out: Path) -> dict:
    from client.client_app import app
    from common.settings import parse_run_config
    from server.inprocess import InProcessGrid, task_identity
    from server.runner import run_federation

    extra = dict(extra)
    extra.pop("epsilon", None)
    conf = {"num-server-rounds": args.rounds, "local-epochs": args.local_epochs, "seed": seed, "min-nodes": args.nodes,
            "fraction-evaluate": 0.0, "output-dir": str(out), "clip-norm": args.clip, "dp-clip-norm": args.clip,
            "dp-delta": args.delta, "server-test-size": args.test_size, "calib-size": args.calib_size, **extra}
    if args.weights:
        conf["weights-path"] = args.weights
    cfg = parse_run_config(conf)
    t0 = time.time()
    with task_identity():
        fed, summary = run_federation(InProcessGrid(app, args.nodes, cfg.to_dict()), cfg)
    trained = [r for r in fed.history if "sent" in r]
    mean = lambda k: sum(r.get(k) or 0 for r in trained) / max(len(trained), 1)  # noqa: E731
    return {"config": name, "seed": seed, "final_acc": summary["final_acc"], "initial_acc": summary["initial_acc"],
            "epsilon": summary.get("dp_epsilon"), "noise_multiplier": extra.get("dp-noise-multiplier", 0.0),
            "bytes_up_per_client_round": mean("bytes_up_per_client"), "bytes_down_per_round": mean("bytes_down"),
            "round_time_s": mean("round_time_s"), "secagg_time_s": mean("secagg_time_s"),
            "secagg_overhead_s": mean("secagg_overhead_s"),
            "quant_bound": max((r.get("secagg_quant_bound") or 0.0) for r in trained) if trained else 0.0,
            "stats_quant_bound": fed.history[0].get("stats_quant_bound"), "query_bytes_up":
            fed.history[0].get("query_bytes_up"), "wall_s": time.time() - t0,
            "acc_by_round": [r.get("central_acc") for r in fed.history]}


def table(rows: list[dict], args) -> tuple[list[dict], str]:
    import numpy as np

    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["config"], []).append(r)
    agg = []
    for name, rs in groups.items():
        acc = np.array([r["final_acc"] for r in rs], float)
        agg.append({"config": name, "seeds": len(rs), "acc_mean": float(acc.mean()), "acc_sd": float(acc.std(ddof=1))
                    if len(rs) > 1 else 0.0, "epsilon": rs[0]["epsilon"], "noise_multiplier": rs[0]["noise_multiplier"],
                    "bytes_up_per_client_round": float(np.mean([r["bytes_up_per_client_round"] for r in rs])),
                    "round_time_s": float(np.mean([r["round_time_s"] for r in rs])),
                    "secagg_time_s": float(np.mean([r["secagg_time_s"] for r in rs])),
                    "secagg_overhead_s": float(np.mean([r["secagg_overhead_s"] for r in rs])),
                    "quant_bound": float(max(r["quant_bound"] for r in rs)),
                    "initial_acc": float(np.mean([r["initial_acc"] for r in rs]))})
    lines = [f"{args.nodes} nodes, {args.rounds} rounds x {args.local_epochs} local epoch(s), update clip C = "
             f"{args.clip:g}, delta = {args.delta:g}, seeds {', '.join(map(str, args.seeds))} "
             f"(initial accuracy {agg[0]['initial_acc']:.3f})", "",
             "| configuration | epsilon | noise multiplier | final accuracy (mean +- sd) | up B/client/round | "
             "s/round | SecAgg+ overhead s/round | quantization bound |", "|---|---|---|---|---|---|---|---|"]
    for a in agg:
        eps = "inf" if a["epsilon"] is None or (isinstance(a["epsilon"], float) and math.isinf(a["epsilon"])) \
            else f"{a['epsilon']:.2f}"
        lines.append(f"| {a['config']} | {eps} | {a['noise_multiplier']:.3g} | {a['acc_mean']:.3f} +- {a['acc_sd']:.3f}"
                     f" | {a['bytes_up_per_client_round']:,.0f} | {a['round_time_s']:.1f} | "
                     f"{a['secagg_overhead_s']:.2f} | {a['quant_bound']:.2g} |")
    return agg, "\n".join(lines)


def figure(agg: list[dict], rows: list[dict], path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    dp = sorted([a for a in agg if a["config"].startswith("dp")], key=lambda a: a["epsilon"])
    plain = next(a for a in agg if a["config"] == "plain")
    secagg = next((a for a in agg if a["config"] == "secagg"), None)
    xs = [a["epsilon"] for a in dp]
    inf_x = max(xs + [1.0]) * 4
    ax1.errorbar(xs + [inf_x], [a["acc_mean"] for a in dp] + [plain["acc_mean"]],
                 yerr=[a["acc_sd"] for a in dp] + [plain["acc_sd"]], marker="o", capsize=3,
                 label="central DP (client clip)")
    if secagg:
        ax1.errorbar([inf_x * 1.15], [secagg["acc_mean"]], yerr=[secagg["acc_sd"]], marker="s", capsize=3,
                     label="SecAgg+, no noise")
    ax1.axhline(plain["initial_acc"], color="grey", ls=":", label="before training")
    ax1.set_xscale("log")
    ax1.minorticks_off()
    ax1.set_xticks(xs + [inf_x])
    ax1.set_xticklabels([f"{x:g}" for x in xs] + ["inf"])
    ax1.set_xlabel(f"epsilon (delta={args.delta:g}, statistics + {args.rounds} rounds)")
    ax1.set_ylabel("final centralised accuracy")
    ax1.set_title("accuracy vs privacy budget")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    names = [a["config"] for a in agg if a["config"] in ("plain", "secagg")]
    up = [next(a for a in agg if a["config"] == n)["bytes_up_per_client_round"] / 1e3 for n in names]
    tm = [next(a for a in agg if a["config"] == n)["round_time_s"] for n in names]
    x = np.arange(len(names))
    ax2.bar(x - 0.2, up, 0.4, label="kB up / client / round")
    ax2b = ax2.twinx()
    ax2b.bar(x + 0.2, tm, 0.4, color="tab:orange", label="s / round")
    ax2.set_xticks(x)
    ax2.set_xticklabels(names)
    ax2.set_ylabel("kB up per client per round")
    ax2b.set_ylabel("seconds per round")
    ax2.set_title("SecAgg+ cost")
    h1, l1 = ax2.get_legend_handles_labels()
    h2, l2 = ax2b.get_legend_handles_labels()
    ax2.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--local-epochs", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0, 8.0, math.inf])
    ap.add_argument("--clip", type=float, default=10.0, help="update clipping norm C of every configuration")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--test-size", type=int, default=1000)
    ap.add_argument("--calib-size", type=int, default=64)
    ap.add_argument("--weights", default="", help="weights-path (default: the embedded pre-trained ViT)")
    ap.add_argument("--quick", action="store_true", help="CI smoke: 3 nodes, 1 round, 1 seed, eps 8 and inf")
    ap.add_argument("--out", type=Path, default=ROOT / "results", help="folder for the JSON, figure and table")
    args = ap.parse_args(argv)
    if args.quick:
        args.nodes, args.rounds, args.local_epochs, args.seeds = 3, 1, 1, [0]  # SecAgg+ needs >= 3 nodes
        args.epsilons, args.test_size, args.calib_size = [8.0, math.inf], 200, 16
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        grid = configs(args.epsilons, args.rounds, args.delta)
        for seed in args.seeds:  # seeds outer: a busy machine slows every configuration alike
            for name, extra in grid.items():
                r = run(name, extra, seed, args, Path(tmp))
                print(f"{name:12s} seed {seed}: acc {r['final_acc']:.3f} eps {r['epsilon']} "
                      f"up {r['bytes_up_per_client_round']:,.0f} B  {r['round_time_s']:.1f} s/round", flush=True)
                rows.append(r)
    agg, text = table(rows, args)
    stem = "bench_privacy_quick" if args.quick else "bench_privacy"
    args.out.mkdir(parents=True, exist_ok=True)
    figure(agg, rows, args.out / f"{stem}.png", args)
    (args.out / f"{stem}.md").write_text(text + "\n")
    doc = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "summary": agg,
           "runs": rows}
    (args.out / f"{stem}.json").write_text(json.dumps(doc, indent=2, default=lambda x: None if x != x else str(x)))
    print(text)
    return doc


if __name__ == "__main__":
    main()
