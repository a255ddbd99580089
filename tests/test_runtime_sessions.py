"""PolicyRuntime in-process (no server): a second step of a session sent while the first is queued
is refused at once (the same 409 rule as across workers); the next step, sent after the answer,
continues from the stored state."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from conftest import make_policy

from lorasa_serve import Engine
from services.config import ServiceConfig
from services.runtime import PolicyRuntime
from services.schema import parse_act
from services.state import SessionBusy


def test_concurrent_step_of_a_session_is_refused_in_one_worker(tmp_path):
    make_policy(tmp_path / "policy")
    cfg = ServiceConfig(policy=str(tmp_path / "policy"), state_dir=str(tmp_path / "state"))
    rt = PolicyRuntime(cfg, tmp_path / "policy")
    assert rt.ready and rt.state_error is None
    obs = np.random.default_rng(0).standard_normal((3, 6)).round(3).tolist()
    body = {"session_id": "s", "rows": [{"agent_id": f"agent_{i}", "obs": obs[i]} for i in range(3)]}
    req = parse_act(body, rt.spec, 64)
    gate = threading.Event()
    blocker = rt.control(gate.wait)  # holds the batcher: the first step stays queued
    first = rt.submit(req)
    with pytest.raises(SessionBusy, match="in flight"):
        rt.submit(req)
    other = rt.submit(parse_act({**body, "session_id": "t"}, rt.spec, 64))  # other sessions are fine
    gate.set()
    blocker.result(10)
    r1, r2 = first.result(10), other.result(10)
    np.testing.assert_array_equal(r1.actions, r2.actions)
    second = rt.submit(req).result(10)  # once answered, the next step runs from the stored state
    eng = Engine.from_dir(tmp_path / "policy", device="cpu")
    x = torch.from_numpy(req.obs)
    out1 = eng.act(req.agent_ids, x)
    out2 = eng.act(req.agent_ids, x, out1.state)
    np.testing.assert_allclose(second.state, out2.state.numpy(), atol=1e-5, rtol=0)
    assert rt.state.session_stats()["sessions"] == 2
