"""Measuring a training step: tensor-memory accounting, peak RSS and interleaved timing.

The rules of ``benchmarks/bench_step.py``'s memory figure live here, apart from the entry point,
so that tests can hold them to hand-computed byte counts (tests/test_profiling.py):

* a tensor costs the whole storage behind it (a view keeps all of it alive), and each storage
  counts once however many tensors share it;
* one step keeps alive: parameters + buffers (+ the gather indices SparseDeltaConv2d caches),
  the tensors autograd saves for backward (that are not parameters/buffers already), the
  gradients and the optimizer state.

That is a deterministic, allocator-independent count, not a sampled high-water mark; peak RSS
is read beside it for reference only. ``step_live_peak`` / ``LiveTensorPeak`` give the other
figure, the *simultaneous* peak: the high-water mark of live tensor bytes over the step (storages
added when an aten op creates them, removed when freed), which sees saved tensors being released
during backward and the transient temporaries of backward and the optimizer step. Timing interleaves the compared callables round-robin
so that load from other processes on a shared machine hits each of them alike.

Only torch and the standard library (plus our own layers; ``PeakRSS``, a sampled high-water mark of a
whole federation in one process, imports psutil when built); nothing runs at import.
"""
from __future__ import annotations

import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_weight

from common.taskedge.layers import SparseDeltaConv2d
from common.taskedge.sparse_ops import conv_value_grad

MIB = 1024 * 1024


# --- tensor memory ---------------------------------------------------------------------------

def storage(t: torch.Tensor) -> tuple[int | None, int]:
    """(data_ptr, nbytes) of the whole storage behind ``t``, or (None, 0) where there is none
    (e.g. sparse or meta tensors): a view keeps its whole storage alive, so all of it counts."""
    try:
        st = t.untyped_storage()
        return st.data_ptr(), st.nbytes()
    except (RuntimeError, NotImplementedError, TypeError):
        return None, 0


def _by_storage(tensors: Iterable[torch.Tensor]) -> dict[int, int]:
    out = {}
    for t in tensors:
        ptr, nb = storage(t)
        if ptr:
            out[ptr] = nb
    return out


def model_storages(model: nn.Module) -> dict[int, int]:
    """{data_ptr: nbytes} of what the model itself keeps alive: parameters, buffers and the gather
    indices SparseDeltaConv2d caches per input shape (they are as resident as a buffer)."""
    tensors = list(model.parameters()) + list(model.buffers())
    for mod in model.modules():
        if isinstance(mod, SparseDeltaConv2d):
            tensors += [t for v in mod.index_cache.values() for t in (v if isinstance(v, tuple) else (v,))
                        if torch.is_tensor(t)]
    return _by_storage(tensors)


@contextmanager
def saved_tensor_meter(exclude: Iterable[int] = ()):
    """Record the storage of every tensor autograd saves for backward inside the block; yields the
    {data_ptr: nbytes} dict it fills. Storages in ``exclude`` (the model's own) are not recorded,
    so that a frozen weight saved for the input gradient is not counted twice."""
    skip, seen = set(exclude), {}

    def pack(t):
        ptr, nb = storage(t)
        if ptr and ptr not in skip:
            seen[ptr] = max(seen.get(ptr, 0), nb)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield seen


def optimizer_storages(opt: torch.optim.Optimizer | None) -> dict[int, int]:
    """{data_ptr: nbytes} of the tensors in the optimizer's per-parameter state (AdamW: exp_avg,
    exp_avg_sq and the step counter)."""
    if opt is None:
        return {}
    return _by_storage(v for state in opt.state.values() for v in state.values() if torch.is_tensor(v))


def optimizer_state_bytes(opt: torch.optim.Optimizer | None) -> int:
    """Bytes of the optimizer's per-parameter state, each storage once."""
    return sum(optimizer_storages(opt).values())


def train_step(model: nn.Module, opt: torch.optim.Optimizer | None, x: torch.Tensor, y: torch.Tensor,
               floor: bool = False) -> torch.Tensor:
    """One step: zero_grad, forward, cross-entropy, backward, optimizer step. ``floor`` backpropagates
    to a fresh leaf copy of the input (the frozen-backbone floor has no weight gradient to stop at);
    returns the input the step ran on, so the caller can count its gradient."""
    if opt is not None:
        opt.zero_grad(set_to_none=True)
    if floor:
        x = x.detach().requires_grad_(True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    if opt is not None:
        opt.step()
    return x


def step_memory(model: nn.Module, opt: torch.optim.Optimizer | None, x: torch.Tensor, y: torch.Tensor,
                floor: bool = False) -> dict[str, int]:
    """Bytes one training step keeps alive, by part: params (+buffers), saved (for backward), grads,
    optim. Run it after a warm-up ``train_step`` so that the optimizer state and the layers' index
    caches exist, as they do in every later step."""
    params = model_storages(model)
    with saved_tensor_meter(params) as saved:  # hooks fire in the forward only (no create_graph)
        xin = train_step(model, opt, x, y, floor)
    grads = [p.grad for p in model.parameters() if p.grad is not None] + ([xin.grad] if floor else [])
    return {"params": sum(params.values()), "saved": sum(saved.values()),
            "grads": sum(g.numel() * g.element_size() for g in grads), "optim": optimizer_state_bytes(opt)}


def peak_rss_reset() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0); False where that is impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb(reset_ok: bool) -> float:
    """Peak RSS in MiB: ``VmHWM`` since the last reset, else ``ru_maxrss``, which is monotone over
    the whole process (then only the first measurement is its own)."""
    if reset_ok:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru / (MIB if sys.platform == "darwin" else 1024)


class PeakRSS:
    """Peak resident set size of this process while inside (psutil, sampled every 50 ms)."""

    def __init__(self, every: float = 0.05):
        import psutil

        self.proc, self.every, self.peak = psutil.Process(), every, 0
        self._stop = threading.Event()

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(self.every)

    def __enter__(self):
        self.peak = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def mb(self) -> float:
        return self.peak / 2**20


# --- timing ----------------------------------------------------------------------------------

def interleaved_times(fns: dict[str, Callable[[], object]], warmup: int,
                      reps: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and process-CPU seconds of ``reps`` calls of each callable, after ``warmup`` untimed
    calls each; the calls go round-robin so that a load change on a shared machine hits every
    callable alike instead of whichever happened to run then."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    return wall, cpu


def importance_pass_times(model: nn.Module, stats_pass: Callable[[], object], batches: Iterable, repeats: int) -> dict:
    """The calibration statistics pass against a plain no_grad forward of ``model`` over the same
    (input, target) batches: median seconds of each (one warm-up, ``repeats`` interleaved runs)
    and their ratio, the overhead the statistics hooks add to the forward they ride on."""
    batches = list(batches)

    def forward():
        model.eval()
        with torch.no_grad():
            for xb, _ in batches:
                model(xb)

    wall, _ = interleaved_times({"forward": forward, "stats": stats_pass}, 1, repeats)
    s, f = statistics.median(wall["stats"]), statistics.median(wall["forward"])
    return {"stats_s": s, "forward_s": f, "ratio": s / f}


def conv_value_grad_times(n: int, c: int, size: int, k: int, stride: int, gen: torch.Generator, warmup: int,
                          reps: int) -> dict:
    """Depthwise k x k conv over an (n, c, size, size) input with one trainable entry per channel (the
    usual budget): median ms of the value gradient alone, "sparse" (SparseDeltaConv2d's offset
    gather) vs "dense" (torch's dense weight gradient, then a gather), from the same saved input and
    output gradient. Raises RuntimeError if the two disagree: timing a wrong result is meaningless."""
    base = nn.Conv2d(c, c, k, stride=stride, padding=k // 2, groups=c)
    width = base.weight[0].numel()
    idx = torch.sort(torch.randint(0, width, (c,), generator=gen) + torch.arange(c) * width).values
    layer = SparseDeltaConv2d(base, idx, "float32", dense_grad=False)
    x = torch.randn(n, c, size, size, generator=gen)
    dy = torch.randn(base(x).shape, generator=gen)
    keep = x.index_select(1, layer.uch)  # what the sparse mode saves (all channels here)

    def sparse():
        return conv_value_grad(keep, dy, base.weight.shape, layer.pad, base.stride, base.dilation,
                               layer.inv_ch, layer.ent_o, layer.ent_uv, layer.o_ident, layer.index_cache)

    def dense():
        gw = conv2d_weight(x, base.weight.shape, dy, base.stride, base.padding, base.dilation, base.groups)
        return gw.reshape(-1).index_select(0, layer.flat_idx)

    gs, gd = sparse(), dense()
    if not torch.allclose(gs, gd, rtol=1e-3, atol=1e-3):
        raise RuntimeError(f"sparse and dense value gradients differ for a depthwise {k}x{k} conv on "
                           f"{[n, c, size, size]} (stride {stride}): max abs difference {(gs - gd).abs().max():.3g}")
    wall, _ = interleaved_times({"sparse": sparse, "dense": dense}, warmup, reps)
    row = {"shape": [n, c, size, size], "kernel": k, "stride": stride, "entries": int(idx.numel()),
           "sparse_ms": 1e3 * statistics.median(wall["sparse"]), "dense_ms": 1e3 * statistics.median(wall["dense"])}
    row["sparse_over_dense"] = row["sparse_ms"] / row["dense_ms"]
    return row


# --- simultaneous peak of live tensor memory ---------------------------------------------------

class LiveTensorPeak(torch.utils._python_dispatch.TorchDispatchMode):
    """High-water mark of live tensor bytes while the block runs (a TorchDispatchMode).

    Starts from ``base`` bytes (what exists before the block and stays: parameters, buffers,
    optimizer state, the input batch). Every storage an aten op returns that is not already
    counted (views and in-place results share their storage and count once) is added when it is
    created and removed when it is freed (a weak reference on the storage), so ``peak`` is the
    largest simultaneous total — saved activations, gradients as they accumulate, and the
    temporaries inside backward and the optimizer step included. Storages allocated outside any
    aten op (none in a training step) would be missed. Allocator-independent: the figure is the
    tensor bytes, not what the caching allocator reserves."""

    def __init__(self, base: int = 0, known: Iterable[int] = ()):
        super().__init__()
        self.live = self.peak = int(base)
        self._refs: dict[int, object] = {}
        # storages already counted in ``base`` (data pointers): an op returning a view of one of them
        # (``weight.detach()``, ``param.view(...)``) allocates nothing and must not count it again
        self._known = set(known)

    def _free(self, key: int, nb: int) -> None:
        if self._refs.pop(key, None) is not None:
            self.live -= nb

    def _track(self, t: torch.Tensor) -> None:
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError, TypeError):
            return
        key = st.data_ptr()
        if not key or key in self._refs or key in self._known:
            return
        nb = st.nbytes()
        import weakref
        self._refs[key] = weakref.ref(st, lambda _r, k=key, n=nb: self._free(k, n))
        self.live += nb
        self.peak = max(self.peak, self.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def step_live_peak(model: nn.Module, opt, x: torch.Tensor, y: torch.Tensor, floor: bool = False,
                   extra_state: int = 0) -> dict[str, int]:
    """Simultaneous peak of tensor bytes over one training step (run after a warm-up step):
    ``base`` = parameters + buffers (+ layer index caches) + optimizer state (+ ``extra_state``,
    e.g. GaLore projection matrices kept outside ``opt.state``'s tensors) + the input batch, and
    ``peak`` = base + the largest simultaneous total of what the step allocates."""
    if opt is not None:
        opt.zero_grad(set_to_none=True)
    own = model_storages(model)
    opt_state = optimizer_storages(opt)
    batch = _by_storage([x, y])
    base = sum(own.values()) + sum(opt_state.values()) + int(extra_state) + sum(batch.values())
    with LiveTensorPeak(base, known=set(own) | set(opt_state) | set(batch)) as meter:
        train_step(model, opt, x, y, floor)
    return {"base": base, "peak": meter.peak}
