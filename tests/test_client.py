"""lorasa_serve.client against a real `bentoml serve` of a categorical recurrent policy: equality with
Engine.act (avail masks, state, reset, seeded sampling), sessions, typed errors, bounded 503 retries
honouring Retry-After, one kept-alive connection, and importing it without torch or bentoml."""
from __future__ import annotations

import http.server
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from conftest import make_policy, require_extra

require_extra("serve", "starlette", "bentoml")
require_extra("dev", "requests")
import requests  # noqa: E402
from lorasa_serve import Engine  # noqa: E402
from lorasa_serve.client import (RETRY_SAFE, ClientError, ClientInputError, PolicyClient,  # noqa: E402
                                 ServerUnavailable, SessionLost, StepOutcomeUnknown)
from lorasa_serve.protocol import AgentTable, InputError, check_act  # noqa: E402
from benchmarks.servers import REPO, ServerProcess  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def srv(categorical_server):
    return categorical_server  # tests/conftest.py: one server for the session


def sample(spec, n, seed):
    g = np.random.default_rng(seed)
    ids = [spec.agent_ids[k] for k in g.integers(0, len(spec.agents), n)]
    dims = np.array([spec.agent(a).obs_dim for a in ids])
    obs = (g.standard_normal((n, spec.obs_max)) * (np.arange(spec.obs_max) < dims[:, None])).astype(np.float32)
    avail = g.random((n, spec.act_max)) < 0.6
    avail[np.arange(n), 0] = True  # at least one action per row
    return ids, obs, g.standard_normal((n, spec.hidden)).astype(np.float32), g.random(n) < 0.3, avail


def engine_act(srv, ids, obs, state=None, reset=None, avail=None, generator=None):
    t = lambda x: None if x is None else torch.tensor(x)  # noqa: E731
    return srv.engine.act(ids, t(obs), t(state), t(reset), t(avail), deterministic=generator is None,
                          generator=generator)


def test_act_equals_engine_act(srv):
    ids, obs, state, reset, avail = sample(srv.spec, 21, 0)
    with PolicyClient(srv.url) as c:
        for agents in (ids, np.array([srv.spec.agent_ids.index(a) for a in ids])):
            out = c.act(agents, obs, state, reset, avail)
            want = engine_act(srv, ids, obs, state, reset, avail)
            assert out.actions.dtype == np.int64 and out.actions.shape == (21,)
            np.testing.assert_array_equal(out.actions, want.actions.numpy())
            np.testing.assert_allclose(out.log_probs, want.log_probs.numpy(), atol=1e-5)
            np.testing.assert_allclose(out.state, want.state.numpy(), atol=1e-5)
            assert out.versions.tolist() == [1] * 21
            assert avail[np.arange(21), out.actions].all()
        seeded = c.act(ids, obs, state, reset, avail, deterministic=False, seed=99)
        want = engine_act(srv, ids, obs, state, reset, avail, torch.Generator().manual_seed(99))
        np.testing.assert_array_equal(seeded.actions, want.actions.numpy())
        conn = c._conn
        for _ in range(3):
            c.act(ids[:2], obs[:2])
        assert c._conn is conn, "the keep-alive connection was not reused"


def test_integer_agent_indices_as_list_range_or_tuple(srv):
    ids, obs, _, _, avail = sample(srv.spec, 2, 3)
    ids = srv.spec.agent_ids[:2]
    obs = obs * (np.arange(srv.spec.obs_max) < np.array([srv.spec.agent(a).obs_dim for a in ids])[:, None])
    want = engine_act(srv, ids, obs, avail=avail)
    with PolicyClient(srv.url) as c:
        for agents in ([0, 1], range(2), (0, np.int64(1)), np.array([0, 1], dtype=object)):
            out = c.act(agents, obs, avail=avail)
            np.testing.assert_array_equal(out.actions, want.actions.numpy())
            np.testing.assert_allclose(out.log_probs, want.log_probs.numpy(), atol=1e-5)
        with pytest.raises(ClientInputError, match="row 0: unknown agent id True; serving"):  # not an index
            c.act([True], obs[:1])


def test_session_ids_default_to_random_uuid4(srv):
    with PolicyClient(srv.url) as c:
        a, b = c.session(), c.session()
        assert a.session_id != b.session_id and len(a.session_id) == 32 and int(a.session_id, 16) >= 0
        assert c.session("mine").session_id == "mine"
        ids = srv.spec.agent_ids
        a.act(ids, np.zeros((2, srv.spec.obs_max), np.float32))
        assert a.reset() and not b.reset()  # a's steps were kept under its own id only


def test_sessions(srv):
    spec = srv.spec
    ids, obs, _, _, avail = sample(spec, 2, 5)
    ids = spec.agent_ids
    obs = obs * (np.arange(spec.obs_max) < np.array([spec.agent(a).obs_dim for a in ids])[:, None])
    with PolicyClient(srv.url) as c:
        ep = c.session("client-ep")
        state = None
        for t in range(3):
            out = ep.act(ids, obs * (t + 1), avail=avail, reset=[t == 0] * 2)
            want = engine_act(srv, ids, obs * (t + 1), state, None, avail)
            np.testing.assert_allclose(out.log_probs, want.log_probs.numpy(), atol=1e-5)
            assert out.state is None  # kept on the server
            assert out.session_state == ("new" if t == 0 else "resumed")
            state = want.state.numpy()
        assert ep.reset() and not ep.reset()
        out = ep.act(ids, obs, avail=avail)  # "new" after the Session's own reset: no error
        np.testing.assert_allclose(out.log_probs, engine_act(srv, ids, obs, avail=avail).log_probs.numpy(),
                                   atol=1e-5)
        assert out.session_state == "new" and c.act(ids, obs, avail=avail).session_state is None


def test_a_session_whose_state_is_gone_is_reported(srv):
    """The server forgot the session (here: a reset sent around the Session object, as a lost store
    looks to the client): on_lost="raise" raises SessionLost with the step's result, "warn" warns."""
    ids, obs = srv.spec.agent_ids, np.zeros((2, srv.spec.obs_max), np.float32)
    avail = np.ones((2, srv.spec.act_max), bool)
    with PolicyClient(srv.url) as c:
        for on_lost in ("raise", "warn", "ignore"):
            ep = c.session(on_lost=on_lost)
            ep.act(ids, obs, avail=avail)
            assert c.reset_session(ep.session_id)  # not through ep
            if on_lost == "raise":
                with pytest.raises(SessionLost, match="started from a zero state") as e:
                    ep.act(ids, obs, avail=avail)
                assert e.value.result.session_state == "new" and e.value.result.actions.shape == (2,)
            elif on_lost == "warn":
                with pytest.warns(RuntimeWarning, match="zero state"):
                    assert ep.act(ids, obs, avail=avail).session_state == "new"
            else:
                assert ep.act(ids, obs, avail=avail).session_state == "new"
            assert ep.act(ids, obs, avail=avail).session_state == "resumed"
            assert c.reset_session(ep.session_id)
            ep.act(ids, obs, avail=avail, reset=[True, True])  # every row resets: no loss to report
        with pytest.raises(ClientInputError, match="on_lost"):
            c.session(on_lost="retry")


def test_typed_errors(srv):
    """Bad arguments are ClientInputError with the protocol's message (the one the server would
    answer), before anything is sent; what only the server knows (its row limit) is a ClientError."""
    table = AgentTable(srv.spec)
    bad = [(["agent_0"], np.zeros((1, 8), np.float32), {}), (["nobody"], np.zeros((1, 7), np.float32), {}),
           (["agent_0"], np.full((1, 7), np.nan, np.float32), {}), (["agent_1", "agent_0"], np.zeros((2, 6)), {}),
           (["agent_0", "agent_0"], np.zeros((2, 7)), {"session_id": "dup"}),
           (["agent_0"], np.zeros((1, 7)), {"session_id": "not ok"}),
           (["agent_0"], {"agent_0": np.zeros(7)}, {}), ("agent_0", np.zeros((1, 7)), {})]
    with PolicyClient(srv.url) as c:
        for ids, obs, kw in bad:
            with pytest.raises(InputError) as want:
                check_act(table, ids, obs, session_id=kw.get("session_id"))
            with pytest.raises(ClientInputError) as e:
                c.act(ids, obs, **kw)
            assert e.value.status == 0 and e.value.message == str(want.value), (ids, obs)
        r = requests.post(srv.url + "/v2/models/lorasa_policy/infer", timeout=10, json={  # the server agrees
            "inputs": [{"name": "agent_id", "datatype": "BYTES", "shape": [1], "data": ["nobody"]},
                       {"name": "obs", "datatype": "FP32", "shape": [1, 7], "data": [0.0] * 7}]})
        assert r.status_code == 400 and r.json()["error"] == c_msg(c, ["nobody"])
        with pytest.raises(ClientError) as e:
            c.act(["agent_0"] * 65, np.zeros((65, 7), np.float32))
        assert e.value.status == 413
        assert c.act(["agent_1"], np.zeros((1, 7), np.float32)).actions.shape == (1,)  # still fine
    with pytest.raises(ClientError) as e:
        PolicyClient(srv.url, model="other").act(["agent_0"], np.zeros((1, 7), np.float32))
    assert e.value.status == 404


def c_msg(c: PolicyClient, ids) -> str:
    """The client's message for `ids` with a valid obs."""
    with pytest.raises(ClientInputError) as e:
        c.act(ids, np.zeros((len(ids), 7), np.float32))
    return e.value.message


def test_503_is_retried_honouring_retry_after_then_raised(tmp_path):
    """A server whose policy cannot load answers 503 (Retry-After: 1) forever: the client waits
    what it says (capped), a bounded number of times, then raises ServerUnavailable."""
    make_policy(tmp_path / "broken")
    data = (tmp_path / "broken" / "backbone.safetensors").read_bytes()
    (tmp_path / "broken" / "backbone.safetensors").write_bytes(data[:100])
    server = ServerProcess({"LORASA_POLICY": str(tmp_path / "broken")}, tmp_path / "server.log").start()
    try:
        c = PolicyClient(server.url, retries=3, max_retry_wait_s=0.3)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until the server answers at all
            try:
                c.act(["agent_0"], np.zeros((1, 6), np.float32))
            except ServerUnavailable as e:
                if e.status == 503:
                    break
            time.sleep(0.2)
        t0 = time.monotonic()
        with pytest.raises(ServerUnavailable) as e:
            c.act(["agent_0"], np.zeros((1, 6), np.float32))
        assert e.value.status == 503 and "not ready" in e.value.message
        assert 0.9 <= time.monotonic() - t0 < 10  # 3 waits of min(Retry-After 1 s, cap 0.3 s)
        # "not ready" changed nothing: marked retry-safe, so a session step is retried the same way
        r = requests.post(server.url + "/v2/models/lorasa_policy/infer", data=b"{}", timeout=10)
        assert r.status_code == 503 and r.headers[RETRY_SAFE] == "1"
        t0 = time.monotonic()
        with pytest.raises(ServerUnavailable) as e:
            c.session("s").act([0], np.zeros((1, 6), np.float32))  # an index: no metadata call
        assert e.value.status == 503 and not isinstance(e.value, StepOutcomeUnknown)
        assert 0.9 <= time.monotonic() - t0 < 10
    finally:
        server.stop()
    with pytest.raises(ServerUnavailable) as e:  # nobody listening: bounded, then typed
        PolicyClient(server.url, retries=1, max_retry_wait_s=0.1).act(["agent_0"], np.zeros((1, 6)))
    assert e.value.status == 0


class _Peer:
    """A loopback HTTP peer standing in for what a real server does only under a fault: it reads
    whole requests and counts them, then answers 503 (with or without the retry-safe mark) or closes
    the connection without answering."""

    def __init__(self, mode: str):
        peer = self
        self.mode, self.count = mode, 0

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                peer.count += 1
                if peer.mode == "drop":  # the request arrived whole; the answer is lost
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                body = b'{"error": "state backend unavailable: storing failed"}'
                self.send_response(503)
                self.send_header("Retry-After", "0")
                if peer.mode == "safe503":
                    self.send_header(RETRY_SAFE, "1")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _step(url: str, session: str | None):
    with PolicyClient(url, retries=3, max_retry_wait_s=0.01) as c:
        c._meta = {"inputs": [{"name": "obs", "shape": [-1, 6]}], "outputs": [{"name": "action", "shape": [-1, 2]}],
                   "parameters": {"agents": [{"agent_id": "agent_0", "obs_dim": 6, "act_dim": 2}]}}  # what
        # metadata() would say (a feed-forward Gaussian policy); the peer only answers infer
        return c.act(["agent_0"], np.zeros((1, 6), np.float32), session_id=session)


@pytest.mark.parametrize("mode", ["drop", "unsafe503"])
def test_session_step_with_unknown_outcome_is_never_resent(mode):
    with _Peer(mode) as peer:
        with pytest.raises(StepOutcomeUnknown, match="reset the session or continue") as e:
            _step(peer.url, "s")
        assert peer.count == 1 and e.value.status == (0 if mode == "drop" else 503)
        with pytest.raises(ServerUnavailable) as e:  # a stateless request: retried as before on 503
            _step(peer.url, None)
        assert not isinstance(e.value, StepOutcomeUnknown)
        assert peer.count == 1 + (1 if mode == "drop" else 4)


def test_session_step_is_resent_after_a_retry_safe_503():
    with _Peer("safe503") as peer:
        with pytest.raises(ServerUnavailable) as e:
            _step(peer.url, "s")
        assert peer.count == 4 and e.value.status == 503 and not isinstance(e.value, StepOutcomeUnknown)


def test_session_step_on_a_connection_closed_while_idle_is_sent_on_a_new_one(srv):
    """The server closing an idle kept-alive connection is no lost answer: the client notices before
    sending and opens a new connection, so the session steps on, once per call."""
    ids = srv.spec.agent_ids
    obs = np.zeros((2, srv.spec.obs_max), np.float32)
    with PolicyClient(srv.url) as c:
        ep = c.session()
        first = ep.act(ids, obs)
        c._conn.sock.shutdown(socket.SHUT_WR)  # what the server's idle timeout looks like here: EOF
        time.sleep(0.2)
        second = ep.act(ids, obs)
        state = engine_act(srv, ids, obs).state
        want = engine_act(srv, ids, obs, state.numpy())
        np.testing.assert_allclose(second.log_probs, want.log_probs.numpy(), atol=1e-5)
        assert first.log_probs.shape == (2,)


def test_bentoml_client_finds_no_endpoints_as_the_readme_says(srv):
    """README ("Which clients"): BentoML's own clients call `@bentoml.api` endpoints, which this service
    does not have (its API is /v1 and /v2): `bentoml.SyncHTTPClient` connects and lists none."""
    import bentoml
    from bentoml.exceptions import NotFound
    with bentoml.SyncHTTPClient(srv.url, server_ready_timeout=30) as c:
        assert c.endpoints == {}
        with pytest.raises(NotFound):
            c.call("act", rows=[{"agent_id": "agent_0", "obs": [0.0] * 7}])
    readme = (REPO / "README.md").read_text()
    assert "`bentoml.SyncHTTPClient`" in readme and "no endpoints" in readme


def test_client_imports_without_torch_or_bentoml():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['bentoml'] = None\n"
            "import lorasa_serve.client as c, lorasa_serve\n"
            "assert c.PolicyClient and lorasa_serve.__version__\n"
            "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
            "try:\n    lorasa_serve.Engine\nexcept ImportError:\n    print('engine needs torch')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "engine needs torch", r.stderr
