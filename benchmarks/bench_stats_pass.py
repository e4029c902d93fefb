"""TaskEdge statistics (importance) pass vs a plain no_grad forward, before and after the batch-summed fix.

"before" is the previous ``FeatureStats.add_batch`` Conv2d path (kept here verbatim as
``_per_offset_add_batch``): square the padded batch, then one strided-view sum over the whole batch
per kernel offset (kh*kw passes over the activations per batch). "after" is ``common.taskedge.stats`` now:
sum the squares over the batch first into a (C, H, W) map, and take the per-offset sums of that
batch-size times smaller map once, when ``ss`` is read. Both timed passes read ``ss`` at the end (so
the deferred reduction is inside the timing). Forward / before / after run interleaved round-robin
(``benchmarks.profiling.interleaved_times``); ratios are medians of ``--reps`` over the forward's median.

    nice -n 10 .venv/bin/python -m benchmarks.bench_stats_pass --json results/bench_stats_pass.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import profiling
from common.taskedge import stats as statslib
from common.taskedge.config import TaskEdgeConfig
from common.models import create_model
from common.taskedge.tuner import target_modules

CASES = (("taskedge-mobilenetv2-tiny", 32), ("taskedge-resnet-tiny", 32), ("mobilenetv2_050", 64), ("resnet18", 64))


@torch.no_grad()
def _per_offset_add_batch(st: statslib.FeatureStats, x: torch.Tensor) -> None:
    """The previous Conv2d path of FeatureStats.add_batch (the "before")."""
    m = st.module
    if isinstance(m, nn.Linear):
        return statslib.FeatureStats.add_batch(st, x)
    x = x.detach().float()
    if x.dim() == 3:
        x = x.unsqueeze(0)
    xp = F.pad(x, m._reversed_padding_repeated_twice).pow_(2) if any(m._reversed_padding_repeated_twice) else x.pow(2)
    (kh, kw), (sh, sw), (dh, dw) = m.kernel_size, m.stride, m.dilation
    ho = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    wo = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    out = torch.empty(m.in_channels, kh, kw, dtype=torch.float64)
    for u in range(kh):
        for v in range(kw):
            view = xp[:, :, u * dh: u * dh + sh * (ho - 1) + 1: sh, v * dw: v * dw + sw * (wo - 1) + 1: sw]
            out[:, u, v] = view.sum((0, 2, 3)).double().cpu()
    st.ss = st.ss + out
    st.n += xp.shape[0] * ho * wo


def stats_pass(model, mods, batches, old: bool) -> dict:
    model.eval()
    col = statslib.StatsCollector({})
    col.stats = {n: statslib.FeatureStats(m) for n, m in mods.items()}
    add = _per_offset_add_batch if old else statslib.FeatureStats.add_batch
    for n, m in mods.items():
        st = col.stats[n]
        col._handles.append(m.register_forward_pre_hook(lambda _m, a, st=st: add(st, a[0])))
    with col, torch.no_grad():
        for xb in batches:
            model(xb)
    return {n: st.ss for n, st in col.stats.items()}  # reading ss folds the pending maps in


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    out = {"settings": {"reps": args.reps, "batches": args.batches, "batch": args.batch, "threads": args.threads}}
    for name, img in CASES:
        torch.manual_seed(0)
        model = create_model(name, num_classes=10).eval()
        mods = target_modules(model, TaskEdgeConfig())
        gen = torch.Generator().manual_seed(0)
        batches = [torch.randn(args.batch, 3, img, img, generator=gen) for _ in range(args.batches)]
        a, b = stats_pass(model, mods, batches, True), stats_pass(model, mods, batches, False)
        maxrel = max(float(((a[k] - b[k]).abs() / a[k].abs().clamp_min(1e-12)).max()) for k in a)

        def forward(model=model, batches=batches):
            with torch.no_grad():
                for xb in batches:
                    model(xb)

        wall, _ = profiling.interleaved_times(
            {"forward": forward,
             "before": lambda model=model, mods=mods, batches=batches: stats_pass(model, mods, batches, True),
             "after": lambda model=model, mods=mods, batches=batches: stats_pass(model, mods, batches, False)},
            1, args.reps)
        f = statistics.median(wall["forward"])
        row = {"img_size": img, "forward_ms": 1e3 * f, "max_rel_diff_before_after": maxrel}
        for k in ("before", "after"):
            row[f"{k}_ratio"] = statistics.median(wall[k]) / f
            row[f"{k}_ratio_min_max"] = [min(wall[k]) / f, max(wall[k]) / f]
        print(name, row, file=sys.stderr, flush=True)
        out[name] = row
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    res = run(args)
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
