"""Real-size timm models through the federation on an own image folder: time, memory and bytes per round.

    python -m benchmarks.bench_real_size                      # ViT-B/16 and ResNet-50 at 224 px (~15 min)
    python -m benchmarks.bench_real_size --quick              # CI: two tiny timm models at 32 px (~1 min)

For each model: random-init timm weights saved as a local safetensors file (no download; accuracy is not
the point, cost is), a generated ImageFolder (`--classes` x `--per-class` PNGs with a colour cue per class),
and a federation of `--nodes` simulated SuperNodes on Flower's simulation runtime (what `flwr run .`
starts locally; Ray, 1 CPU per ClientApp) with `data-path` pointing at the folder, `model` / `weights-path`
at the file, the model's own preprocessing (timm's data config: 224 px for both), 2 rounds x 1 local
epoch, once per method (`taskedge` at the default budget and at the paper's 0.1 %, and `fedlora` r = 8 on the
same model). Reported per run: seconds per training round (mean over rounds), the whole run (Ray start-up,
classes, statistics and mask phases included), peak memory of one ClientApp process (RSS of the Ray actor,
sampled every 0.5 s) and of the server process, bytes up and down per client per round (the records of the
real messages), trainable entries. JSON + markdown table.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_folder(root: Path, classes: int, per_class: int, size: int = 64, seed: int = 0) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for k in range(classes):
        d = root / f"class-{k}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            px = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            px[..., k % 3] = 255
            Image.fromarray(px).save(d / f"{i}.png")
    return root


def save_weights(model: str, path: Path, model_kwargs: dict) -> Path:
    import timm
    import torch
    from safetensors.torch import save_file

    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = timm.create_model(model, num_classes=1000, **model_kwargs)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def run_one(model: str, method: str, weights: Path, data: Path, args, out: Path) -> dict:
    from benchmarks.bench_fleet_sim import sampled_simulation
    from server import server_app

    method, _, extra = method.partition(":")  # e.g. "taskedge:budget=0.001": run-config keys for this run
    conf = {"model": model, "weights-path": str(weights), "data-path": str(data), "method": method,
            "num-server-rounds": args.rounds, "local-epochs": 1, "batch-size": args.batch_size,
            "calib-size": args.calib_size, "min-nodes": args.nodes, "partitioner": "iid",
            "output-dir": str(out), "round-timeout": 3600.0, "img-size": args.img_size,
            **{k: float(v) for k, v in (kv.split("=") for kv in extra.split(",") if kv)}}
    wall, memory, _ = sampled_simulation(args.nodes, args.cpus, conf)
    summary, hist = server_app.LAST.get("summary", {}), server_app.LAST.get("history", [])
    trained = [r for r in hist if "sent" in r]
    return {"model": model, "method": method + (f" ({extra})" if extra else ""), "status": summary.get("status"), "wall_s": round(wall, 1),
            "round_s": round(sum(r["round_time_s"] for r in trained) / max(len(trained), 1), 1),
            "client_peak_rss_mib": memory.get("actor", {}).get("rss_mib_max_per_process"),
            "server_peak_rss_mib": memory.get("server", {}).get("rss_mib_max_per_process"),
            "up_bytes_per_client_round": summary.get("upload_bytes_per_client_round"),
            "down_bytes_per_client_round": summary.get("download_bytes_per_client_round"),
            "trainable_entries": summary.get("trainable_entries"), "fed_acc": summary.get("final_fed_acc"),
            "rounds": summary.get("rounds")}


def table(rows: list[dict]) -> str:
    lines = ["| model | method | s / round | whole run s | client peak RSS MiB | server peak RSS MiB | "
             "up B / client / round | down B / client / round | trainable (incl. head) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['round_s']} | {r['wall_s']} | "
                     f"{r['client_peak_rss_mib']} | {r['server_peak_rss_mib']} | "
                     f"{(r['up_bytes_per_client_round'] or 0):,.0f} | {(r['down_bytes_per_client_round'] or 0):,.0f} | "
                     f"{(r['trainable_entries'] or 0):,} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="vit_base_patch16_224,resnet50")
    ap.add_argument("--methods", default="taskedge;fedlora;taskedge:budget=0.001",
                    help="';'-separated list; 'method:key=value,...' adds numeric run-config keys (e.g. the paper's "
                         "0.1 %% budget, ~1 entry per output neuron on ViT-B: taskedge:budget=0.001)")
    ap.add_argument("--append", action="store_true", help="add these runs to the existing JSON instead of replacing it")
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--per-class", type=int, default=12, help="images per class in the whole folder")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--calib-size", type=int, default=8)
    ap.add_argument("--img-size", type=int, default=0, help="0 = the model's own (timm's data config)")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="CI: two tiny timm models at 32 px, 1 round")
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    args = ap.parse_args(argv)
    kwargs = {}
    if args.quick:
        args.models, args.rounds, args.per_class, args.img_size = "resnet10t,vit_tiny_patch16_224", 1, 6, 32
        args.methods = "taskedge;fedlora"
        kwargs = {"vit_tiny_patch16_224": {"img_size": 64}}  # saved at 64 px, run at 32: pos_embed resampled
    tmp = Path(tempfile.mkdtemp(prefix="bench-real-"))
    rows = []
    try:
        data = make_folder(tmp / "images", args.classes, args.per_class)
        for model in args.models.split(","):
            weights = save_weights(model, tmp / f"{model}.safetensors", kwargs.get(model, {}))
            for method in args.methods.split(";"):
                r = run_one(model, method, weights, data, args, tmp / "runs")
                print(json.dumps(r), flush=True)
                rows.append(r)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    stem = "bench_real_size_quick" if args.quick else "bench_real_size"
    if args.append and (args.out / f"{stem}.json").is_file():
        rows = json.loads((args.out / f"{stem}.json").read_text())["runs"] + rows
    doc = {"setup": {"nodes": args.nodes, "rounds": args.rounds, "classes": args.classes,
                     "images": args.classes * args.per_class, "batch_size": args.batch_size,
                     "img_size": args.img_size or "model's own", "cpus": args.cpus,
                     "command": "python -m benchmarks.bench_real_size" + (" --quick" if args.quick else "")},
           "runs": rows, "table_md": table(rows)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(doc, indent=2))
    (args.out / f"{stem}.md").write_text(doc["table_md"])
    print(doc["table_md"])
    return doc


if __name__ == "__main__":
    main()
