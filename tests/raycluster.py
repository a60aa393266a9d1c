"""A real multi-node Ray cluster on this machine, on loopback only, for tests.

    cluster = LocalCluster(tmp_path, env={...})
    cluster.start_head(resources={"node_a": 1})           # ray start --head, own temp dir and ports
    cluster.start_node("b", resources={"node_b": 1})      # ray start --address, own temp dir
    cluster.kill_node("b"); cluster.start_node("b", ...)  # a node lost and replaced
    cluster.stop()                                        # every process this cluster started

Each node is a separate `ray start` with its own `--temp-dir`, ports picked free on 127.0.0.1, and an
environment marker (`KILN_TEST_NODE`) that every process it starts inherits: stopping a node kills
exactly the processes carrying its marker (and their children), by pid. `ray stop` is never used:
it stops every Ray on the machine, other sessions' included.

Loopback: Ray turns a node address of 127.0.0.1 into the machine's interface address unless
clusters are disabled (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`), which it refuses for a node joining a
cluster. So the head runs with that variable (every process on loopback, job drivers included) and
a joining node is started through `ray start` with that one conversion turned off.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

RAY = [sys.executable, "-c", "from ray.scripts.scripts import main; main()"]
JOIN_ON_LOOPBACK = [
    sys.executable,
    "-c",
    "import ray._private.services as s; s.resolve_ip_for_localhost = lambda host: host; "
    "from ray.scripts.scripts import main; main()",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, every: float = 0.2):
    """Poll `predicate` until it returns something truthy; fail with `what` after `timeout` s."""
    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process exited ({proc.returncode}) while waiting for {what}")
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def marked_pids(marker: str) -> set[int]:
    """Processes whose environment carries `KILN_TEST_NODE=<marker>`, and their descendants."""
    needle = f"KILN_TEST_NODE={marker}".encode()
    parents, found = {}, set()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{d}/stat") as f:
                parents[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if needle in env:
            found.add(int(d))
    grew = True
    while grew:
        children = {p for p, pp in parents.items() if pp in found and p not in found}
        found |= children
        grew = bool(children)
    return found


def kill_pids(pids: set[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


class LocalCluster:
    def __init__(self, base: Path, env: dict[str, str] | None = None, auth_token: str | None = None):
        self.base = Path(base)
        self.base.mkdir(parents=True, exist_ok=True)
        self.id = uuid.uuid4().hex[:8]
        self.env = {**os.environ, **(env or {})}
        self.env.pop("RAY_ADDRESS", None)
        self.token_file = None
        if auth_token:
            self.token_file = self.base / "auth_token"
            self.token_file.write_text(auth_token)
            self.token_file.chmod(0o600)
            self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_file))
        self.nodes: dict[str, str] = {}  # name -> marker
        self.gcs_port = self.dashboard_port = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def client_env(self) -> dict[str, str]:
        """Environment for a driver or client of this cluster (its auth token; loopback kept)."""
        env = {k: v for k, v in self.env.items() if k != "KILN_TEST_NODE"}
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        return env

    def _temp_dir(self, name: str) -> Path:
        # short: Ray puts unix sockets under it (107-byte limit)
        return Path(f"/tmp/kc-{self.id}-{name}")

    def _start(self, name: str, cmd: list[str], env: dict[str, str]) -> None:
        self._temp_dir(name).mkdir(parents=True, exist_ok=True)
        marker = f"{self.id}-{name}"
        env = {**env, "KILN_TEST_NODE": marker}
        self.nodes[name] = marker
        log = self.base / f"ray-start-{name}.log"
        out = subprocess.run(cmd, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT, timeout=120)
        if out.returncode:
            raise RuntimeError(
                f"ray start for node {name} failed ({out.returncode}):\n{log.read_text()[-3000:]}"
            )

    def start_head(self, num_cpus: float = 1, resources: dict | None = None, dashboard: bool = True) -> None:
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        env = {
            **self.env,
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keep every address on 127.0.0.1
            "AUTOSCALER_METRIC_PORT": str(free_port()),
            "DASHBOARD_METRIC_PORT": str(free_port()),
        }
        cmd = [
            *RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.gcs_port}",
            f"--temp-dir={self._temp_dir('head')}", f"--num-cpus={num_cpus}", "--num-gpus=0",
            f"--resources={json.dumps(resources or {})}", "--disable-usage-stats",
            f"--include-dashboard={'true' if dashboard else 'false'}", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={free_port()}",
            *self._node_ports(),
        ]  # fmt: skip
        self._start("head", cmd, env)

    def start_node(
        self, name: str, num_cpus: float = 1, resources: dict | None = None, extra_env: dict | None = None
    ) -> None:
        env = {**self.env, "KILN_CLUSTER_NODE": name, **(extra_env or {})}
        env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # `ray start --address` refuses it
        cmd = [
            *JOIN_ON_LOOPBACK, "start", f"--address={self.address}", "--node-ip-address=127.0.0.1",
            f"--temp-dir={self._temp_dir(name)}", f"--num-cpus={num_cpus}", "--num-gpus=0",
            f"--resources={json.dumps(resources or {})}", "--disable-usage-stats", *self._node_ports(),
        ]  # fmt: skip
        self._start(name, cmd, env)

    def _node_ports(self) -> list[str]:
        return [
            f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
        ]

    def temp_dirs(self) -> list[Path]:
        """Each node's Ray temp dir (its session logs)."""
        return [self._temp_dir(n) for n in self.nodes]

    def pids(self, name: str) -> set[int]:
        return marked_pids(self.nodes[name]) if name in self.nodes else set()

    def kill_node(self, name: str) -> None:
        """SIGKILL every process of the node, as if the machine went away."""
        kill_pids(self.pids(name))

    def node_id(self, name: str) -> str | None:
        """The Ray node id of a running node (read from its raylet's command line)."""
        for pid in self.pids(name):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    args = f.read().decode(errors="replace").split("\0")
            except OSError:
                continue
            if args and args[0].endswith("raylet"):
                for a in args:
                    if a.startswith("--node_id="):
                        return a.split("=", 1)[1]
        return None

    def stop(self) -> None:
        """Kill every process of every node (workers first, then the head), by pid."""
        for name in [n for n in self.nodes if n != "head"] + ["head"]:
            kill_pids(self.pids(name))
            wait_for(lambda n=name: not self.pids(n) or kill_pids(self.pids(n)), 30, f"node {name} to exit")
        for name in self.nodes:
            shutil.rmtree(self._temp_dir(name), ignore_errors=True)
