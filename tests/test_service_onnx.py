"""The service over another `ActBackend`: a `lorasa-export` directory served through onnxruntime
(LORASA_BACKEND=onnx) by a real `bentoml serve`. Same routes, validator and batcher as with the
Engine; its adapters are fixed in the graphs, so uploads and merges are refused (409)."""
from __future__ import annotations

import numpy as np
import pytest
import requests
import torch
from conftest import make_policy, require_extra

from lorasa_serve import Engine, init_adapter
from lorasa_serve.artifacts import adapter_bytes

require_extra("onnx", "onnx", "onnxruntime")
require_extra("serve", "starlette", "bentoml", "prometheus_client")
from exporters import ExportConfig, export_policy  # noqa: E402
from lorasa_serve.client import PolicyClient  # noqa: E402
from services.config import ServiceConfig  # noqa: E402
from benchmarks.servers import ServerProcess  # noqa: E402
from services.runtime import PolicyRuntime  # noqa: E402
from services.state import SessionLimits, open_backend  # noqa: E402

pytestmark = pytest.mark.slow
TOKEN = "onnx-token-0123456789"
TOL = 1e-4  # onnxruntime vs torch fp32 (the export itself is verified to 1e-5 on its rollout)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx_svc")
    spec, _, _ = make_policy(root / "policy", obs=(6, 5, 6), act=(2, 3, 2), b_std=0.05)
    report = export_policy(ExportConfig(root / "policy", root / "export", progress=False, envs=2, steps=20))
    assert report.ok, report.table()
    return root, spec


@pytest.fixture(scope="module")
def srv(exported):
    root, spec = exported
    env = {"LORASA_POLICY": str(root / "export"), "LORASA_BACKEND": "onnx", "LORASA_ADMIN_TOKEN": TOKEN,
           "LORASA_STATE_DIR": str(root / "state")}
    with ServerProcess(env, root / "server.log") as server:
        server.engine = Engine.from_dir(root / "policy", device="cpu", mode="lora")
        server.spec = spec
        yield server


def _obs(spec, ids, seed):
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(len(ids), spec.obs_max, generator=g)
    return obs * (torch.arange(spec.obs_max) < torch.tensor([spec.agent(a).obs_dim for a in ids])[:, None])


def test_v1_and_v2_act_through_onnxruntime_equal_the_engine(srv):
    spec, ids = srv.spec, ["agent_2", "agent_0", "agent_1", "agent_0"]
    state = None
    with PolicyClient(srv.url) as client:
        for step in range(4):  # a recurrent rollout: the state comes back each step
            obs = _obs(spec, ids, step)
            want = srv.engine.act(ids, obs, state)
            got = client.act(ids, obs.numpy(), None if state is None else state.numpy())
            np.testing.assert_allclose(got.actions, want.actions.numpy(), atol=TOL)
            np.testing.assert_allclose(got.state, want.state.numpy(), atol=TOL)
            rows = [{"agent_id": a, "obs": obs[i, :spec.agent(a).obs_dim].tolist(),
                     **({} if state is None else {"state": state[i].tolist()})} for i, a in enumerate(ids)]
            v1 = requests.post(srv.url + "/v1/act", json={"rows": rows}, timeout=30).json()
            np.testing.assert_allclose(np.asarray(v1["log_probs"]), want.log_probs.numpy(), atol=TOL)
            state = want.state
    # sessions work as with the Engine: the server keeps the state
    with PolicyClient(srv.url) as client:
        episode, state = client.session(), None
        for step in range(3):
            obs = _obs(spec, spec.agent_ids, 10 + step)
            want = srv.engine.act(spec.agent_ids, obs, state)
            got = episode.act(spec.agent_ids, obs.numpy())
            np.testing.assert_allclose(got.actions, want.actions.numpy(), atol=TOL)
            state = want.state


def test_uploads_and_merges_are_refused_and_change_nothing(srv):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    before = requests.get(srv.url + "/v1/agents", timeout=10).json()
    assert [a["version"] for a in before["agents"]] == [1, 1, 1]
    blob = adapter_bytes(srv.spec, "agent_0", init_adapter(srv.spec, torch.Generator().manual_seed(5)))
    r = requests.put(srv.url + "/v1/admin/adapters/agent_0", data=blob, headers=auth, timeout=30)
    assert r.status_code == 409 and "LORASA_BACKEND=engine" in r.json()["error"], r.text
    r = requests.post(srv.url + "/v1/admin/merge", headers=auth, timeout=30)
    assert r.status_code == 409, r.text
    assert requests.get(srv.url + "/v1/agents", timeout=10).json() == before


def test_onnx_worker_never_serves_older_adapters_than_published(exported, tmp_path):
    """A state dir holding an upload (e.g. shared with Engine replicas): the ONNX worker cannot load it,
    so it stays not ready, saying why, instead of serving the export's older adapters."""
    root, spec = exported
    state = open_backend("", str(tmp_path / "state"), spec.backbone_fingerprint, spec.hidden, SessionLimits())
    state.reseed({}, lambda a: b"", set())
    blob = adapter_bytes(spec, "agent_1", init_adapter(spec, torch.Generator().manual_seed(6)))
    assert state.publish_adapter("agent_1", blob) == 2
    cfg = ServiceConfig(policy=str(root / "export"), backend="onnx", state_dir=str(tmp_path / "state"))
    rt = PolicyRuntime(cfg, root / "export")
    assert rt.engine is None and not rt.ready
    assert "LORASA_BACKEND=onnx" in rt.state_error and "agent_1 v2" in rt.state_error, rt.state_error
