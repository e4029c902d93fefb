"""A real Flower deployment on 127.0.0.1: one SuperLink (TLS + SuperNode authentication), the Fleet-only
gateway and N SuperNodes, started, killed, restarted and stopped by PID.

Why this module exists: the slow deployment tests (tests/test_deploy.py, tests/test_fleet_deploy.py) and the
fleet benchmark (benchmarks/bench_fleet_deploy.py) start the same processes the same way as
docs/deployment.md: `deploy/make_certs.sh` certificates and node keys, `flower-superlink` (TLS,
`--enable-supernode-auth`, its own FLWR_HOME, working directory and database), `deploy/fleet_gateway.py`
(the only address the SuperNodes use), `flwr supernode register` per node key, `flower-supernode`s, and
runs submitted with `flwr run . <connection> --stream`. One copy of that machinery, importable by both.

Stopping is by process id only, never by name or machine-wide: every process a `Deployment` starts gets its
own session and carries TASKEDGE_DEPLOY_TEST=<root> in its environment; `Deployment.stop()` stops the
started PIDs that are not reaped yet, their descendants, and any live process with that marker (SIGTERM,
then SIGKILL), and returns what is left (nothing, when it worked). Use it in a `finally`, and
`raise_on_signals()` around it so that SIGTERM/SIGHUP run that `finally` as Ctrl-C does.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: flwr, flower-superlink, flower-supernode
CONN = "taskedge-test"
MARK_VAR = "TASKEDGE_DEPLOY_TEST"
RUN_TIMEOUT = 1200  # s, per run, on a shared 2-core machine


# --------------------------------------------------------------------------------------------------
# processes (by PID, from /proc)
# --------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ppids() -> dict[int, int]:
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                out[int(d.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def tree(pids) -> set[int]:
    """The given PIDs and all their live descendants."""
    ppid = ppids()
    keep = {p for p in pids if alive(p)}
    grown = True
    while grown:
        new = {p for p, pp in ppid.items() if pp in keep and p not in keep and alive(p)}
        keep |= new
        grown = bool(new)
    return keep


def marked(mark: str) -> set[int]:
    """Live processes whose environment carries TASKEDGE_DEPLOY_TEST=<mark> (everything a deployment started)."""
    needle = f"{MARK_VAR}={mark}".encode()
    out = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if needle in (d / "environ").read_bytes().split(b"\0") and alive(int(d.name)):
                    out.add(int(d.name))
            except OSError:
                pass
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:160]
    except OSError:
        return "?"


def suppress():
    """A process may be gone already (or not gone yet): neither is an error while stopping things."""
    return contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired)


def kill(pids, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after `grace` s, to each PID (never by name)."""
    pids = {p for p in pids if alive(p)}
    for p in pids:
        with suppress():
            os.kill(p, signal.SIGTERM)
    end = time.monotonic() + grace
    while time.monotonic() < end and any(alive(p) for p in pids):
        time.sleep(0.1)
    for p in pids:
        if alive(p):
            with suppress():
                os.kill(p, signal.SIGKILL)


def sigkill_tree(pid: int) -> set[int]:
    """SIGKILL a process and all its descendants at once (a device that loses power); the PIDs killed."""
    pids = tree([pid])
    for p in pids:
        with suppress():
            os.kill(p, signal.SIGKILL)
    return pids


def wait_for(pred, timeout: float, what: str, every: float = 1.0):
    """Poll `pred` until it returns something truthy (returned); AssertionError naming `what` on timeout."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@contextlib.contextmanager
def raise_on_signals(sigs=(signal.SIGTERM, signal.SIGHUP)):
    """Within the block, SIGTERM/SIGHUP raise KeyboardInterrupt (as Ctrl-C does), so `finally` blocks run."""
    def handler(signum, _frame):
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    old = {s: signal.signal(s, handler) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# --------------------------------------------------------------------------------------------------
# the deployment
# --------------------------------------------------------------------------------------------------

class Deployment:
    """One SuperLink (TLS + node auth), the Fleet gateway and N SuperNodes on 127.0.0.1 (docs/deployment.md).

    SuperNode i (0-based) uses key certs/keys/node<i+1>, node config `partition-id=i num-partitions=N`, log
    <root>/supernode<i>.log; `node_ids[i]` is the node id the SuperLink gave its key. `database=True` (default):
    the SuperLink keeps its state in <root>/link/state.db (registered keys and runs survive a restart);
    False: in memory (no `--database`; flwr 1.42's SQLite state answers concurrent SuperNode pushes with
    "database is locked" under load, see benchmarks/bench_fleet_deploy.py)."""

    def __init__(self, root: Path, nodes: int = 3, database: bool = True):
        self.root, self.n, self.mark, self.database = Path(root), nodes, str(root), database
        self.port, self.gw_port = free_port(), free_port()  # SuperLink (127.0.0.1 only), Fleet gateway
        self.node_ports = [free_port() for _ in range(nodes)]
        self.certs, self.link_dir, self.cli_home = self.root / "certs", self.root / "link", self.root / "cli"
        self.env = {**os.environ, MARK_VAR: self.mark, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
                    "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "HF_HUB_OFFLINE": "1",
                    "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                    # the apps run from Flower's bundle, which carries no .safetensors: the shipped backbone
                    "TASKEDGE_WEIGHTS_DIR": str(REPO / "common" / "weights")}
        self.started: list[subprocess.Popen] = []  # every process started, restarts included
        self.procs: dict[str, subprocess.Popen] = {}  # the latest one per name
        self.node_ids: dict[int, int] = {}  # partition -> node id

    def __enter__(self) -> "Deployment":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- plumbing --------------------------------------------------------------------------------
    def log(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def spawn(self, name: str, cmd: list, cwd: Path, home: Path) -> subprocess.Popen:
        """Start `cmd` in its own session with the marker; stdout+stderr appended to <root>/<name>.log."""
        cwd.mkdir(parents=True, exist_ok=True)
        home.mkdir(parents=True, exist_ok=True)
        with open(self.log(name), "ab") as out:
            proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env={**self.env, "FLWR_HOME": str(home)},
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self.procs[name] = proc
        self.started.append(proc)
        return proc

    def flwr(self, *args, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        res = subprocess.run([str(BIN / "flwr"), *map(str, args)], cwd=REPO, capture_output=True, text=True,
                             env={**self.env, "FLWR_HOME": str(self.cli_home)}, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"flwr {' '.join(map(str, args))} exited {res.returncode}:\n{res.stdout}\n{res.stderr}")
        return res

    # -- components --------------------------------------------------------------------------------
    def make_certs(self) -> None:
        subprocess.run(["bash", str(REPO / "deploy" / "make_certs.sh"), "-o", str(self.certs), "-n", str(self.n)],
                       check=True, capture_output=True, env=self.env, timeout=120 + 5 * self.n)

    def start_superlink(self) -> None:
        c = self.certs
        self.spawn("superlink", [BIN / "flower-superlink", "--ssl-ca-certfile", c / "ca.crt",
                                 "--ssl-certfile", c / "server.pem", "--ssl-keyfile", c / "server.key",
                                 "--enable-supernode-auth", "--host", "127.0.0.1", "--port", self.port,
                                 *(["--database", self.link_dir / "state.db"] if self.database else []),
                                 "--disable-runtime-dependency-installation"],
                   cwd=self.link_dir, home=self.link_dir / "flwr-home")

        def up():
            assert self.procs["superlink"].poll() is None, self.log("superlink").read_text()[-3000:]
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_for(up, 120, "the SuperLink's port", every=0.5)

    def start_gateway(self) -> None:
        """deploy/fleet_gateway.py: the only address SuperNodes use; it forwards the Fleet API alone."""
        c = self.certs
        self.spawn("gateway", [sys.executable, REPO / "deploy" / "fleet_gateway.py",
                               "--listen", f"127.0.0.1:{self.gw_port}", "--superlink", f"127.0.0.1:{self.port}",
                               "--ssl-certfile", c / "server.pem", "--ssl-keyfile", c / "server.key",
                               "--root-certificates", c / "ca.crt"], cwd=self.root / "gateway", home=self.root / "gateway")

        def up():
            assert self.procs["gateway"].poll() is None, self.log("gateway").read_text()[-3000:]
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.gw_port)) == 0

        wait_for(up, 60, "the gateway's port", every=0.5)

    def kill_superlink(self) -> set[int]:
        """SIGKILL the SuperLink and everything under it (its SuperExec and the ServerApp)."""
        pids = sigkill_tree(self.procs["superlink"].pid)
        self.procs["superlink"].wait(30)
        wait_for(lambda: not any(alive(p) for p in pids), 30, "the SuperLink's processes to die", every=0.2)
        return pids

    def write_connection(self) -> None:
        self.cli_home.mkdir(parents=True, exist_ok=True)
        (self.cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONN}"\n\n[superlink.{CONN}]\naddress = "127.0.0.1:{self.port}"\n'
            f'root-certificates = "{self.certs / "ca.crt"}"\n\n'
            f'[superlink.via-gateway]\naddress = "127.0.0.1:{self.gw_port}"\n'
            f'root-certificates = "{self.certs / "ca.crt"}"\n')

    def register(self, i: int) -> None:
        res = self.flwr("supernode", "register", self.certs / "keys" / f"node{i + 1}.pub", CONN, "--format", "json")
        self.node_ids[i] = int(json.loads(res.stdout[res.stdout.index("{"):])["node-id"])

    def start_supernode(self, i: int) -> subprocess.Popen:
        return self.spawn(f"supernode{i}", [BIN / "flower-supernode", "--root-certificates", self.certs / "ca.crt",
                                            "--superlink", f"127.0.0.1:{self.gw_port}", "--port", self.node_ports[i],
                                            "--node-config", f"partition-id={i} num-partitions={self.n}",
                                            "--auth-supernode-private-key", self.certs / "keys" / f"node{i + 1}"],
                          cwd=self.root / f"sn{i}", home=self.root / f"sn{i}" / "flwr-home")

    def kill_supernode(self, i: int) -> float:
        """SIGKILL a SuperNode and its SuperExec/ClientApp (a device that loses power); returns the time."""
        sigkill_tree(self.procs[f"supernode{i}"].pid)
        t = time.monotonic()
        self.procs[f"supernode{i}"].wait(30)
        return t

    def online(self) -> set[int]:
        res = self.flwr("supernode", "ls", CONN, "--format", "json", check=False)
        try:
            doc = json.loads(res.stdout[res.stdout.index("{"):])
        except ValueError:
            return set()
        return {int(n["node-id"]) for n in doc.get("nodes", []) if n.get("status") == "online"}

    def wait_online(self, partitions=None, timeout: float = 180) -> None:
        want = {self.node_ids[i] for i in (range(self.n) if partitions is None else partitions)}
        wait_for(lambda: want <= self.online(), timeout, f"nodes {sorted(want)} to be online", every=2)

    def up(self, online_timeout: float = 180) -> None:
        self.make_certs()
        self.start_superlink()
        self.start_gateway()
        self.write_connection()  # the connection first: `flwr supernode register` needs it
        with ThreadPoolExecutor(4) as pool:  # before the SuperNodes start: an unregistered one exits (code 305)
            list(pool.map(self.register, range(self.n)))
        for i in range(self.n):
            self.start_supernode(i)
        self.wait_online(timeout=online_timeout)

    # -- runs ----------------------------------------------------------------------------------------
    def submit(self, name: str, run_config: str) -> subprocess.Popen:
        """`flwr run . <connection> --run-config ... --stream` in the background (log: <name>.log)."""
        return self.spawn(name, [BIN / "flwr", "run", ".", CONN, "--run-config", run_config, "--stream"],
                          cwd=REPO, home=self.cli_home)

    def run_id(self, name: str, timeout: float = 300) -> int:
        def found():
            m = re.search(r"Successfully started run (\d+)", self.log(name).read_text())
            return int(m.group(1)) if m else None

        return wait_for(found, timeout, f"the run id in {name}.log")

    def status(self, run_id: int) -> str:
        res = self.flwr("ls", CONN, "--run-id", run_id, "--format", "json", check=False)
        try:
            return json.loads(res.stdout[res.stdout.index("{"):])["runs"][0]["status"]
        except (ValueError, KeyError, IndexError):
            return ""

    def wait_finished(self, run_id: int, timeout: float = RUN_TIMEOUT) -> str:
        return wait_for(lambda: (s := self.status(run_id)).startswith("finished") and s, timeout,
                        f"run {run_id} to finish", every=5)

    # -- teardown ------------------------------------------------------------------------------------
    def ours(self) -> set[int]:
        """PIDs of started processes not yet reaped (a reaped PID may belong to someone else by now),
        their descendants, and every process that inherited this deployment's marker."""
        return tree([p.pid for p in self.started if p.poll() is None]) | marked(self.mark)

    def stop(self) -> list[str]:
        """Stop every process this deployment started (PIDs, their descendants, the marker); what is left."""
        for _ in range(3):
            pids = self.ours()
            if not pids:
                break
            kill(pids)
            for proc in self.started:
                with suppress():
                    proc.wait(0.1)
        left = self.ours()
        return [f"{p}: {cmdline(p)}" for p in sorted(left) if alive(p)]
