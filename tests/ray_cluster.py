"""A real Ray cluster on loopback for the tests: a head node and a second node (`ray start --head`, `ray start
--address`), each with its own CPUs, a private temp dir and free ports. Its processes carry a marker in their
environment (LORASA_RAY_CLUSTER=<id>): `stop()` ends exactly those (never `ray stop`, which ends every Ray
process on the machine, other users' too) and `processes(title)` finds this cluster's workers by title."""
from __future__ import annotations

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

MARKER = "LORASA_RAY_CLUSTER"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_START_SHIM = (
    "import sys; import ray._private.ray_constants as c; import ray._private.services as s; "
    "c.ENABLE_RAY_CLUSTER = True; s.get_node_ip_address = lambda address=None: '127.0.0.1'; "
    "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()")


class RayCluster:
    def __init__(self, cpus_per_node: int = 1, nodes: int = 2, temp_dir: str | None = None):
        self.id = uuid.uuid4().hex[:12]
        self.temp_dir = Path(temp_dir or tempfile.mkdtemp(prefix="lorasa-ray-", dir="/tmp"))
        self.cpus, self.nodes = cpus_per_node, nodes
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # workers import the shipped code
        # loopback only: with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 Ray takes 127.0.0.1 as every process's node
        # address (else it swaps 127.0.0.1 for the machine's network address: traffic off the loopback)
        self.env = {**env, MARKER: self.id, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                    "OMP_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}

    def _ray(self, *args: str) -> None:
        # `ray start` through a shim: a second node must pass ray's "multi-node on Windows/OSX" guard (which
        # that env var also turns on) and resolve its 127.0.0.1 to itself, not the network address
        cmd = [sys.executable, "-c", _START_SHIM, "start", "--node-ip-address", "127.0.0.1", "--num-cpus", str(self.cpus),
               "--disable-usage-stats", "--object-store-memory", str(200 << 20), "--dashboard-agent-listen-port", str(free_port()),
               "--metrics-export-port", str(free_port()), *args]
        r = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            self.stop()
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")

    def start(self) -> "RayCluster":
        self._ray("--head", "--port", str(self.port), "--include-dashboard=false", "--temp-dir", str(self.temp_dir),
                  "--ray-client-server-port", str(free_port()), "--dashboard-port", str(free_port()))
        for _ in range(self.nodes - 1):
            self._ray("--address", self.address)
        return self

    def pids(self) -> list[int]:
        """This cluster's processes: those whose environment carries its marker, and their descendants (a
        Ray process that sets its title overwrites its environment: the agents the raylet starts)."""
        marked, parents, mark = set(), {}, f"{MARKER}={self.id}".encode()
        for p in Path("/proc").iterdir():
            if not p.name.isdigit() or int(p.name) == os.getpid():
                continue
            try:
                if mark in (p / "environ").read_bytes().split(b"\0"):
                    marked.add(int(p.name))
                parents[int(p.name)] = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
        out, grew = set(marked), True
        while grew:
            more = {pid for pid, ppid in parents.items() if ppid in out} - out
            out |= more
            grew = bool(more)
        return sorted(out)

    def processes(self, title: str) -> list[int]:
        """This cluster's processes whose command line (a Ray worker's title, e.g. "ray::RolloutWorker")
        starts with `title`."""
        out = []
        for pid in self.pids():
            try:
                if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(title.encode()):
                    out.append(pid)
            except OSError:
                pass
        return out

    def stop(self) -> None:
        every = set(self.pids())  # before anything dies: orphans are re-parented to init
        for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
            pids = sorted(every | set(self.pids()))
            pids = [p for p in pids if _alive(p)]
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while pids and time.monotonic() < deadline:
                pids = [p for p in pids if _alive(p)]
                time.sleep(0.2)
            if not pids:
                break
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> "RayCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
