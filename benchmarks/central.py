"""One centralised fine-tuning run of any registered method on a suite task (no Flower), and a worker pool.

The same code path as the federation's clients: `common.methods.build` turns the pre-trained
backbone into the method's trainable model (TaskEdge masks from calibration statistics, peft LoRA,
full, head-only), `common.train` trains it with two AdamW groups (`lr` for deltas/adapters/weights,
`head_lr` for the fresh dense head). Used by `sweep.py` (validation split), `compare_scores.py`
and the budget/rank sweeps (test split).
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

os.environ.setdefault("HF_HUB_OFFLINE", "1")



@dataclass(frozen=True)
class Run:
    task: str
    method: str  # a name of common.registry.METHODS
    lr: float
    head_lr: float
    seed: int = 0
    epochs: int = 10
    batch_size: int = 32
    eval_split: str = "test"  # "val" for model selection, "test" for reported numbers
    score: str = "taskedge"
    allocation: str = "neuron"
    budget: float = 0.02
    col_cap: float = 1.0
    lora_rank: int = 8  # fedlora's rank; taskedge-lora's rank of B
    nm: str = ""  # N:M of the merged weights for the taskedge methods, e.g. "2:4" ("" = off)
    calib: int = 256
    model: str = "taskedge-vit-tiny"  # or any timm model name
    weights: str = ""  # "" = embedded shipped weights (timm models: random init), "hub" = timm pretrained, or a file
    data_path: str = ""  # "" = the suite task; else a saved HF dataset / ImageFolder (per-split subfolders) / hub name
    tag: str = ""
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def key(self) -> str:
        return "|".join(f"{k}={v}" for k, v in asdict(self).items() if k != "extra")


def column_stats(mask) -> dict:
    """How the entries spread over input columns: columns touched, and the mean share of a module's
    entries held by its 5 most used columns."""
    import torch

    touched = total_cols = 0
    shares = []
    for name in mask.names():
        rows, width = mask.shapes[name]
        cols = mask.indices[name] % width
        total_cols += width
        if cols.numel() == 0:
            continue
        counts = torch.bincount(cols, minlength=width)
        touched += int((counts > 0).sum())
        shares.append(float(counts.sort(descending=True).values[:5].sum()) / cols.numel())
    return {"columns_touched": touched, "columns_total": total_cols,
            "top5_column_share": sum(shares) / max(len(shares), 1)}


def prepare(run: Run, base, calib: tuple | None) -> tuple:
    """The run's trainable model on `base` (in place where the method allows) and its mask (None for the
    methods without one), the mask calibrated on `calib` = (x, y): `common.methods.build_calibrated`, the
    registry's one build path."""
    from common.methods import build_calibrated
    from common.settings import parse_nm
    from common.taskedge.config import TaskEdgeConfig
    from common.train import batches

    tcfg = TaskEdgeConfig(budget=run.budget, score=run.score, allocation=run.allocation, seed=run.seed,
                          col_cap=run.col_cap, nm=parse_nm(run.nm))
    calib_batches = list(batches(*calib, 64, shuffle=False)) if calib is not None else None
    return build_calibrated(run.method, base, tcfg, calib_batches, run.lora_rank, run.seed)


def finetune(run: Run, threads: int = 1) -> dict:
    """Train `run` and return accuracy on its eval split (plus per-epoch history and trainable counts)."""
    import torch

    from common.data.splits import make_split
    from common.data.tasks import get_task
    from common.methods import base_model
    from common.registry import method_info
    from common.train import evaluate, make_optimizer, train_epochs
    from common.taskedge.tuner import count_trainable, find_head

    torch.set_num_threads(threads)
    torch.manual_seed(run.seed)
    spec = get_task(run.task)
    split_data = (lambda split: make_split(spec, split)) if not run.data_path else (lambda split: _own_split(run, spec, split))
    x, y = split_data("train")
    xe, ye = split_data(run.eval_split)
    num_classes = spec.num_classes if not run.data_path else int(max(y.max(), ye.max())) + 1
    base = base_model(run.model, num_classes, run.weights, 0)
    t0 = time.perf_counter()
    calib = None
    kind = method_info(run.method)
    if kind.uses_mask:  # only the mask methods calibrate
        calib = make_split(spec, "calib", n=run.calib) if not run.data_path else (x[:run.calib], y[:run.calib])
    model, mask = prepare(run, base, calib)
    info = column_stats(mask) if mask is not None else {}
    setup_s = time.perf_counter() - t0
    head = find_head(model.get_base_model() if hasattr(model, "get_base_model") else model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    head_n = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and f"{head}." in f".{n}")
    if kind.optimizer == "galore":
        from common.baselines import galore_optimizer

        opt = galore_optimizer(model, run.lr, run.head_lr, run.lora_rank)
    else:
        opt = make_optimizer(model, run.lr, head_lr=run.head_lr)
    history = []
    t0 = time.perf_counter()
    for epoch in range(1, run.epochs + 1):
        tr = train_epochs(model, x, y, epochs=1, batch_size=run.batch_size, lr=run.lr, seed=run.seed * 1000 + epoch,
                          optimizer=opt)
        history.append({"epoch": epoch, "train_loss": tr["loss"], "train_acc": tr["acc"]})
    ev = evaluate(model, xe, ye)
    other = "test" if run.eval_split == "val" else "val"
    ev_other = evaluate(model, *split_data(other))
    out = {**asdict(run), "acc": ev["acc"], "loss": ev["loss"], f"{run.eval_split}_acc": ev["acc"],
           f"{other}_acc": ev_other["acc"], "trainable": trainable,
           "trainable_head": head_n, "trainable_body": trainable - head_n,
           "train_s": round(time.perf_counter() - t0, 2), "setup_s": round(setup_s, 2), "history": history, **info}
    if kind.uses_mask:
        out["entries"] = count_trainable(model)["delta"]
    if hasattr(model, "peft_refused"):
        out["peft_refused"] = model.peft_refused  # depthwise convs peft would not adapt (left frozen)
    return out


def _own_split(run: Run, spec, split: str):
    """Your own data for `split` (train / val / test): a saved HF dataset (splits train / validation / test),
    an ImageFolder tree with train/, val/, test/ subfolders, or a hub dataset name (online)."""
    from pathlib import Path

    from common.data.loading import load_hf_dataset, load_image_folder

    path = Path(run.data_path).expanduser()
    hf_split = {"val": "validation"}.get(split, split)
    if path.is_dir() and (path / split).is_dir():
        return load_image_folder(path / split, spec, split)
    return load_hf_dataset(run.data_path, spec, hf_split)


def _worker(run: Run) -> dict:
    try:
        return finetune(run)
    except Exception as exc:  # noqa: BLE001 - reported per run, the pool goes on
        import traceback

        return {**asdict(run), "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}


def run_many(runs: Iterable[Run], workers: int = 1, on_result: Callable[[dict], None] | None = None) -> list[dict]:
    """Run everything, `workers` processes of one torch thread each; results in input order."""
    runs = list(runs)
    if workers <= 1:
        results = []
        for r in runs:
            results.append(_worker(r))
            if on_result:
                on_result(results[-1])
        return results
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    results: list[dict | None] = [None] * len(runs)
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        futs = {pool.submit(_worker, r): i for i, r in enumerate(runs)}
        for fut in as_completed(futs):
            results[futs[fut]] = fut.result()
            if on_result:
                on_result(results[futs[fut]])
    return results  # type: ignore[return-value]


def mean_sd(values: list[float]) -> tuple[float, float]:
    import numpy as np

    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def warm_cache(tasks=None) -> None:
    """Generate every split of the suite once (before worker processes would each render it)."""
    from common.data.splits import make_split
    from common.data.tasks import SPLITS, SUITE

    for task in tasks or SUITE:
        for split in SPLITS:
            make_split(task, split)
