"""Local state-dir faults against a real `bentoml serve` (2 workers): every fault is a 503 with
`Retry-After` (never a 500), stateless requests keep being served, and everything recovers without a
restart; a session whose state was lost says so (`session_state: "new"`; `PolicyClient` raises
`SessionLost`), never a silent zero state.

* a state dir that is read-only at start (a read-only bind mount, as root; skipped otherwise): ready,
  serving the published versions; session steps and uploads 503 until it is writable again;
* a corrupt manifest.json while serving: uploads 503, serving goes on with what was applied;
* garbage over the live sessions database while serving: it is replaced by an empty one (a session
  step may answer 503 once), every worker moves to it, and the lost session's next step says "new"."""
from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
import requests
import torch
from conftest import make_policy

from lorasa_serve import init_adapter
from lorasa_serve.artifacts import adapter_bytes
from lorasa_serve.client import PolicyClient, SessionLost
from benchmarks.servers import ServerProcess

pytestmark = pytest.mark.slow
TOKEN = "faults-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _mount(*args: str) -> None:
    r = subprocess.run(["mount", *args], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount here: {r.stderr.strip()}")


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    """A server started on a state dir mounted read-only (it holds an upload, v2 of agent_1)."""
    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root")
    from services.state import SessionLimits, open_backend
    root = tmp_path_factory.mktemp("faults")
    spec, _, _ = make_policy(root / "policy")
    state = root / "state"
    seed = open_backend("", str(state), spec.backbone_fingerprint, spec.hidden, SessionLimits())
    assert seed.publish_adapter("agent_1", _adapter(spec, 1)) == 2
    seed.close()
    _mount("--bind", str(state), str(state))
    try:
        _mount("-o", "remount,bind,ro", str(state))
        env = {"LORASA_POLICY": str(root / "policy"), "LORASA_STATE_DIR": str(state), "LORASA_WORKERS": "2",
               "LORASA_ADMIN_TOKEN": TOKEN}
        with ServerProcess(env, root / "server.log") as server:
            server.spec, server.state, server.log, server.read_only = spec, state, root / "server.log", True
            yield server
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)


def _adapter(spec, seed: int) -> bytes:
    return adapter_bytes(spec, "agent_1", init_adapter(spec, torch.Generator().manual_seed(seed), b_std=0.5))


def _rows(spec) -> list[dict]:
    return [{"agent_id": a.agent_id, "obs": [0.1] * a.obs_dim} for a in spec.agents]


def make_writable(srv) -> None:
    """Remove the read-only mount (the state dir is writable again; the server is not restarted)."""
    if srv.read_only:
        subprocess.run(["umount", "-l", str(srv.state)], check=True)
        srv.read_only = False


def act(srv, session_id: str | None = None) -> requests.Response:
    body = {"rows": _rows(srv.spec), **({"session_id": session_id} if session_id else {})}
    r = requests.post(srv.url + "/v1/act", json=body, timeout=30)
    assert r.status_code in (200, 503), r.text  # never a 500
    if r.status_code == 503:
        assert r.headers["Retry-After"] == "1", r.headers
    return r


def upload(srv, seed: int) -> requests.Response:
    r = requests.put(srv.url + "/v1/admin/adapters/agent_1", data=_adapter(srv.spec, seed), headers=AUTH,
                     timeout=30)
    assert r.status_code in (200, 503), r.text
    if r.status_code == 503:
        assert r.headers["Retry-After"] == "1", r.headers
    return r


def test_a_read_only_state_dir_at_start_serves_stateless_then_recovers(srv):
    if not srv.read_only:
        pytest.skip("runs first, on the server started read-only")
    for _ in range(4):  # both workers
        r = act(srv)
        assert r.status_code == 200 and r.json()["versions"] == [1, 2, 1]  # the published upload
        assert "session_state" not in r.json()
    r = act(srv, "ro-1")
    assert r.status_code == 503 and "Read-only file system" in r.json()["error"], r.text
    assert r.headers["X-Lorasa-Retry-Safe"] == "1"
    r = upload(srv, 3)
    assert r.status_code == 503 and "Read-only file system" in r.json()["error"], r.text
    assert requests.get(srv.url + "/readyz", timeout=10).status_code == 200
    make_writable(srv)  # no restart
    states = [act(srv, "ro-1").json()["session_state"] for _ in range(3)]
    assert states == ["new", "resumed", "resumed"]
    r = upload(srv, 3)
    assert r.status_code == 200 and r.json()["version"] == 3, r.text


def both_workers_serve(srv, versions: list[int]) -> None:
    """Until each of the two workers has answered with `versions` (each syncs at its next request)."""
    seen = set()
    for _ in range(200):
        r = act(srv)
        if r.status_code == 200 and r.json()["versions"] == versions:
            seen.add(r.headers["X-Lorasa-Worker"])
        if len(seen) == 2:
            return
    pytest.fail(f"both workers never served {versions}")


def test_a_corrupt_manifest_is_503_and_serving_goes_on(srv):
    make_writable(srv)
    r = upload(srv, 5)
    assert r.status_code == 200, r.text
    v = r.json()["version"]
    both_workers_serve(srv, [1, v, 1])  # (a worker that had not synced v3 would keep serving v2)
    manifest = srv.state / "manifest.json"
    good = manifest.read_bytes()
    manifest.write_bytes(b"{\"backbone_fingerprint\": " + b"[" * 100_000)  # deep and truncated
    try:
        r = upload(srv, 4)
        assert r.status_code == 503 and "unreadable manifest" in r.json()["error"], r.text
        assert "X-Lorasa-Retry-Safe" in r.headers  # nothing was published
        for _ in range(4):
            r = act(srv)
            assert r.status_code == 200 and r.json()["versions"] == [1, v, 1]
        assert requests.get(srv.url + "/v1/agents", timeout=10).status_code == 200
    finally:
        manifest.write_bytes(good)
    r = upload(srv, 4)
    assert r.status_code == 200 and r.json()["version"] == v + 1, r.text


def test_a_corrupt_session_store_is_replaced_and_the_loss_reported(srv):
    make_writable(srv)
    with PolicyClient(srv.url, retries=3) as client:
        ep = client.session()
        ids, obs = srv.spec.agent_ids, np.full((3, srv.spec.obs_max), 0.1, np.float32)
        assert [ep.act(ids, obs).session_state for _ in range(2)] == ["new", "resumed"]
        for t in range(3):
            assert act(srv, "kept").status_code == 200
        live = os.path.realpath(srv.state / "sessions.sqlite")
        for p in (live, live + "-wal", live + "-shm"):  # the database, its log and its index
            with open(p, "r+b") as f:
                f.write(os.urandom(os.path.getsize(p)))
        codes = [act(srv, f"other-{k}").status_code for k in range(6)]  # both workers meet it
        assert codes.count(503) <= 2 and codes[-2:] == [200, 200], codes  # at most once per worker
        r = act(srv, "kept")
        assert r.status_code == 200 and r.json()["session_state"] == "new"  # lost, and said so
        assert [act(srv, "kept").json()["session_state"] for _ in range(3)] == ["resumed"] * 3
        with pytest.raises(SessionLost) as e:  # the client's session was lost too
            ep.act(ids, obs)
        assert e.value.result.session_state == "new" and e.value.result.actions.shape[0] == 3
        assert ep.act(ids, obs).session_state == "resumed"
    assert os.path.realpath(srv.state / "sessions.sqlite") != live
    assert "is corrupt" in srv.log.read_text(errors="replace")
