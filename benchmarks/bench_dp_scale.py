"""DP at a scale where it can learn: accuracy vs clients per round at epsilon 8 and 2, against no noise.

    python -m benchmarks.bench_dp_scale             # 100/200/400 clients per round, 3 seeds (~45 min on 2 busy cores)
    python -m benchmarks.bench_dp_scale --quick     # CI smoke: 6 clients, 1 round, 1 seed (< 1 min)

Runs the real ClientApp and ServerApp in-process (server/inprocess.py, messages serialised) on the
embedded default (method taskedge, taskedge-vit-tiny, task shapes-downstream, Dirichlet alpha 0.5 label
skew), with n simulated clients, every one of them sampled in every round (fraction-train 1), so n is
both the population and the number of clipped updates summed per round. Flower's fixed-clipping
wrappers account with no sampling amplification, so only that count matters for the noise on the mean:
its sd is sigma * C / n.

Every configuration runs the same pipeline: `dp='client'` (each node clips its update to C with
Flower's fixedclipping_mod, weights forced uniform), and differs only in the noise multiplier sigma:
  non-private   sigma = 0 (same clip, same uniform mean, no noise; epsilon infinite)
  eps=E         one sigma for the statistics release and every training round, chosen with
                server/privacy.py: noise_for_epsilon so that the server's own RDP accountant
                (statistics release + R training releases, delta) ends the run at exactly E
The epsilon in the results is the one the server's accountant reports at the end of the run.

The built-in task has a 1,000-example training split (~10 examples per client at 100 clients), so
this benchmark gives the simulated clients a larger one for the duration of each sweep point:
`--examples-per-client` x n examples from the same seeded generator (common.data.splits.make_split; any n
is a prefix of a larger n), partitioned by the project's own flwr-datasets Dirichlet partitioner
(common/partition.py, patched here only in the size of the training split it is given and in the
size of its per-process partition cache). The server's test split is unchanged.

A calibration run (plain FedAvg, no clip, no noise, the smallest n, seed 0) measures the
un-clipped update norms C was chosen from and how aligned the clipped updates are, which gives the
predicted noise-to-signal ratio per round, sigma * sqrt(d) / (n * alignment).
Reports final centralised accuracy (mean +- sd over seeds), the gap to non-private in points, wall
time and peak RSS per run; writes results/bench_dp_scale.{json,md,png}.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.profiling import PeakRSS, peak_rss_mb  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGET_GAP = 3.0  # points: the target for epsilon = 8


# ---------------------------------------------------------------------------------------------- data
@contextlib.contextmanager
def training_split(n_examples: int):
    """The built-in task's training split has `n_examples` examples while inside (simulated nodes only).

    `common.partition.partitioned` reads the split with `make_split(task, "train")`; only that call
    is redirected (other splits and explicit sizes pass through). Partition caches are cleared on the
    way in and out, and the per-partition tensor cache is unbounded while inside (its 64 entries would
    re-partition every node every round past 64 nodes)."""
    import common.partition as P

    original_split, original_cache = P.make_split, P.partition_tensors

    def make_split(task, split="train", n=None, seed=0):
        return original_split(task, split, n_examples if split == "train" and n is None else n, seed)

    P.partitioned.cache_clear()
    original_cache.cache_clear()
    P.make_split = make_split
    P.partition_tensors = functools.lru_cache(maxsize=None)(original_cache.__wrapped__)
    try:
        yield
    finally:
        P.partition_tensors.cache_clear()
        P.make_split, P.partition_tensors = original_split, original_cache
        P.partitioned.cache_clear()


def partition_sizes(task: str, n: int, alpha: float, seed: int) -> list[int]:
    """Examples per partition (inside `training_split`)."""
    import common.partition as P

    part = P.partitioned(task, "dirichlet", n, float(alpha), seed)
    return [len(part.load_partition(i)) for i in range(n)]


def prepare_partitions(task: str, n: int, alpha: float, seed: int) -> list[int]:
    """Drop the partitions of other seeds, then partition and load every node's tensors for `seed` (inside
    `training_split`), so a run's wall time and peak memory are the federation's, not the partitioner's,
    and memory does not grow seed after seed."""
    import gc

    import common.partition as P

    P.partitioned.cache_clear()
    P.partition_tensors.cache_clear()
    gc.collect()
    # the very key load_local_data uses (source=() passed positionally), so the nodes hit this cache
    return [len(P.partition_tensors(task, "dirichlet", n, float(alpha), seed, i, ())[1]) for i in range(n)]


# ---------------------------------------------------------------------------------------------- runs
def configs(epsilons: list[float], rounds: int, delta: float) -> list[dict]:
    from server.privacy import noise_for_epsilon

    out = [{"config": "non-private", "target_epsilon": None, "noise_multiplier": 0.0}]
    for eps in epsilons:
        out.append({"config": f"eps={eps:g}", "target_epsilon": float(eps),
                    "noise_multiplier": noise_for_epsilon(eps, rounds, delta, stats_releases=1)})
    return out


def run_config(n: int, seed: int, args, out: Path, **extra) -> dict:
    conf = {"num-server-rounds": args.rounds, "local-epochs": args.local_epochs, "seed": seed, "min-nodes": n,
            "fraction-train": 1.0, "fraction-evaluate": 0.0, "output-dir": str(out), "alpha": args.alpha,
            "partitioner": "dirichlet", "batch-size": args.batch_size, "lr": args.lr, "head-lr": args.head_lr,
            "test-fraction": args.test_fraction, "calib-size": args.calib_size, "server-test-size": args.test_size,
            "dp-delta": args.delta, **extra}
    if args.weights:
        conf["weights-path"] = args.weights
    return conf


def federate(n: int, conf: dict, observe=None) -> tuple:
    from client.client_app import app
    from common.settings import parse_run_config
    from server.inprocess import InProcessGrid, task_identity
    from server.quiet import quiet_flower
    from server.runner import run_federation

    cfg = parse_run_config(conf)
    with task_identity(), quiet_flower():
        return run_federation(InProcessGrid(app, n, cfg.to_dict(), observe=observe), cfg)


def run(n: int, spec: dict, seed: int, args, out: Path) -> dict:
    conf = run_config(n, seed, args, out, **{"dp": "client", "dp-clip-norm": args.clip,
                                             "dp-noise-multiplier": spec["noise_multiplier"]})
    t0 = time.time()
    with PeakRSS() as mem:
        fed, summary = federate(n, conf)
    wall = time.time() - t0
    trained = [r for r in fed.history if "sent" in r]
    eps = summary.get("dp_epsilon")
    return {"config": spec["config"], "clients": n, "seed": seed, "final_acc": summary["final_acc"],
            "initial_acc": summary["initial_acc"], "target_epsilon": spec["target_epsilon"],
            "epsilon": None if eps is None or math.isinf(eps) else float(eps), "delta": args.delta,
            "noise_multiplier": spec["noise_multiplier"], "clip": args.clip,
            "noise_sd_on_mean": trained[-1].get("dp_noise_std") if trained else None,
            "sampled_per_round": [r.get("sent") for r in trained],
            "replies_per_round": [r.get("replies") for r in trained],
            "rounds_done": len(trained), "round_time_s": sum(r.get("round_time_s") or 0 for r in trained) /
            max(len(trained), 1), "wall_s": wall, "peak_rss_mb": mem.mb,
            "acc_by_round": [r.get("central_acc") for r in fed.history]}


def calibrate(n: int, args, out: Path, epsilons: list[dict]) -> dict:
    """Plain FedAvg (no clip, no noise) at n clients: the un-clipped update norms and their alignment."""
    import numpy as np

    deltas: dict[int, list] = {}

    def observe(msg, reply):
        if msg.metadata.message_type != "train" or reply.has_error():
            return
        sent, got = msg.content["arrays"], reply.content["arrays"]
        d = np.concatenate([(got[k].numpy().astype(np.float64) - sent[k].numpy()).ravel() for k in sent])
        deltas.setdefault(int(msg.content["config"]["server-round"]), []).append(d)

    conf = run_config(n, 0, args, out, **{"clip-norm": 0.0, "clip-factor": 0.0})
    t0 = time.time()
    fed, summary = federate(n, conf, observe)
    rounds = []
    for rnd in sorted(deltas):
        ds = deltas[rnd]
        norms = np.array([np.linalg.norm(d) for d in ds])
        clipped = np.mean([d * min(1.0, args.clip / max(np.linalg.norm(d), 1e-12)) for d in ds], axis=0)
        rounds.append({"round": rnd, "median_norm": float(np.median(norms)),
                       "p10_norm": float(np.percentile(norms, 10)),
                       "p90_norm": float(np.percentile(norms, 90)), "share_clipped": float(np.mean(norms > args.clip)),
                       "alignment": float(np.linalg.norm(clipped) / args.clip)})
    d = int(len(next(iter(deltas.values()))[0])) if deltas else 0
    align = float(np.mean([r["alignment"] for r in rounds])) if rounds else float("nan")
    # alignment of n random directions is ~1/sqrt(n): what is left above it is the shared direction
    predicted = {s["config"]: {str(m): s["noise_multiplier"] * math.sqrt(d) / (m * align) for m in args.clients}
                 for s in epsilons if s["target_epsilon"] is not None}
    return {"clients": n, "seed": 0, "final_acc": summary["final_acc"], "wall_s": time.time() - t0,
            "acc_by_round": [r.get("central_acc") for r in fed.history], "update_entries": d, "rounds": rounds,
            "mean_alignment": align, "random_alignment": 1 / math.sqrt(n),
            "predicted_noise_to_signal": predicted}


# ---------------------------------------------------------------------------------------------- report
def summarise(rows: list[dict]) -> list[dict]:
    import numpy as np

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["clients"], r["config"]), []).append(r)
    agg = []
    for (n, name), rs in groups.items():
        acc = np.array([r["final_acc"] for r in rs], float)
        agg.append({"clients": n, "config": name, "seeds": len(rs), "acc_mean": float(acc.mean()),
                    "acc_sd": float(acc.std(ddof=1)) if len(rs) > 1 else 0.0, "accs": acc.tolist(),
                    "target_epsilon": rs[0]["target_epsilon"],
                    "epsilon": [r["epsilon"] for r in rs], "noise_multiplier": rs[0]["noise_multiplier"],
                    "noise_sd_on_mean": rs[0]["noise_sd_on_mean"],
                    "wall_s_mean": float(np.mean([r["wall_s"] for r in rs])),
                    "round_time_s": float(np.mean([r["round_time_s"] for r in rs])),
                    "peak_rss_mb": float(max(r["peak_rss_mb"] for r in rs)),
                    "initial_acc": float(np.mean([r["initial_acc"] for r in rs]))})
    for a in agg:  # gap to the non-private run at the same n, seed by seed (paired: same partitions, same mask draw)
        base = {r["seed"]: r["final_acc"] for r in rows
                if r["clients"] == a["clients"] and r["config"] == "non-private"}
        mine = {r["seed"]: r["final_acc"] for r in rows if r["clients"] == a["clients"] and r["config"] == a["config"]}
        gaps = [100 * (base[s] - mine[s]) for s in mine if s in base]
        a["gap_pts_mean"] = float(np.mean(gaps)) if gaps else None
        a["gap_pts_sd"] = float(np.std(gaps, ddof=1)) if len(gaps) > 1 else 0.0
    return sorted(agg, key=lambda a: (a["clients"], a["target_epsilon"] is not None, -(a["target_epsilon"] or 0)))


def needed(agg: list[dict]) -> dict[str, int | None]:
    """Smallest n of the sweep whose mean gap is within TARGET_GAP points, per epsilon (None: not reached)."""
    out = {}
    for a in sorted(agg, key=lambda a: a["clients"]):
        if a["target_epsilon"] is None:
            continue
        out.setdefault(a["config"], None)
        if out[a["config"]] is None and a["gap_pts_mean"] is not None and a["gap_pts_mean"] <= TARGET_GAP:
            out[a["config"]] = a["clients"]
    return out


def table(agg: list[dict], calib: dict | None, args, wall_total: float) -> str:
    init = agg[0]["initial_acc"] if agg else float("nan")
    lines = [f"Embedded default (taskedge, taskedge-vit-tiny, shapes-downstream, Dirichlet alpha = {args.alpha:g}); "
             f"n clients per round = the population (fraction-train 1), ~{args.examples_per_client} examples per "
             f"client (test-fraction {args.test_fraction:g}); {args.rounds} rounds x {args.local_epochs} local "
             f"epoch(s), batch {args.batch_size}, lr {args.lr:g} / head-lr {args.head_lr:g}, calib-size "
             f"{args.calib_size}; client clip C = {args.clip:g} in every row; delta = {args.delta:g}, epsilon = the "
             f"server accountant's (statistics release + {args.rounds} rounds, no sampling amplification); seeds "
             f"{', '.join(map(str, args.seeds))}; centralised test accuracy on {args.test_size} examples (before "
             f"training {init:.3f}).", "",
             "| clients/round | configuration | epsilon (reported) | noise multiplier | noise sd on the mean | "
             "final accuracy (mean +- sd) | gap to non-private (pts) | wall s/run | s/round | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for a in agg:
        eps = [e for e in a["epsilon"] if e is not None]
        eps_s = "inf" if not eps else (f"{eps[0]:.4f}" if max(eps) - min(eps) < 1e-9 else
                                       f"{min(eps):.4f}-{max(eps):.4f}")
        gap = "-" if a["config"] == "non-private" else f"{a['gap_pts_mean']:+.1f} +- {a['gap_pts_sd']:.1f}"
        lines.append(f"| {a['clients']} | {a['config']} | {eps_s} | {a['noise_multiplier']:.3f} | "
                     f"{a['noise_sd_on_mean'] or 0:.2e} | {a['acc_mean']:.3f} +- {a['acc_sd']:.3f} | {gap} | "
                     f"{a['wall_s_mean']:.0f} | {a['round_time_s']:.1f} | {a['peak_rss_mb']:,.0f} |")
    need = needed(agg)
    lines += ["", "Clients per round needed for a gap <= %g points: %s." % (TARGET_GAP, "; ".join(
        f"{k}: {v if v is not None else 'not reached up to %d' % max(args.clients)}" for k, v in need.items()))]
    if calib:
        r = calib["rounds"]
        lines += ["", f"Calibration (plain FedAvg, no clip, no noise, {calib['clients']} clients, seed 0): final "
                  f"accuracy {calib['final_acc']:.3f}; un-clipped update norm median "
                  f"{sum(x['median_norm'] for x in r) / len(r):.2f} (p10 {min(x['p10_norm'] for x in r):.2f}, p90 "
                  f"{max(x['p90_norm'] for x in r):.2f}) over d = {calib['update_entries']:,} entries; share above C "
                  f"{sum(x['share_clipped'] for x in r) / len(r):.2f}; alignment |mean of clipped| / C = "
                  f"{calib['mean_alignment']:.3f} (random directions: {calib['random_alignment']:.3f}). Predicted "
                  "noise-to-signal per round, sigma sqrt(d) / (n alignment): " + "; ".join(
                      f"{k}: " + ", ".join(f"n={m} {v:.2f}" for m, v in p.items())
                      for k, p in calib["predicted_noise_to_signal"].items()) + "."]
    lines += ["", f"Total wall time {wall_total / 60:.1f} min; process peak RSS {peak_rss_mb(False):,.0f} MB "
              f"({os.cpu_count()} cores, shared)."]
    return "\n".join(lines)


def figure(agg: list[dict], path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = ["non-private"] + [f"eps={e:g}" for e in sorted(args.epsilons, reverse=True)]
    colour = {name: f"C{i}" for i, name in enumerate(names)}  # one colour per configuration in both panels
    for name in names:
        pts = sorted((a for a in agg if a["config"] == name), key=lambda a: a["clients"])
        if not pts:
            continue
        xs = [a["clients"] for a in pts]
        ax1.errorbar(xs, [a["acc_mean"] for a in pts], yerr=[a["acc_sd"] for a in pts], marker="o", capsize=3,
                     label=name if name == "non-private" else f"DP {name} (delta {args.delta:g})",
                     ls="--" if name == "non-private" else "-", color=colour[name])
        if name != "non-private":
            ax2.errorbar(xs, [a["gap_pts_mean"] for a in pts], yerr=[a["gap_pts_sd"] for a in pts], marker="o",
                         capsize=3, label=f"DP {name}", color=colour[name])
    if agg:
        ax1.axhline(agg[0]["initial_acc"], color="grey", ls=":", label="before training")
    ax2.axhline(TARGET_GAP, color="tab:red", ls=":", label=f"target: {TARGET_GAP:g} points")
    ax2.axhline(0, color="grey", lw=0.8)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.minorticks_off()
        ax.set_xticks(sorted(args.clients))
        ax.set_xticklabels([str(c) for c in sorted(args.clients)])
        ax.set_xlabel("clients per round (all sampled, each clipped to C = %g)" % args.clip)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax1.set_ylabel("final centralised accuracy (mean +- sd, %d seeds)" % len(args.seeds))
    ax1.set_title(f"accuracy vs clients per round ({args.rounds} rounds)")
    ax2.set_ylabel("non-private minus DP accuracy (points)")
    ax2.set_title("cost of DP vs clients per round")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[100, 200, 400], help="clients per round (= population)")
    ap.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 2.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.03)
    ap.add_argument("--head-lr", type=float, default=0.03)
    ap.add_argument("--clip", type=float, default=4.0, help="client update clipping norm C of every configuration")
    ap.add_argument("--examples-per-client", type=int, default=40,
                    help="training split = this x clients (32 fails the partitioner's 10-example floor at 400)")
    ap.add_argument("--test-fraction", type=float, default=0.0, help="local test share (federated evaluation is off)")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--test-size", type=int, default=1000)
    ap.add_argument("--calib-size", type=int, default=16)
    ap.add_argument("--no-calibration", action="store_true", help="skip the un-clipped calibration run")
    ap.add_argument("--weights", default="", help="weights-path (default: the embedded pre-trained ViT)")
    ap.add_argument("--quick", action="store_true", help="CI smoke: 6 clients, 1 round, 1 seed")
    ap.add_argument("--out", type=Path, default=ROOT / "results", help="folder for the JSON, figure and table")
    args = ap.parse_args(argv)
    if args.quick:
        args.clients, args.rounds, args.seeds, args.test_size = [6], 1, [0], 200
    args.clients = sorted(args.clients)
    t_start = time.time()
    specs = configs(args.epsilons, args.rounds, args.delta)
    rows: list[dict] = []
    partitions: list[dict] = []
    calib = None
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.clients:
            with training_split(args.examples_per_client * n):
                if n == args.clients[0] and not args.no_calibration:
                    prepare_partitions("shapes-downstream", n, args.alpha, 0)
                    calib = calibrate(n, args, Path(tmp), specs)
                    r = calib["rounds"]
                    print(f"calibration (no clip, no noise) n={n}: acc {calib['final_acc']:.3f}, update norm median "
                          f"{[round(x['median_norm'], 2) for x in r]}, alignment {calib['mean_alignment']:.3f}, "
                          f"{calib['wall_s']:.0f} s", flush=True)
                for seed in args.seeds:  # seeds outer: a busy machine slows every configuration alike
                    t0 = time.time()
                    sizes = prepare_partitions("shapes-downstream", n, args.alpha, seed)
                    partitions.append({"clients": n, "seed": seed, "examples": sum(sizes), "min": min(sizes),
                                       "median": sorted(sizes)[len(sizes) // 2], "max": max(sizes)})
                    print(f"{n} clients, seed {seed}: {sum(sizes):,} training examples, per client min {min(sizes)} "
                          f"median {sorted(sizes)[len(sizes) // 2]} max {max(sizes)} (partitioned in "
                          f"{time.time() - t0:.0f} s)", flush=True)
                    for spec in specs:
                        r = run(n, spec, seed, args, Path(tmp))
                        print(f"n={n:4d} {spec['config']:12s} seed {seed}: acc {r['final_acc']:.3f} eps "
                              f"{r['epsilon']} sigma {spec['noise_multiplier']:.3f} wall {r['wall_s']:.0f} s "
                              f"peak {r['peak_rss_mb']:,.0f} MB", flush=True)
                        rows.append(r)
    wall_total = time.time() - t_start
    agg = summarise(rows)
    text = table(agg, calib, args, wall_total)
    stem = "bench_dp_scale_quick" if args.quick else "bench_dp_scale"
    args.out.mkdir(parents=True, exist_ok=True)
    figure(agg, args.out / f"{stem}.png", args)
    (args.out / f"{stem}.md").write_text(text + "\n")
    doc = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "target_gap_pts": TARGET_GAP, "clients_needed": needed(agg), "wall_total_s": wall_total,
           "process_peak_rss_mb": peak_rss_mb(False), "cpu_count": os.cpu_count(), "partitions": partitions,
           "calibration": calib,
           "summary": agg, "runs": rows}
    (args.out / f"{stem}.json").write_text(json.dumps(doc, indent=2, default=lambda x: None if x != x else str(x)))
    print(text)
    return doc


if __name__ == "__main__":
    main()
