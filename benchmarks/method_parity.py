"""One short in-process federation per federated method, accuracies as JSON: run it on two commits to check
that a refactoring leaves every method's results the same.

    python -m benchmarks.method_parity --json /tmp/after.json

Embedded default, 3 nodes of 6 partitions, 2 rounds of 1 local epoch, calib 32, 200 server test images.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from client.client_app import app as client_app
    from common.registry import FEDERATED_METHODS
    from common.settings import parse_run_config
    from server.inprocess import InProcessGrid, task_identity
    from server.runner import run_federation

    torch.set_num_threads(1)
    out = {}
    with task_identity():
        for method in FEDERATED_METHODS:
            cfg = parse_run_config({"method": method, "num-partitions": 6, "num-server-rounds": 2,
                                    "server-test-size": 200, "calib-size": 32, "batch-size": 32, "min-nodes": 1,
                                    "local-epochs": 1, "output-dir": tempfile.mkdtemp(prefix="parity-")})
            _, summary = run_federation(InProcessGrid(client_app, 3, cfg.to_dict()), cfg)
            out[method] = {k: summary[k] for k in ("initial_acc", "final_acc", "final_fed_acc") if k in summary}
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return out


if __name__ == "__main__":
    main()
