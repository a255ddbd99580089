"""Serving state across process lifetimes, against real servers: the local backend keeps uploads over
a restart and a worker respawn (kill -9), and a server whose Redis is unreachable at start is not
ready (with the reason) until Redis comes up, then serves without a restart."""
from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch
from conftest import make_policy

from lorasa_serve import Engine, init_adapter
from lorasa_serve.artifacts import adapter_bytes
from benchmarks.servers import ServerProcess, free_port
from benchmarks.servers import RedisServer

pytestmark = pytest.mark.slow
TOKEN = "restart-token"


def team(spec):
    g = np.random.default_rng(0)
    return [{"agent_id": a.agent_id, "obs": g.standard_normal(a.obs_dim).tolist()} for a in spec.agents]


def act(srv, spec):
    r = requests.post(srv.url + "/v1/act", json={"rows": team(spec)}, headers={"Connection": "close"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.headers["X-Lorasa-Worker"], r.json()


def test_local_restart_and_respawn_keep_uploads(tmp_path):
    spec, _, _ = make_policy(tmp_path / "policy")
    engine = Engine.from_dir(tmp_path / "policy", device="cpu", mode="lora")
    env = {"LORASA_POLICY": str(tmp_path / "policy"), "LORASA_STATE_DIR": str(tmp_path / "state"),
           "LORASA_ADMIN_TOKEN": TOKEN, "LORASA_WORKERS": "2", "LORASA_MODE": "lora"}
    new = init_adapter(spec, torch.Generator().manual_seed(3), b_std=0.8)
    with ServerProcess(env, tmp_path / "first.log") as srv:
        r = requests.put(srv.url + "/v1/admin/adapters/agent_1", data=adapter_bytes(spec, "agent_1", new),
                         headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
        assert r.status_code == 200 and r.json()["version"] == 2, r.text
    engine.set_adapter("agent_1", new)
    want = engine.act(spec.agent_ids, torch.stack([
        torch.nn.functional.pad(torch.tensor(row["obs"]), (0, spec.obs_max - len(row["obs"])))
        for row in team(spec)])).actions
    with ServerProcess(env, tmp_path / "second.log") as srv:  # restart on the same state dir
        agents = requests.get(srv.url + "/v1/agents", timeout=10).json()["agents"]
        assert [a["version"] for a in agents] == [1, 2, 1]
        pids, resp = set(), None
        with ThreadPoolExecutor(8) as pool:  # concurrent rounds: one busy worker leaves the next to the other
            t0 = time.monotonic()
            while len(pids) < 2 and time.monotonic() - t0 < 60:  # until both workers have answered, with v2
                for pid, resp in pool.map(lambda _: act(srv, spec), range(8)):
                    pids.add(pid)
                    assert resp["versions"] == [1, 2, 1]
        assert len(pids) == 2, "requests never reached the second worker"
        for got, w, a in zip(resp["actions"], want, spec.agents):
            np.testing.assert_allclose(got, w[:a.act_dim].numpy(), atol=1e-5, rtol=0)
        victim = int(sorted(pids)[0])
        os.kill(victim, signal.SIGKILL)
        t0, replacement = time.monotonic(), None
        while time.monotonic() - t0 < 60 and replacement is None:
            pid, resp = act(srv, spec)  # the surviving worker keeps answering meanwhile
            assert resp["versions"] == [1, 2, 1], pid
            if pid not in pids:
                replacement = time.monotonic() - t0
        assert replacement is not None, "the killed worker was not replaced"
        print(f"worker replaced and serving v2 {replacement:.1f} s after kill -9")


def test_redis_unreachable_at_start_then_back(tmp_path):
    make_policy(tmp_path / "policy")
    port = free_port()
    env = {"LORASA_POLICY": str(tmp_path / "policy"), "LORASA_REDIS_URL": f"redis://:s3cret@127.0.0.1:{port}/0"}
    srv = ServerProcess(env, tmp_path / "server.log").start()
    try:
        deadline, r = time.monotonic() + 90, None
        while time.monotonic() < deadline:
            try:
                r = requests.get(srv.url + "/readyz", timeout=2)
                if "state backend unavailable" in r.text:
                    break
            except requests.RequestException:  # not listening yet, or busy loading
                pass
            time.sleep(0.2)
        assert r is not None and r.status_code == 503 and "unreachable" in r.text, r and r.text
        assert "s3cret" not in r.text
        a = requests.post(srv.url + "/v1/act", json={"rows": []}, timeout=10)
        assert a.status_code == 503 and a.headers["Retry-After"] == "1"
        with RedisServer(tmp_path / "redis", password="s3cret", port=port):
            assert srv.wait_ready() < 15  # resumes without a restart
            r = requests.post(srv.url + "/v1/act", json={"session_id": "s", "rows": team(
                type("S", (), {"agents": Engine.from_dir(tmp_path / "policy").spec.agents})())}, timeout=10)
            assert r.status_code == 200, r.text
    finally:
        srv.stop()
    assert "s3cret" not in (tmp_path / "server.log").read_text()
