"""Dense vs semi-structured (2:4) Linear stack on a GPU: inference and the frozen-base training step.

The stack is ViT-B's MLP shape by default: `--layers` x (Linear(d, 4d) -> GELU -> Linear(4d, d)),
d = 768, 12 layers, tokens = 32 x 197 (a batch of 32 images at 224 px). Weights are random and
pruned to 2:4 along the input by magnitude (what a merged N:M TaskEdge run exports), then
converted with `common.taskedge.nm.to_semi_structured` (`torch.sparse.to_sparse_semi_structured`).

For every dtype (fp16, bf16), token count and backend (dense; semi-structured via cuSPARSELt and
via CUTLASS, where torch offers them):

* ``infer``  a no-grad forward of the whole stack;
* ``train``  the frozen-base training step's floor: forward + backward to the input
  (x.requires_grad, no weight gradient), with the semi-structured weight in the backward too
  when torch supports that, else recorded as the error torch raised;
* ``train_hybrid``  forward on the sparse weight, input gradient on a dense copy (a custom
  autograd function; what a frozen N:M base can use when the sparse backward is unsupported).

Times are CUDA-event times of `--iters` calls, divided by `--iters`, after `--warmup` calls;
median / min / max over `--reps` repetitions (>= 5). Also reported: conversion time of all
weights, the largest output difference against dense, and achieved TFLOP/s. Prints one JSON
object (and writes it with `--json`). Without CUDA it prints {"error": "no CUDA ..."} and exits 0.

    python -m benchmarks.bench_nm_gpu --json results/nm_gpu.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from benchmarks.report import emit

import torch
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.taskedge.nm import nm_violations, semi_structured_unsupported, to_semi_structured  # noqa: E402


def make_stack(layers: int, d: int, dtype: torch.dtype, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    mods = []
    for _ in range(layers):
        mods += [nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)]
    net = nn.Sequential(*mods)
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Linear):
                w = m.weight
                g = w.abs().reshape(w.shape[0], -1, 4)
                keep = torch.zeros_like(g, dtype=torch.bool).scatter_(2, g.topk(2, dim=2).indices, True)
                w.mul_(keep.reshape(w.shape))
    return net.to("cuda", dtype).requires_grad_(False)


class _SparseFwdDenseBwd(torch.autograd.Function):
    """y = x W_sparse^T + b; dx = dy W_dense (the frozen base: no weight gradient)."""

    @staticmethod
    def forward(ctx, x, w_sparse, w_dense, bias):
        ctx.w_dense = w_dense
        return nn.functional.linear(x, w_sparse, bias)

    @staticmethod
    def backward(ctx, dy):
        return dy @ ctx.w_dense, None, None, None


class HybridLinear(nn.Module):
    def __init__(self, dense: nn.Linear, sparse_weight: torch.Tensor):
        super().__init__()
        self.w_dense, self.w_sparse, self.bias = dense.weight.detach(), sparse_weight, dense.bias.detach()

    def forward(self, x):
        return _SparseFwdDenseBwd.apply(x, self.w_sparse, self.w_dense, self.bias)


def timed(fn, warmup: int, iters: int, reps: int) -> dict:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000.0 / iters)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "reps": reps,
            "iters": iters}


def _set_backend(name: str) -> None:
    cls = torch.sparse.SparseSemiStructuredTensor
    cls._FORCE_CUTLASS = name == "cutlass"


def run_case(args, dtype: torch.dtype, tokens: int) -> dict:
    dense = make_stack(args.layers, args.dim, dtype)
    linears = [m for m in dense if isinstance(m, nn.Linear)]
    assert all(nm_violations(m.weight, 2, 4) == 0 for m in linears)
    flop_fwd = 2.0 * tokens * sum(m.weight.numel() for m in linears)
    x = torch.randn(tokens, args.dim, device="cuda", dtype=dtype)
    t = dict(warmup=args.warmup, iters=args.iters, reps=args.reps)

    def infer(net):
        with torch.no_grad():
            return net(x)

    def train(net):
        xi = x.detach().requires_grad_(True)
        net(xi).float().square().mean().backward()
        return xi.grad

    out = {"dtype": str(dtype).replace("torch.", ""), "tokens": tokens, "fwd_gflop": flop_fwd / 1e9, "backends": {}}
    ref = infer(dense).float()
    res = {"infer": timed(lambda: infer(dense), **t), "train": timed(lambda: train(dense), **t)}
    res["infer"]["tflops"] = flop_fwd / res["infer"]["median_s"] / 1e12
    res["train"]["tflops"] = 2 * flop_fwd / res["train"]["median_s"] / 1e12  # forward + input gradient
    out["backends"]["dense"] = res
    backends = ["cusparselt", "cutlass"]
    for backend in backends:
        entry = {}
        try:
            _set_backend(backend)
            sparse = make_stack(args.layers, args.dim, dtype)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            report = to_semi_structured(sparse)
            torch.cuda.synchronize()
            entry["convert_s"] = time.perf_counter() - t0
            bad = {k: v for k, v in report.items() if v != "semi-structured"}
            if bad:
                entry["error"] = f"not converted: {bad}"
                out["backends"][backend] = entry
                continue
            entry["max_abs_diff_vs_dense"] = float((infer(sparse).float() - ref).abs().max())
            entry["ref_max_abs"] = float(ref.abs().max())
            entry["infer"] = timed(lambda: infer(sparse), **t)
            entry["infer"]["tflops_dense_equiv"] = flop_fwd / entry["infer"]["median_s"] / 1e12
            entry["infer"]["speedup_vs_dense"] = res["infer"]["median_s"] / entry["infer"]["median_s"]
            try:
                entry["train"] = timed(lambda: train(sparse), **t)
                entry["train"]["speedup_vs_dense"] = res["train"]["median_s"] / entry["train"]["median_s"]
            except Exception as exc:  # noqa: BLE001 - torch may not support the sparse backward
                entry["train"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
            hybrid = make_stack(args.layers, args.dim, dtype)
            mods = [HybridLinear(m, s.weight) if isinstance(m, nn.Linear) else m for m, s in zip(hybrid, sparse)]
            hyb = nn.Sequential(*mods)
            entry["train_hybrid"] = timed(lambda: train(hyb), **t)
            entry["train_hybrid"]["speedup_vs_dense"] = res["train"]["median_s"] / entry["train_hybrid"]["median_s"]
            sparse = hybrid = hyb = None  # free the GPU copies before the next backend
        except Exception as exc:  # noqa: BLE001 - a backend missing from this torch build
            entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        finally:
            _set_backend("cusparselt")
        out["backends"][backend] = entry
    dense = None
    torch.cuda.empty_cache()
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--tokens", type=int, nargs="+", default=[32 * 197])
    p.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--json", type=str, default="")
    args = p.parse_args(argv)
    if args.reps < 5:
        p.error("--reps must be >= 5")
    why = semi_structured_unsupported("cuda", torch.float16)
    result: dict = {"torch": torch.__version__, "settings": {k: v for k, v in vars(args).items() if k != "json"}}
    if why is not None:
        result["error"] = why
    else:
        result["device"] = torch.cuda.get_device_name()
        result["capability"] = list(torch.cuda.get_device_capability())
        result["cuda"] = torch.version.cuda
        cslt = getattr(torch.backends, "cusparselt", None)
        result["cusparselt"] = cslt.version() if cslt is not None and cslt.is_available() else None
        result["cases"] = [run_case(args, getattr(torch, d), n) for d in args.dtypes for n in args.tokens]
    emit(result, args.json, indent=1)
    return result


if __name__ == "__main__":
    main()
