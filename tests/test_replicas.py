"""Two replicas = two `bentoml serve` processes on different ports with different LORASA_STATE_DIRs,
sharing only a real redis-server (they stand for two hosts behind a load balancer).

Fault tests run last in this module: Redis stopped under load then started empty, Redis restarted empty
(sessions lost, and their next step says so), then kill -9 of A."""
from __future__ import annotations

import threading
import time
from collections import Counter

import numpy as np
import pytest
import requests
import torch
from conftest import make_policy

from lorasa_serve import Engine, init_adapter
from lorasa_serve.artifacts import adapter_bytes
from lorasa_serve.client import PolicyClient, SessionLost
from benchmarks.servers import ServerProcess
from services.state import SessionLimits, open_backend

pytestmark = pytest.mark.slow
TOKEN = "replica-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def pair(tmp_path_factory, redis_server):
    root = tmp_path_factory.mktemp("replicas")
    spec, _, _ = make_policy(root / "policy", obs=(6, 5, 6), act=(2, 3, 2))
    env = {"LORASA_POLICY": str(root / "policy"), "LORASA_ADMIN_TOKEN": TOKEN,
           "LORASA_REDIS_URL": redis_server.url, "LORASA_TIMEOUT_S": "10", "LORASA_MODE": "lora"}
    a = ServerProcess({**env, "LORASA_STATE_DIR": str(root / "state_a")}, root / "a.log")
    b = ServerProcess({**env, "LORASA_STATE_DIR": str(root / "state_b")}, root / "b.log")
    with a:
        post(a, {"rows": rows(spec, spec.agent_ids, obs_for(spec, 0))})  # a counter B must not wipe
        a.first_start_log = (root / "a.log").read_text(errors="replace")  # a first deployment on Redis
        with b:
            a.spec = b.spec = spec
            a.engine = Engine.from_dir(root / "policy", device="cpu", mode="lora")
            yield a, b, redis_server


def obs_for(spec, seed):
    g = np.random.default_rng(seed)
    obs = np.zeros((len(spec.agents), spec.obs_max), dtype=np.float32)
    for i, a in enumerate(spec.agents):
        obs[i, :a.obs_dim] = g.standard_normal(a.obs_dim)
    return obs


def rows(spec, ids, obs):
    return [{"agent_id": a, "obs": obs[i, :spec.agent(a).obs_dim].tolist()} for i, a in enumerate(ids)]


def post(srv, body, status=200):
    r = requests.post(srv.url + "/v1/act", json=body, timeout=30)
    assert r.status_code == status, r.text
    return r.json()


def upload(srv, agent, seed):
    new = init_adapter(srv.spec, torch.Generator().manual_seed(seed), b_std=0.8)
    r = requests.put(srv.url + f"/v1/admin/adapters/{agent}", data=adapter_bytes(srv.spec, agent, new),
                     headers=AUTH, timeout=30)
    return r, new


def versions(srv):
    agents = requests.get(srv.url + "/v1/agents", timeout=10).json()["agents"]
    return {a["agent_id"]: a["version"] for a in agents}


def test_upload_on_one_replica_is_served_by_the_other_next(pair):
    a, b, _ = pair
    spec, obs = a.spec, obs_for(a.spec, 1)
    r, new = upload(a, "agent_1", 11)
    assert r.status_code == 200, r.text
    v = r.json()["version"]
    a.engine.set_adapter("agent_1", new)
    resp = post(b, {"rows": rows(spec, spec.agent_ids, obs)})  # B's very next request
    assert resp["versions"] == [v if x == "agent_1" else 1 for x in spec.agent_ids]
    exp = a.engine.act(spec.agent_ids, torch.from_numpy(obs))
    for got, want, x in zip(resp["actions"], exp.actions, spec.agent_ids):
        np.testing.assert_allclose(got, want[:spec.agent(x).act_dim].numpy(), atol=1e-5, rtol=0)
    assert versions(a) == versions(b)
    # versions are global: an upload on B continues A's counter
    r, new = upload(b, "agent_1", 12)
    assert r.json()["version"] == v + 1
    a.engine.set_adapter("agent_1", new)
    assert post(a, {"rows": rows(spec, ["agent_1"], obs[1:2])})["versions"] == [v + 1]


def test_session_alternating_replicas_equals_one_process(pair):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the servers (LORASA_TORCH_THREADS=1): bit-identical results
    try:
        alternate_and_compare(*pair)
    finally:
        torch.set_num_threads(threads)


def alternate_and_compare(a, b, srv_redis):
    spec, state = a.spec, None
    for t in range(6):
        obs = obs_for(spec, 100 + t)
        resp = post((a, b)[t % 2], {"session_id": "alt-1", "rows": rows(spec, spec.agent_ids, obs)})
        exp = a.engine.act(spec.agent_ids, torch.from_numpy(obs), state)
        for got, want, x in zip(resp["actions"], exp.actions, spec.agent_ids):
            assert got == want[:spec.agent(x).act_dim].tolist(), (t, x)
        state = exp.state
    # the state stored in Redis is exactly the one a single process computes
    store = open_backend(srv_redis.url, "", spec.backbone_fingerprint, spec.hidden, SessionLimits())
    (step,) = store.open_steps([("alt-1", spec.agent_ids)])
    store.close_steps([(step, None)])
    np.testing.assert_array_equal(step.state, state.numpy())
    assert not step.is_new.any()


def test_a_concurrent_step_gets_409_on_every_replica(pair):
    a, b, srv_redis = pair
    spec = a.spec
    store = open_backend(srv_redis.url, "", spec.backbone_fingerprint, spec.hidden, SessionLimits(lease_s=20))
    (held,) = store.open_steps([("busy-1", spec.agent_ids)])  # a step of busy-1 in flight elsewhere
    body = {"session_id": "busy-1", "rows": rows(spec, spec.agent_ids, obs_for(spec, 3))}
    for srv in (a, b):
        err = post(srv, body, 409)["error"]
        assert "busy-1" in err and "in flight" in err
    assert store.close_steps([(held, None)]) == [True]
    post(b, body)  # once answered, the next step runs
    # two steps sent at once to the two replicas: never both applied to the same state
    results = []
    for k in range(5):
        go = threading.Barrier(2)

        def send(srv):
            go.wait()
            results.append(requests.post(srv.url + "/v1/act", json={**body, "session_id": f"race-{k}"},
                                         timeout=30).status_code)
        ts = [threading.Thread(target=send, args=(s,)) for s in (a, b)]
        [t.start() for t in ts]
        [t.join() for t in ts]
    assert set(results) <= {200, 409}, results


def test_each_server_keeps_its_own_metrics(pair):
    a, b, _ = pair
    text = requests.get(a.url + "/metrics", timeout=10).text  # A counted a request before B started
    ok = [ln for ln in text.splitlines() if ln.startswith('lorasa_act_requests_total{outcome="ok"}')]
    assert ok and float(ok[0].split()[-1]) >= 1, "B's start wiped A's metrics"
    assert "lorasa_state_check_seconds_count" in text


class Load:
    """Bounded request loops in threads against one server, counting status codes per kind."""

    def __init__(self, srv, spec, n_threads=3, sessions=True):
        self.srv, self.spec, self.stop = srv, spec, threading.Event()
        self.codes = {"stateless": Counter(), "session": Counter()}
        self.retry_after = set()
        self.threads = [threading.Thread(target=self._run, args=(k, sessions)) for k in range(n_threads)]

    def _run(self, k, sessions):
        body = {"rows": rows(self.spec, self.spec.agent_ids, obs_for(self.spec, k))}
        with requests.Session() as s:
            for i in range(2000):
                if self.stop.is_set():
                    return
                kind = "session" if sessions and i % 2 else "stateless"
                extra = {"session_id": f"load-{self.srv.port}-{k}"} if kind == "session" else {}
                try:
                    r = s.post(self.srv.url + "/v1/act", json={**body, **extra}, timeout=15)
                    self.codes[kind][r.status_code] += 1
                    if r.status_code == 503:
                        self.retry_after.add(r.headers.get("Retry-After"))
                except requests.RequestException as e:
                    self.codes[kind][type(e).__name__] += 1
                time.sleep(0.01)

    def __enter__(self):
        [t.start() for t in self.threads]
        return self

    def __exit__(self, *exc):
        self.stop.set()
        [t.join() for t in self.threads]


def test_redis_outage_then_restart_empty_under_load(pair):
    a, b, srv_redis = pair
    spec = a.spec
    before = versions(a)
    assert before["agent_1"] > 1
    with Load(a, spec) as la, Load(b, spec) as lb:
        time.sleep(1.0)
        srv_redis.stop()
        time.sleep(2.0)
        r, _ = upload(a, "agent_0", 21)
        assert r.status_code == 503 and r.headers["Retry-After"] and "unavailable" in r.json()["error"]
        stateless_during = la.codes["stateless"][200] + lb.codes["stateless"][200]
        time.sleep(1.0)
        assert la.codes["stateless"][200] + lb.codes["stateless"][200] > stateless_during  # still serving
        assert la.codes["session"][503] + lb.codes["session"][503] > 0
        assert requests.get(b.url + "/readyz", timeout=5).status_code == 200
        srv_redis.start()  # back on the same port, EMPTY (no persistence)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:  # resumes without a restart
            n = la.codes["session"][200] + lb.codes["session"][200]
            time.sleep(1.0)
            if la.codes["session"][200] + lb.codes["session"][200] > n + 2:
                break
        else:
            pytest.fail(f"sessions did not resume: {la.codes} {lb.codes}")
    for load in (la, lb):  # stateless requests never failed; sessions only with 503 + Retry-After
        assert set(load.codes["stateless"]) == {200}, load.codes
        assert set(load.codes["session"]) <= {200, 503}, load.codes
        assert load.retry_after <= {"1"}
    # Redis came back empty: the servers re-seeded it, so no version went backwards
    assert versions(a) == versions(b) == before
    r, new = upload(b, "agent_1", 22)
    assert r.status_code == 200 and r.json()["version"] == before["agent_1"] + 1
    a.engine.set_adapter("agent_1", new)
    resp = post(a, {"rows": rows(spec, ["agent_1"], obs_for(spec, 5)[1:2])})
    assert resp["versions"] == [before["agent_1"] + 1]


def test_sessions_lost_with_redis_say_so(pair):
    """Redis restarted empty: a session's next step answers 200 from a zero state, and says so
    (`session_state` "new"; `PolicyClient` sessions raise SessionLost with the step's result)."""
    a, b, srv_redis = pair
    spec, obs = a.spec, obs_for(a.spec, 9)
    body = {"session_id": "lost-1", "rows": rows(spec, spec.agent_ids, obs)}
    assert [post(x, body)["session_state"] for x in (a, b)] == ["new", "resumed"]
    with PolicyClient(b.url) as client:
        ep = client.session()
        assert [ep.act(spec.agent_ids, obs).session_state for _ in range(2)] == ["new", "resumed"]
        srv_redis.restart()  # back EMPTY
        deadline, r = time.monotonic() + 15, None
        while time.monotonic() < deadline:
            r = requests.post(a.url + "/v1/act", json=body, timeout=30)
            if r.status_code == 200:
                break
            assert r.status_code == 503 and r.headers["Retry-After"] == "1", r.text
            time.sleep(0.2)
        assert r.status_code == 200 and r.json()["session_state"] == "new", r.text
        assert post(b, body)["session_state"] == "resumed"
        with pytest.raises(SessionLost) as e:
            ep.act(spec.agent_ids, obs)
        assert e.value.result.session_state == "new" and e.value.result.actions.shape == (3, spec.act_max)
        assert ep.act(spec.agent_ids, obs).session_state == "resumed"


def test_kill_one_replica_under_load_the_other_is_unaffected(pair):
    a, b, _ = pair
    with Load(b, a.spec) as lb:
        time.sleep(1.0)
        a.kill()  # A's arbiter and workers, at once
        time.sleep(2.0)
    with pytest.raises(requests.ConnectionError):  # nothing of A is left serving on its port
        requests.get(a.url + "/livez", timeout=2)
    assert set(lb.codes["stateless"]) == {200} and set(lb.codes["session"]) == {200}, lb.codes
    assert sum(lb.codes["stateless"].values()) > 10


def test_a_first_deployment_starts_quietly(pair):
    """An empty Redis seen by the first replica is normal: no WARNING (issue 23), while the wait and
    the seeding are still logged (INFO)."""
    a, _, _ = pair
    lines = [ln for ln in a.first_start_log.splitlines() if "lorasa" in ln.lower()]
    assert not [ln for ln in lines if "WARNING" in ln], lines
