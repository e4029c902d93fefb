"""Fast command-line checks: `check_config` / `run_flwr.sh` fail fast on a bad configuration, and
`finetune --help` and its option errors answer at once (no torch import), with exit code 2."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def run(args: list[str], timeout: float = 60, **kw) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False, **kw)
    return proc, time.perf_counter() - t0


def check_config(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    return run([PY, "-m", "simulations.check_config", *args])


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


# ---- check_config ---------------------------------------------------------------------------------

@pytest.mark.parametrize("args, expected", [
    # unknown key: named, with the closest valid key
    (["--run-config", "num-server-round=3"], ["'num-server-round'", "unknown key", "did you mean 'num-server-rounds'"]),
    (["--run-config", "local-epoch=2 lr=0.1"], ["'local-epoch'", "did you mean 'local-epochs'"]),
    # bad values: key, value and the expected form
    (["--run-config", "budget=2.5"], ["'budget'", "2.5", "integer"]),
    (["--run-config", "local-epochs=0"], ["'local-epochs'", "must be > 0", "got 0"]),
    (["--run-config", "method='fedx'"], ["'method'", "'fedx'", "must be one of taskedge"]),
    (["--run-config", "method=fedx"], ["'method'", "quotes"]),  # unquoted string: not TOML
    (["--run-config", "num-server-rounds = 3"], ["cannot parse", "key=value"]),  # flwr would drop it silently
    # combinations with the number of simulated nodes
    (["-n", "1"], ["'min-nodes'", "2", "1 simulated node (-n 1)", "-n >= 2"]),
    (["-n", "2", "--run-config", "min-replies=3"], ["'min-replies'", "3", "min-replies <= 2"]),
    (["-n", "3", "--federation-config", "num-supernodes=1"], ["'min-nodes'", "(num-supernodes=1)"]),
    (["-n", "3", "--run-config", "num-partitions=2"], ["'num-partitions'", "3 simulated nodes (-n 3)"]),
])
def test_check_config_rejects_with_one_line(args, expected):
    proc, seconds = check_config(*args)
    line = one_line_error(proc)
    print(f"check_config {' '.join(args)}: {seconds:.2f} s -> {line}")
    for text in expected:
        assert text in line, line


def test_check_config_accepts_and_prints_the_merged_value():
    proc, _ = check_config("-n", "2", "--run-config", "output-dir='/a/runs'", "--run-config",
                           "num-server-rounds=2 method='fedlora' output-dir='/b/runs'", "--stream", ".")
    assert proc.returncode == 0, proc.stderr
    proc, _ = check_config("-n", "2", "--run-config", "output-dir='/a/runs'", "--run-config",
                           "output-dir='/b/runs'", "--print", "output-dir")
    assert (proc.returncode, proc.stdout.strip()) == (0, "/b/runs"), proc.stderr


def test_check_config_needs_override_keys_in_pyproject(tmp_path):
    """`flwr run` rejects overrides of keys missing from [tool.flwr.app.config] (after starting Flower)."""
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[tool.flwr.app.config]\nmethod = "taskedge"\n')
    proc, _ = check_config("--pyproject", str(pyproject), "--run-config", "lr=0.1")
    assert "add `lr = 0.0` there" in one_line_error(proc)
    proc, _ = check_config("--pyproject", str(pyproject), "--run-config", "method='fedlora'")
    assert proc.returncode == 0, proc.stderr


def test_check_config_imports_no_torch_or_flwr():
    code = ("import sys, simulations.check_config; "
            "print(sorted(m for m in ('torch', 'flwr', 'ray', 'numpy') if m in sys.modules))")
    proc, _ = run([PY, "-c", code])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout


@pytest.mark.parametrize("text", [
    "num-server-rounds=3",
    "num-server-rounds=3 lr=0.01 method='fedlora'",
    "method=\"fedavg-full\" fraction-train=0.5 budget=100",
    "output-dir='/tmp/with space/runs' resume=''",
    "reconcile='vote' budget-ranks='0,1'",
    "seed=-1 alpha=1e-3",
])
def test_overrides_parse_like_flwr(text):
    """Same quoting rules as `flwr run --run-config` (flwr.common.config.parse_config_args)."""
    from flwr.common.config import parse_config_args

    from simulations.check_config import parse_overrides

    assert parse_overrides([text]) == parse_config_args([text])
    assert parse_overrides(["lr=0.1", text]) == parse_config_args(["lr=0.1", text])


def test_run_flwr_fails_fast_before_any_flower_process(tmp_path):
    """A bad key stops run_flwr.sh in the check: exit 2, one line, no scratch folder, no run folder."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc, seconds = run(["bash", "simulations/run_flwr.sh", "-n", "2", "--run-config",
                         f"num-server-round=1 output-dir='{tmp_path / 'runs'}'"], env=env)
    line = one_line_error(proc)
    print(f"run_flwr.sh with a bad key: {seconds:.2f} s -> {line}")
    assert "did you mean 'num-server-rounds'" in line
    assert proc.stdout == ""
    assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())  # no taskedge-flwr.* scratch, no runs/

    proc, _ = run(["bash", "simulations/run_flwr.sh", "-n", "0"], env=env)
    assert "-n" in one_line_error(proc)


# ---- finetune -------------------------------------------------------------------------------------

def imports_torch(proc) -> bool:
    """Whether a `python -X importtime` run imported torch (what makes a command slow here: ~2 s)."""
    return any(line.rstrip().endswith("| torch") for line in proc.stderr.splitlines())


def test_finetune_help_is_fast_and_documents_every_option():
    proc, _ = run([PY, "-X", "importtime", "-m", "simulations.finetune", "--help"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not imports_torch(proc)  # --help answers without importing torch
    lines = proc.stdout.splitlines()
    options = [i for i, line in enumerate(lines) if line.startswith("  -")]
    # an option with help text has it on its line (after two spaces) or on the next, indented line
    missing = [lines[i].split()[0] for i in options
               if "  " not in lines[i].strip() and not (i + 1 < len(lines) and lines[i + 1].startswith(" " * 10))]
    assert not missing, f"options without help text: {missing}"
    for option in ("--budget", "--epochs", "--batch-size", "--method", "--calib"):
        assert option in proc.stdout


@pytest.mark.parametrize("args, option", [
    (["--budget", "2.5"], "--budget"),
    (["--budget", "0"], "--budget"),
    (["--epochs", "0"], "--epochs"),
    (["--epochs", "-3"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--calib", "0"], "--calib"),
    (["--lr", "-1"], "--lr"),
    (["--train-size", "0"], "--train-size"),
    (["--score", "nope"], "--score"),
    (["--epochs", "two"], "--epochs"),
])
def test_finetune_rejects_bad_options(args, option):
    proc, _ = run([PY, "-X", "importtime", "-m", "simulations.finetune", *args])
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    last = proc.stderr.strip().splitlines()[-1]
    assert "error: argument " + option in last, last
    assert "Traceback" not in proc.stderr
    assert not imports_torch(proc)  # rejected before torch is imported
