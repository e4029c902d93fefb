"""A real two-node Ray cluster on 127.0.0.1: the federation attaches to it and its ClientApps run on both nodes.

Slow (about 1-2 minutes on 2 cores). The test starts `ray start --head` and a second `ray start --address`
node itself (1 CPU each, so Flower's actor pool holds one ClientApp actor per node), runs a 1-round
federation of 2 supernodes attached to it through `ray.init(address=...)` (Flower's backend `init_args`),
and reads back, per handled message, the Ray node id the ClientApp ran on. It stops only what it started:
every process it launched carries a unique marker in its environment (Ray's gcs_server, raylets, agents
and workers inherit it), so they are found by PID, sent SIGTERM, then SIGKILL after a grace period, also
when the test fails. Never `ray stop`, which would end every Ray on the machine.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARK = "TASKEDGE_RAY_CLUSTER_TEST"
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _marked(token: str) -> list:
    """Live processes carrying MARK=token in their environment (ours by construction)."""
    import psutil

    out = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and p.environ().get(MARK) == token:
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return out


def _stop(started: list[subprocess.Popen], token: str, grace: float = 15.0) -> list[int]:
    """SIGTERM the `ray start --block` processes (they stop their own services), then every marked process
    and every descendant left; SIGKILL what outlives `grace`. Returns the PIDs still alive at the end."""
    import psutil

    tracked = {}
    for proc in started:
        try:
            root = psutil.Process(proc.pid)
            tracked[root.pid] = root
            tracked.update({c.pid: c for c in root.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    tracked.update({p.pid: p for p in _marked(token)})
    for proc in reversed(started):  # worker node first, then the head
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in started:
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    tracked.update({p.pid: p for p in _marked(token)})
    alive = [p for p in tracked.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for p in alive:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(alive, timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    for proc in started:  # reap our direct children
        try:
            proc.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass
    left = [pid for pid, p in tracked.items() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    return sorted(left + [p.pid for p in _marked(token) if p.pid not in tracked])


@pytest.fixture
def ray_cluster():
    """A head and a worker Ray node (1 CPU each) on 127.0.0.1; yields (address, env, token, tmp)."""
    tmp = tempfile.mkdtemp(prefix="rc-", dir="/tmp")  # short: Ray's AF_UNIX socket paths must stay < 108 bytes
    token = uuid.uuid4().hex
    env = dict(os.environ, **{MARK: token, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
                              "HF_DATASETS_OFFLINE": "1", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
                              "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # =0 would make `ray start --address` refuse to join
    env.pop("RAY_ADDRESS", None)
    port = _free_port()
    common = ["--num-cpus", "1", "--num-gpus", "0", "--node-ip-address", "127.0.0.1", "--block",
              "--disable-usage-stats", "--include-log-monitor", "false",
              "--dashboard-agent-listen-port", "0", "--metrics-export-port", "0"]
    started: list[subprocess.Popen] = []

    def launch(args, name):
        log = open(os.path.join(tmp, f"{name}.log"), "w")
        started.append(subprocess.Popen([RAY, "start", *args, *common], env=env, cwd=tmp, stdout=log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True))  # own process group, own session

    def log_tail():
        return "\n".join(f"--- {f.name}\n" + f.read_text()[-3000:] for f in sorted(Path(tmp).glob("*.log")))

    try:
        launch(["--head", "--port", str(port), "--temp-dir", tmp, "--include-dashboard", "false",
                "--ray-client-server-port", str(_free_port())], "head")
        deadline = time.time() + 90
        while True:  # the GCS answers on its port
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert started[0].poll() is None and time.time() < deadline, "head did not start\n" + log_tail()
                time.sleep(0.5)
        launch(["--address", f"127.0.0.1:{port}"], "worker")
        yield f"127.0.0.1:{port}", env, token, tmp, started, log_tail
    finally:
        left = _stop(started, token)
        shutil.rmtree(tmp, ignore_errors=True)
        assert not left, f"processes of the test cluster still alive: {left}"


@pytest.mark.slow
def test_federation_runs_clientapps_on_both_nodes_of_a_ray_cluster(ray_cluster, tmp_path):
    address, env, token, tmp, started, log_tail = ray_cluster
    trace = tmp_path / "trace"
    run_config = {"num-server-rounds": 1, "min-nodes": 2, "local-epochs": 1, "server-test-size": 50,
                  "calib-size": 16, "output-dir": str(tmp_path / "runs")}
    driver_env = dict(env, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")  # the driver keeps 127.0.0.1 (no outward IP)
    driver = subprocess.run(
        [sys.executable, "-m", "benchmarks.ray_simulation", "--address", address, "--supernodes", "2",
         "--wait-nodes", "2", "--run-config", json.dumps(run_config), "--trace-dir", str(trace)],
        cwd=ROOT, env=driver_env, capture_output=True, text=True, timeout=300)
    assert driver.returncode == 0, driver.stdout[-3000:] + driver.stderr[-5000:] + log_tail()
    doc = json.loads(driver.stdout.strip().splitlines()[-1])

    nodes = {n["node_id"]: n for n in doc["ray_nodes"] if n["alive"]}
    assert len(nodes) == 2 and sorted(n["head"] for n in nodes.values()) == [False, True], doc["ray_nodes"]
    assert all(n["cpus"] == 1 for n in nodes.values())
    calls = doc["trace"]
    assert calls and not any(c["error"] for c in calls), calls
    ran_on = {c["ray_node_id"] for c in calls}
    assert ran_on == set(nodes), (ran_on, set(nodes))  # ClientApps ran on the head AND on the worker node
    assert {c["partition_id"] for c in calls} == {0, 1}
    assert {c["message_type"].split(".")[0] for c in calls} >= {"train"}
    assert doc["summary"].get("rounds") == 1, doc["summary"]
    assert all(p.poll() is None for p in started), "a Ray node died during the run\n" + log_tail()
