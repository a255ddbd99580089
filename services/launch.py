"""Start a real `bentoml serve` subprocess on a free loopback port (tests and the load benchmark).

    with ServerProcess({"LORASA_POLICY": "my_policy"}) as srv:
        requests.post(srv.url + "/v1/act", json=...)

The server runs in its own process group; `stop()` terminates the whole group (the BentoML
arbiter and its workers), then kills it if it has not exited after a grace period.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

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
                if requests.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return time.monotonic() - t0
            except (requests.ConnectionError, requests.Timeout):
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
