"""Hostile input against a real `bentoml serve` with two workers (shared SQLite sessions, as in the
reported surrogate bug): every answer is a 200 or a 4xx with a JSON error, never a 5xx, and after
every 4xx nothing changed (agents' versions/fingerprints, and a probe session's next step equals the
in-process engine's). Hypothesis examples are bounded (one module-scoped server, ~150 per route)."""
from __future__ import annotations

import json
import threading
from urllib.parse import quote

import numpy as np
import pytest
import requests
import torch
from conftest import make_policy, require_extra

require_extra("serve", "starlette", "bentoml", "prometheus_client")
require_extra("dev", "hypothesis")
from hostile import (BIG_DEPTH, act_bodies, admin_bodies, encode, safetensors_files,  # noqa: E402
                     session_ids, with_duplicate_key)
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lorasa_serve import Engine  # noqa: E402
from benchmarks.servers import ServerProcess  # noqa: E402
from lorasa_serve.protocol import SESSION_ID_RE  # noqa: E402

pytestmark = pytest.mark.slow
TOKEN = "hostile-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON = {"Content-Type": "application/json"}
MAX_ROWS = 8
SERVER_SETTINGS = settings(max_examples=150, deadline=None, database=None,
                           suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                  HealthCheck.function_scoped_fixture])
CONTENT_TYPES = ["application/json", "application/json; charset=utf-8", "APPLICATION/JSON", "text/plain",
                 "application/x-www-form-urlencoded", None]


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    spec, _, _ = make_policy(root / "policy", obs=(6, 5, 6), act=(2, 3, 2))
    env = {"LORASA_POLICY": str(root / "policy"), "LORASA_ADMIN_TOKEN": TOKEN, "LORASA_WORKERS": "2",
           "LORASA_STATE_DIR": str(root / "state"), "LORASA_MAX_ROWS_PER_REQUEST": str(MAX_ROWS),
           "LORASA_MAX_BODY_BYTES": str(256 * 1024), "LORASA_MAX_UPLOAD_BYTES": str(64 * 1024),
           "LORASA_ACCESS_LOG": None}
    with ServerProcess(env, root / "server.log") as server:
        server.spec, server.log = spec, root / "server.log"
        server.engine = Engine.from_dir(root / "policy", device="cpu", mode="lora")
        server.http = requests.Session()
        server.probe = Probe(server)
        server.agents = adapters(server)
        yield server


class Probe:
    """A session stepped between hostile requests: its answer must equal the engine's with the
    state carried locally (a hostile request that touched it would show here)."""

    def __init__(self, srv):
        self.srv, self.state, self.t = srv, None, 0

    def step(self) -> None:
        spec, srv = self.srv.spec, self.srv
        g = np.random.default_rng(self.t)
        self.t += 1
        obs = np.zeros((len(spec.agents), spec.obs_max), dtype=np.float32)
        for i, a in enumerate(spec.agents):
            obs[i, :a.obs_dim] = g.standard_normal(a.obs_dim)
        rows = [{"agent_id": a.agent_id, "obs": obs[i, :a.obs_dim].tolist()} for i, a in enumerate(spec.agents)]
        r = srv.http.post(srv.url + "/v1/act", json={"session_id": "probe", "rows": rows}, timeout=30)
        assert r.status_code == 200, r.text
        want = srv.engine.act(spec.agent_ids, torch.from_numpy(obs), self.state)
        got = np.concatenate([np.ravel(a) for a in r.json()["actions"]])
        exp = np.concatenate([want.actions[i, :a.act_dim].numpy() for i, a in enumerate(spec.agents)])
        np.testing.assert_allclose(got, exp, atol=1e-5)
        self.state = want.state


def adapters(srv) -> list[tuple[str, int, str]]:
    """(agent, version, adapter fingerprint) from /v1/agents ('merged' also follows the engine's
    own auto mode, so it is not part of the state a rejected request must leave alone)."""
    info = srv.http.get(srv.url + "/v1/agents", timeout=10).json()["agents"]
    return [(a["agent_id"], a["version"], a["adapter_fingerprint"]) for a in info]


def check_answer(srv, r: requests.Response) -> None:
    """200, or a 4xx with a one-line JSON error; after a 4xx the agents and the probe are unchanged."""
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code == 200:
        return
    assert 400 <= r.status_code < 500
    err = r.json()["error"]
    assert isinstance(err, str) and len(err) < 1000, err[:300]
    assert adapters(srv) == srv.agents
    srv.probe.step()


@SERVER_SETTINGS
@given(data=st.data())
def test_hostile_act_bodies(srv, data):
    body = data.draw(act_bodies(srv.spec, MAX_ROWS))
    assume(not (isinstance(body, dict) and body.get("session_id") == "probe"))
    how = data.draw(st.sampled_from(["json", "json", "json", "duplicate", "truncated", "bytes"]))
    if how == "duplicate" and not (isinstance(body, dict) and body):
        how = "json"
    raw = {"json": lambda: encode(body),
           "duplicate": lambda: with_duplicate_key(body),
           "truncated": lambda: encode(body)[:data.draw(st.integers(0, 40))],
           "bytes": lambda: data.draw(st.binary(max_size=64))}[how]()
    ctype = data.draw(st.sampled_from(CONTENT_TYPES)) if data.draw(st.integers(0, 4)) == 0 else "application/json"
    r = srv.http.post(srv.url + "/v1/act", data=raw, timeout=30,
                      headers={"Content-Type": ctype} if ctype else {})
    if ctype is None or ctype.split(";")[0].lower() != "application/json":
        assert r.status_code == 415, r.text
    if how == "duplicate" and r.status_code != 415:
        assert r.status_code == 400 and "duplicate key" in r.json()["error"], r.text
    check_answer(srv, r)


@settings(SERVER_SETTINGS, max_examples=60)
@given(sid=session_ids)
def test_hostile_session_ids_on_reset(srv, sid):
    text = sid if isinstance(sid, str) else json.dumps(sid)
    assume(text != "probe" and len(text) < 4000)
    path = quote(text.encode("utf-8", "surrogatepass"), safe="")
    r = srv.http.post(f"{srv.url}/v1/sessions/{path}/reset", timeout=30)
    if r.status_code == 200:
        assert SESSION_ID_RE.fullmatch(text) and r.json()["session_id"] == text
    check_answer(srv, r)


@settings(SERVER_SETTINGS, max_examples=60)
@given(body=admin_bodies, route=st.sampled_from(["merge", "unmerge"]))
def test_hostile_admin_bodies(srv, body, route):
    r = srv.http.post(f"{srv.url}/v1/admin/{route}", data=encode(body), headers={**AUTH, **JSON}, timeout=30)
    if r.status_code == 200:  # a valid body: merge state changed, outputs did not (probe still exact)
        assert isinstance(body, dict) and set(body) <= {"agent_ids"}
        assert adapters(srv) == srv.agents
        srv.probe.step()
        return
    assert r.status_code == 400, r.text
    check_answer(srv, r)


@settings(SERVER_SETTINGS, max_examples=60)
@given(data=safetensors_files())
def test_hostile_adapter_uploads(srv, data):
    r = srv.http.put(srv.url + "/v1/admin/adapters/agent_1", data=data, headers=AUTH, timeout=30)
    assert r.status_code in (400, 413), r.text
    check_answer(srv, r)


def test_errors_are_json_on_every_path(srv):
    url, big = srv.url, "x" * 200_000  # under the 256 KB body limit
    for method, path, status in [("GET", "/nothing", 404), ("GET", "/v1/nothing", 404),
                                 ("POST", "/v1/agents", 405), ("GET", "/v1/act", 405),
                                 ("GET", "/" + "y" * 5000, 404)]:
        r = srv.http.request(method, url + path, timeout=10)
        assert r.status_code == status and r.headers["content-type"] == "application/json", (path, r.text)
        assert len(r.json()["error"]) < 300 and (len(path) < 64 or "(5001 characters)" in r.json()["error"])
    row = {"agent_id": "agent_0", "obs": [0.1] * 6}
    for headers in [{"Content-Type": "text/plain"}, {}]:  # a cross-site form/text POST is refused
        r = srv.http.post(url + "/v1/act", data=json.dumps({"rows": [row]}), headers=headers, timeout=10)
        assert r.status_code == 415 and "application/json" in r.json()["error"], r.text
    r = srv.http.post(url + "/v1/act", data=json.dumps({"rows": [row]}),
                      headers={"Content-Type": "application/json; charset=utf-8"}, timeout=10)
    assert r.status_code == 200, r.text
    r = srv.http.post(url + "/v1/act", json={"rows": [{**row, "agent_id": big}]}, timeout=30)
    assert r.status_code == 400 and "(200000 characters)" in r.json()["error"] and len(r.text) < 500
    r = srv.http.post(url + "/v1/act", json={"rows": [row], "session_id": "a/b"}, timeout=10)
    assert r.status_code == 400 and "session_id" in r.json()["error"]
    r = srv.http.post(url + "/v1/act", data=b'{"rows": [], "rows": [' + json.dumps(row).encode() + b"]}",
                      headers=JSON, timeout=10)
    assert r.status_code == 400 and "duplicate key" in r.json()["error"]


def test_admin_bodies_and_exact_tokens(srv):
    url = srv.url
    for body in ['{"agent_idz": ["agent_0"]}', '["agent_0"]', '{"agent_ids": "agent_0"}']:
        r = srv.http.post(url + "/v1/admin/merge", data=body, headers={**AUTH, **JSON}, timeout=10)
        assert r.status_code == 400, (body, r.text)
    r = srv.http.post(url + "/v1/admin/merge", data='{"agent_ids": ["agent_0"]}',
                      headers={**AUTH, "Content-Type": "text/plain"}, timeout=10)
    assert r.status_code == 415
    for auth in [f"Bearer {TOKEN}\x1f", f"Bearer {TOKEN}\xa0", f"Bearer\t{TOKEN}", f"Bearer  {TOKEN}",
                 f"Bearer {TOKEN[:-1]}"]:  # (a trailing space is HTTP whitespace: dropped before us)
        r = srv.http.post(url + "/v1/admin/merge", headers={"Authorization": auth}, timeout=10)
        assert r.status_code in (400, 401, 403), (repr(auth), r.status_code)  # 400: refused by the HTTP parser
        if r.status_code in (401, 403):
            assert "error" in r.json()
    # an empty body means every agent (no Content-Type needed)
    r = srv.http.post(url + "/v1/admin/merge", headers=AUTH, timeout=30)
    assert r.status_code == 200 and r.json()["merged"] == srv.spec.agent_ids, r.text
    r = srv.http.post(url + "/v1/admin/unmerge", data="{}", headers={**AUTH, **JSON}, timeout=30)
    assert r.status_code == 200 and r.json()["merged"] == []
    assert adapters(srv) == srv.agents


def test_nonfinite_outputs_are_422_and_sessions_keep_their_state(srv):
    spec = srv.spec
    first = [{"agent_id": a.agent_id, "obs": [0.2] * a.obs_dim} for a in spec.agents]
    r = srv.http.post(srv.url + "/v1/act", json={"session_id": "nf-http", "rows": first}, timeout=30)
    assert r.status_code == 200
    obs = torch.zeros(3, spec.obs_max)
    for i, a in enumerate(spec.agents):
        obs[i, :a.obs_dim] = 0.2
    carried = srv.engine.act(spec.agent_ids, obs).state
    extreme = [{"agent_id": a.agent_id, "obs": [3.4e38 * (-1) ** j for j in range(a.obs_dim)]}
               for a in spec.agents]
    for body in [{"session_id": "nf-http", "rows": extreme},
                 {"rows": [{**row, "state": [3.4e38 * (-1) ** j for j in range(spec.hidden)]} for row in first]}]:
        r = srv.http.post(srv.url + "/v1/act", json=body, timeout=30)
        assert r.status_code == 422 and "rows [0, 1, 2]" in r.json()["error"], r.text
    r = srv.http.post(srv.url + "/v1/act", json={"session_id": "nf-http", "rows": first}, timeout=30)
    want = srv.engine.act(spec.agent_ids, obs, carried)
    got = np.concatenate([np.ravel(a) for a in r.json()["actions"]])
    exp = np.concatenate([want.actions[i, :a.act_dim].numpy() for i, a in enumerate(spec.agents)])
    np.testing.assert_allclose(got, exp, atol=1e-5)


HOSTILE_RAW = [
    (JSON, json.dumps({"session_id": "\ud800", "rows": [{"agent_id": "agent_0", "obs": [0.1] * 6}]})),
    (JSON, json.dumps({"session_id": "hx", "rows": [{"agent_id": "agent_0", "obs": [3.4e38, -3.4e38] * 3}]})),
    (JSON, json.dumps({"rows": [{"agent_id": "agent_0", "obs": [0.1] * 6, "state": [3.4e38, -3.4e38] * 8}]})),
    (JSON, json.dumps({"rows": [{"agent_id": "z" * 100_000, "obs": [0.1] * 6}]})),
    (JSON, '{"rows": [], "rows": []}'),
    (JSON, "[" * BIG_DEPTH),
    ({"Content-Type": "text/plain"}, json.dumps({"rows": [{"agent_id": "agent_0", "obs": [0.1] * 6}]})),
]


def test_hostile_requests_interleaved_with_good_ones(srv):
    """Threads of good clients (stateless and session episodes) and hostile ones on two workers:
    zero 5xx, and every good request answered exactly like the in-process engine."""
    spec, errors, answered = srv.spec, [], [0, 0]
    lock = threading.Lock()

    def good(k: int) -> None:
        g, state = np.random.default_rng(100 + k), None
        with requests.Session() as s:
            for t in range(12):
                obs = np.zeros((3, spec.obs_max), dtype=np.float32)
                for i, a in enumerate(spec.agents):
                    obs[i, :a.obs_dim] = g.standard_normal(a.obs_dim)
                rows = [{"agent_id": a.agent_id, "obs": obs[i, :a.obs_dim].tolist()} for i, a in enumerate(spec.agents)]
                body = {"rows": rows, **({"session_id": f"good-{k}"} if k % 2 else {})}
                r = s.post(srv.url + "/v1/act", json=body, timeout=30)
                assert r.status_code == 200, r.text
                want = srv.engine.act(spec.agent_ids, torch.from_numpy(obs), state if k % 2 else None)
                got = np.concatenate([np.ravel(a) for a in r.json()["actions"]])
                exp = np.concatenate([want.actions[i, :a.act_dim].numpy() for i, a in enumerate(spec.agents)])
                np.testing.assert_allclose(got, exp, atol=1e-5)
                state = want.state
                with lock:
                    answered[0] += 1

    def hostile(k: int) -> None:
        with requests.Session() as s:
            for t in range(16):
                headers, body = HOSTILE_RAW[(k + t) % len(HOSTILE_RAW)]
                r = s.post(srv.url + "/v1/act", data=body, headers=headers, timeout=30)
                assert 400 <= r.status_code < 500, (r.status_code, r.text[:200])
                with lock:
                    answered[1] += 1

    def run(fn, k):
        try:
            fn(k)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(good, k)) for k in range(4)]
    threads += [threading.Thread(target=run, args=(hostile, k)) for k in range(3)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors, errors[0]
    assert answered == [48, 48]
    assert "Traceback" not in srv.log.read_text(errors="replace")


def test_access_log_is_quiet_by_default(srv):
    srv.http.get(srv.url + "/v1/policy", timeout=10)
    log = srv.log.read_text(errors="replace")
    assert "path=/v1/policy" not in log and "path=/v1/act" not in log


# --- /v2 (Open Inference Protocol): every parser total ----------------------------------------------
INFER = "/v2/models/lorasa_policy/infer"


def fixed_v2(srv) -> bytes:
    """A fixed binary /v2 request; its answer must stay bit-identical whatever came before."""
    from lorasa_serve.oip_codec import encode as oip_encode
    ids = np.asarray([a.agent_id.encode() for a in srv.spec.agents], dtype=object)
    obs = np.zeros((len(ids), srv.spec.obs_max), np.float32)
    for i, a in enumerate(srv.spec.agents):
        obs[i, :a.obs_dim] = np.linspace(-1, 1, a.obs_dim)
    body, hlen = oip_encode({}, "inputs", [("agent_id", "BYTES", ids, True), ("obs", "FP32", obs, True)])
    r = srv.http.post(srv.url + INFER, data=body, timeout=30,
                      headers={"Inference-Header-Content-Length": str(hlen), "Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    return r.content


def check_v2(srv, r: requests.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code >= 400:
        assert r.headers["content-type"] == "application/json" and isinstance(r.json()["error"], str), r.text[:300]
        assert adapters(srv) == srv.agents


def test_v2_parser_edge_cases_are_4xx(srv):
    good = [{"name": "agent_id", "datatype": "BYTES", "shape": [1], "data": ["agent_0"]},
            {"name": "obs", "datatype": "FP32", "shape": [1, 6], "data": [0.1] * 6}]
    before = fixed_v2(srv)
    cases = {
        "lone surrogate": {"inputs": [{**good[0], "data": ["\ud800"]}, good[1]]},
        "datatype list": {"inputs": [{**good[0], "datatype": ["BYTES"]}, good[1]]},
        "datatype object": {"inputs": [good[0], {**good[1], "datatype": {"FP32": 1}}]},
        "bools among floats": {"inputs": [good[0], {**good[1], "data": [0.1, True, 0.2, False, 0.3, 0.0]}]},
        "nested bytes": {"inputs": [{**good[0], "data": [[["agent_0"]]]}, good[1]]},
        "ragged floats": {"inputs": [good[0], {**good[1], "data": [[0.1] * 5, [0.1]]}]},
    }
    for name, body in cases.items():
        r = srv.http.post(srv.url + INFER, data=encode(body), headers=JSON, timeout=30)
        assert r.status_code == 400, (name, r.status_code, r.text[:200])
        check_v2(srv, r)
    dup = b'{"inputs": [], "inputs": ' + json.dumps(good).encode() + b"}"
    r = srv.http.post(srv.url + INFER, data=dup, headers=JSON, timeout=30)
    assert r.status_code == 400 and "duplicate key" in r.json()["error"], r.text
    for digits in ("9" * 5000, "1" * 4301, "0" * 30):
        r = srv.http.post(srv.url + INFER, data=encode({"inputs": good}) * 20, timeout=30,
                          headers={"Inference-Header-Content-Length": digits, **JSON})
        assert r.status_code == 400 and "digits" in r.json()["error"], r.text[:200]
    assert fixed_v2(srv) == before
    srv.probe.step()


@settings(SERVER_SETTINGS, max_examples=120)
@given(data=st.data())
def test_hostile_v2_bodies(srv, data):
    from hostile import oip_bodies
    if not hasattr(srv, "fixed_v2"):
        srv.fixed_v2 = fixed_v2(srv)
    body, headers = data.draw(oip_bodies(srv.spec, MAX_ROWS))
    r = srv.http.post(srv.url + INFER, data=body, headers=headers, timeout=30)
    check_v2(srv, r)
    if data.draw(st.integers(0, 9)) == 0:
        assert fixed_v2(srv) == srv.fixed_v2
        srv.probe.step()


def test_v2_fixed_request_unchanged_after_the_fuzz(srv):
    assert fixed_v2(srv) == getattr(srv, "fixed_v2", fixed_v2(srv))
    srv.probe.step()
    assert "Traceback" not in srv.log.read_text(errors="replace")
