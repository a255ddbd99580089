"""Two BentoML worker processes: a hot swap is seen by both, sessions work across workers, and a
categorical policy loaded from the BentoML model store by tag honours action masks."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections import defaultdict

import numpy as np
import pytest
import requests
import torch
from conftest import make_policy

from lorasa_serve import Engine, init_adapter
from lorasa_serve.artifacts import adapter_bytes
from benchmarks.servers import REPO, ServerProcess

pytestmark = pytest.mark.slow
TOKEN = "workers-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    root = tmp_path_factory.mktemp("svc2")
    spec, _, _ = make_policy(root / "policy", obs=(7, 7, 4), act=(5, 5, 3), action="categorical")
    home = {"BENTOML_HOME": str(root / "bentoml")}
    saved = subprocess.run([sys.executable, "-m", "services.model_store", "save", str(root / "policy"),
                            "--name", "lorasa-test"], cwd=REPO, env={**os.environ, **home},
                           capture_output=True, text=True, check=True)
    tag = saved.stdout.strip().splitlines()[-1]
    assert tag.startswith("lorasa-test:")
    env = {**home, "LORASA_MODEL_TAG": tag, "LORASA_POLICY": "/nonexistent", "LORASA_WORKERS": "2",
           "LORASA_ADMIN_TOKEN": TOKEN}
    with ServerProcess(env, root / "server.log") as server:
        server.spec, server.tag = spec, tag
        server.engine = Engine.from_dir(root / "policy", device="cpu", mode="lora")
        yield server


def rows_for(spec, ids, obs, avail=None):
    rows = []
    for i, a in enumerate(ids):
        row = {"agent_id": a, "obs": obs[i, :spec.agent(a).obs_dim].tolist()}
        if avail is not None:
            row["avail_actions"] = avail[i, :spec.agent(a).act_dim].astype(int).tolist()
        rows.append(row)
    return rows


def team_obs(spec, seed):
    g = np.random.default_rng(seed)
    obs = np.zeros((len(spec.agents), spec.obs_max), dtype=np.float32)
    for i, a in enumerate(spec.agents):
        obs[i, :a.obs_dim] = g.standard_normal(a.obs_dim)
    return obs


def fan_out(n_threads, fn):
    """Run fn(k) in threads, each with its own connections (requests land on either worker)."""
    out, errors = [None] * n_threads, []

    def run(k):
        try:
            out[k] = fn(k)
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(n_threads)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors, errors
    return out


def post_act(srv, body):
    r = requests.post(srv.url + "/v1/act", json=body, headers={"Connection": "close"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.headers["X-Lorasa-Worker"], r.json()


def test_served_from_model_tag_with_masks(srv):
    spec = srv.spec
    info = requests.get(srv.url + "/v1/agents").json()
    assert info["backbone_fingerprint"] == spec.backbone_fingerprint
    obs = team_obs(spec, 0)
    avail = np.zeros((3, spec.act_max), dtype=bool)
    avail[0, [1, 3]] = avail[1, 4] = avail[2, 0] = True
    _, resp = post_act(srv, {"rows": rows_for(spec, spec.agent_ids, obs, avail)})
    exp = srv.engine.act(spec.agent_ids, torch.from_numpy(obs), avail=torch.from_numpy(avail))
    assert resp["actions"] == exp.actions.tolist()
    assert resp["actions"][1] == 4 and resp["actions"][2] == 0 and resp["actions"][0] in (1, 3)
    np.testing.assert_allclose(resp["log_probs"], exp.log_probs.numpy(), atol=1e-5)
    bad = rows_for(spec, spec.agent_ids, obs, avail)
    bad[2]["avail_actions"] = [0, 0, 0]
    r = requests.post(srv.url + "/v1/act", json={"rows": bad})
    assert r.status_code == 400 and "no available action" in r.json()["error"]


def test_sessions_are_shared_across_workers(srv):
    spec = srv.spec
    max_steps = 30  # an episode steps until it has been served by both workers (or this many steps)

    def episode(k):
        state, seen = None, []
        for t in range(max_steps):
            if len(set(seen)) == 2 and t >= 4:
                break
            obs = team_obs(spec, 1000 * k + t)
            worker, resp = post_act(srv, {"session_id": f"ep-{k}", "rows": rows_for(spec, spec.agent_ids, obs)})
            exp = srv.engine.act(spec.agent_ids, torch.from_numpy(obs), state)
            assert resp["actions"] == exp.actions.tolist(), (k, t)
            state, seen = exp.state, seen + [worker]
        return seen

    workers = fan_out(6, episode)
    assert len({w for ws in workers for w in ws}) == 2, "requests never reached the second worker"
    assert any(len(set(ws)) == 2 for ws in workers), "no session moved between workers"


def test_hot_swap_reaches_every_worker(srv):
    spec, agent = srv.spec, "agent_1"
    obs = np.tile(team_obs(spec, 7), (4, 1))  # row k is agent k % 3's (the protocol refuses another agent's row)
    ids = spec.agent_ids * 4
    new = init_adapter(spec, torch.Generator().manual_seed(5), b_std=0.8)
    r = requests.put(srv.url + f"/v1/admin/adapters/{agent}", data=adapter_bytes(spec, agent, new),
                     headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    version = r.json()["version"]
    srv.engine.set_adapter(agent, new)
    exp = srv.engine.act(ids, torch.from_numpy(obs)).actions.tolist()
    by_worker = defaultdict(list)
    for _ in range(10):  # rounds of concurrent requests until both workers have answered
        for worker, resp in fan_out(8, lambda k: post_act(srv, {"rows": rows_for(spec, ids, obs)})):
            by_worker[worker].append(resp)
        if len(by_worker) == 2:
            break
    assert len(by_worker) == 2, "requests never reached the second worker"
    for worker, resps in by_worker.items():
        for resp in resps:
            assert resp["versions"] == [version if a == agent else 1 for a in ids], worker
            assert resp["actions"] == exp, worker
    text = requests.get(srv.url + "/metrics").text
    assert f'lorasa_adapter_version{{agent_id="{agent}"}} {float(version)}' in text
