"""The per-worker batcher (services/runtime.py) in-process: one bad request in a batch fails alone,
and non-finite outputs are a 422 for that request whose session keeps its previous state."""
from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import make_policy, require_extra

from lorasa_serve import Engine

require_extra("serve", "starlette", "bentoml", "prometheus_client")
from services.config import ServiceConfig  # noqa: E402
from services.runtime import PolicyRuntime, session_limits  # noqa: E402
from services.schema import BadRequest, parse_act  # noqa: E402
from services.state import SessionBusy, open_backend  # noqa: E402

BIG = 3.4e38  # finite in float32, so it passes validation, but overflows inside the network


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    root = tmp_path_factory.mktemp("rt")
    spec, _, _ = make_policy(root / "policy", obs=(6, 5, 6), act=(2, 3, 2))
    # sessions in the local backend's SQLite store (shared by workers), as in the reported bug
    cfg = ServiceConfig(policy=str(root / "policy"), state_dir=str(root / "state"), workers=2)
    runtime = PolicyRuntime(cfg, root / "policy")
    runtime.ref = Engine.from_dir(root / "policy", device="cpu", mode="lora")
    return runtime


def _req(rt, rows, **kw):
    return parse_act({"rows": rows, **kw}, rt.spec, 64)


def _team(rt, seed):
    g = np.random.default_rng(seed)
    return [{"agent_id": a.agent_id, "obs": g.standard_normal(a.obs_dim).astype(np.float32).tolist()}
            for a in rt.spec.agents]


def _expected(rt, rows, state=None):
    obs = torch.zeros(len(rows), rt.spec.obs_max)
    for i, r in enumerate(rows):
        obs[i, :len(r["obs"])] = torch.tensor(r["obs"])
    return rt.ref.act([r["agent_id"] for r in rows], obs, state)


def _batched(rt, reqs):
    """Submit `reqs` while the batcher is held, so they are served in one cycle -> futures."""
    started, gate = threading.Event(), threading.Event()

    def hold() -> None:
        started.set()
        gate.wait()

    held = rt.control(hold)
    assert started.wait(30)  # the batcher is inside `hold`: every request below waits for the next cycle
    futures = [rt.submit(r) for r in reqs]
    gate.set()
    held.result(timeout=30)
    return futures


def test_a_failing_request_does_not_fail_its_batch(rt):
    goods = [_team(rt, k) for k in range(4)]
    # a session id the validator would refuse, slipped in past it: SQLite cannot encode it
    bad = replace(_req(rt, _team(rt, 9), session_id="ok"), session_id="\ud800")
    reqs = [_req(rt, goods[0]), _req(rt, goods[1], session_id="iso-1"), bad, _req(rt, goods[2]),
            _req(rt, goods[3], session_id="iso-2")]
    futures = _batched(rt, reqs)
    with pytest.raises(UnicodeEncodeError):
        futures[2].result(timeout=30)
    for f, rows in zip([futures[i] for i in (0, 1, 3, 4)], goods):
        np.testing.assert_allclose(f.result(timeout=30).actions, _expected(rt, rows).actions.numpy(), atol=1e-5)
    # the sessions of the good requests were stored: their next step continues from them
    nxt = _team(rt, 20)
    res = rt.submit(_req(rt, nxt, session_id="iso-1")).result(timeout=30)
    want = _expected(rt, nxt, _expected(rt, goods[1]).state)
    np.testing.assert_allclose(res.actions, want.actions.numpy(), atol=1e-5)


def test_nonfinite_outputs_are_422_and_never_stored(rt):
    spec = rt.spec
    first = _team(rt, 30)
    rt.submit(_req(rt, first, session_id="nf")).result(timeout=30)
    carried = _expected(rt, first).state  # the session's state after its one good step
    extreme = [{**r, "obs": [BIG * (-1) ** j for j in range(len(r["obs"]))]} for r in _team(rt, 31)]
    hot_state = [{**r, "state": [BIG * (-1) ** j for j in range(spec.hidden)]} for r in _team(rt, 32)]
    good = _team(rt, 33)
    futures = _batched(rt, [_req(rt, extreme, session_id="nf"), _req(rt, good), _req(rt, hot_state)])
    for f in (futures[0], futures[2]):
        with pytest.raises(BadRequest) as e:
            f.result(timeout=30)
        assert e.value.status == 422 and "rows [0, 1, 2]" in e.value.message, e.value.message
    res = futures[1].result(timeout=30)
    assert res.batch["requests"] == 3  # served in the same forward as the two failures
    np.testing.assert_allclose(res.actions, _expected(rt, good).actions.numpy(), atol=1e-5)
    # a mixed request names only its bad rows
    mixed = [good[0], extreme[1], good[2]]
    with pytest.raises(BadRequest, match=r"rows \[1\]"):
        rt.submit(_req(rt, mixed)).result(timeout=30)
    # session "nf" kept the state of its good step
    nxt = _team(rt, 34)
    res = rt.submit(_req(rt, nxt, session_id="nf")).result(timeout=30)
    np.testing.assert_allclose(res.actions, _expected(rt, nxt, carried).actions.numpy(), atol=1e-5)


def test_a_batch_whose_every_session_is_busy_keeps_the_batcher_alive(rt):
    """Every request of a batch refused when its session is opened (a step in flight elsewhere):
    each gets SessionBusy, and the batcher goes on serving."""
    other = open_backend("", rt.cfg.state_dir, rt.spec.backbone_fingerprint, rt.spec.hidden,
                         session_limits(rt.cfg))  # another worker's handle on the same state dir
    (held,) = other.open_steps([("busy-x", rt.spec.agent_ids)])  # that worker's step in flight
    with pytest.raises(SessionBusy, match="in flight"):
        rt.submit(_req(rt, _team(rt, 40), session_id="busy-x")).result(timeout=30)
    assert other.close_steps([(held, None)]) == [True]
    other.close()
    good = _team(rt, 41)
    res = rt.submit(_req(rt, good, session_id="busy-x")).result(timeout=30)
    np.testing.assert_allclose(res.actions, _expected(rt, good).actions.numpy(), atol=1e-5)
