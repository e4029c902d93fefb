"""Regenerate the shipped pre-trained weights of an embedded model (common/weights/).

    python -m simulations.pretrain_backbone                       # the fixed recipe -> common/weights/
    python -m simulations.pretrain_backbone --model taskedge-resnet-tiny   # likewise the ResNet / MobileNetV2
    python -m simulations.pretrain_backbone --check               # only verify the shipped file's sha256
    python -m simulations.pretrain_backbone --steps 200 --out /tmp/w.safetensors   # a timing trial

The recipe (`common.backbones.RECIPE`: AdamW, 8,000 steps of batch 128, warm-up + cosine, seed 0, one
torch thread) runs on `upstream-mix` (40,000 generated images: 10 upstream shapes + 20 random glyphs).
One thread makes the run bit-reproducible on one torch build; another torch version or CPU can
change the last bits, and so the hash (the accuracy stays the same to within noise). After training
it prints the sha256 (paste it into `common.backbones.EMBEDDED_WEIGHTS`) and the upstream test accuracy.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    from common import backbones as B
    from common.architectures import DEFAULT_MODEL, EMBEDDED_MODELS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(EMBEDDED_MODELS))
    ap.add_argument("--out", type=Path, default=None, help="default: the shipped file in common/weights/")
    ap.add_argument("--steps", type=int, default=None, help="override the recipe's steps (timing trials only)")
    ap.add_argument("--check", action="store_true", help="verify the shipped file's sha256 and exit")
    ap.add_argument("--device", default="cpu", help="cpu (bit-reproducible on one torch build) or cuda")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    fname, expected = B.EMBEDDED_WEIGHTS.get(args.model, (f"{args.model}.safetensors", None))
    shipped = B.WEIGHTS_DIR / fname
    if args.check:
        got = B.sha256(shipped)
        result = {"file": str(shipped), "sha256": got, "expected": expected, "ok": got == expected,
                  **B.embedded_info(shipped)}
        print(json.dumps(result, indent=2))
        if got != expected:
            raise SystemExit(f"sha256 mismatch for {shipped}: {got} != {expected}")
        return result
    if args.steps is not None:
        B.RECIPE["steps"] = int(args.steps)
        B.RECIPE["warmup_steps"] = min(B.RECIPE["warmup_steps"], max(1, args.steps // 10))
    out = args.out or shipped
    t0 = time.perf_counter()
    path = B.pretrain(args.model, out=out, progress=not args.quiet, device=args.device)
    result = {"file": path, "sha256": B.sha256(path), "seconds": round(time.perf_counter() - t0, 1),
              **B.embedded_info(path)}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
