"""The lone-request fast path (services/batcher.py, Batcher._inline): a lone small stateless request runs the batcher's
cycle on the caller's thread. It must answer exactly what the batcher answers, see every version
published before it, and never take a request the batcher should merge or a session step."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from conftest import make_policy, require_extra

require_extra("serve", "starlette", "bentoml", "prometheus_client")
from services import metrics  # noqa: E402
from services.config import ServiceConfig  # noqa: E402
from services.runtime import PolicyRuntime  # noqa: E402
from services.schema import parse_act  # noqa: E402


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    root = tmp_path_factory.mktemp("inline")
    make_policy(root / "policy", obs=(6, 5, 6), act=(2, 3, 2))
    cfg = ServiceConfig(policy=str(root / "policy"), state_dir=str(root / "state"), inline_max_rows=4)
    return PolicyRuntime(cfg, root / "policy")


def _req(rt, n_teams, seed=0, **kw):
    g = np.random.default_rng(seed)
    rows = [{"agent_id": a.agent_id, "obs": g.standard_normal(a.obs_dim).astype(np.float32).tolist()}
            for _ in range(n_teams) for a in rt.spec.agents]
    return parse_act({"rows": rows, **kw}, rt.table, 64)


def _inlined() -> float:
    return metrics.inline_requests._value.get()


def _through_batcher(rt, req):
    with rt.handling(), rt.handling():  # another request is being handled: the batcher merges them
        before = _inlined()
        res = rt.submit(req).result(timeout=30)
        assert _inlined() == before
    return res


def test_a_lone_small_request_is_answered_inline_exactly_as_the_batcher_answers(rt):
    req = _req(rt, 1)  # 3 rows <= inline_max_rows 4
    before = _inlined()
    fut = rt.submit(req)
    assert fut.done() and _inlined() == before + 1  # answered before submit returned
    fast, slow = fut.result(), _through_batcher(rt, req)
    for a, b in ((fast.actions, slow.actions), (fast.log_probs, slow.log_probs), (fast.state, slow.state),
                 (fast.versions, slow.versions)):
        np.testing.assert_array_equal(a, b)


def test_big_requests_and_session_steps_go_through_the_batcher(rt):
    before = _inlined()
    assert rt.submit(_req(rt, 2)).result(timeout=30).actions.shape[0] == 6  # 6 rows > 4
    rt.submit(_req(rt, 1, session_id="s-inline")).result(timeout=30)  # a session step
    assert _inlined() == before


def test_an_inline_request_sees_a_version_published_before_it(rt):
    agent = rt.spec.agent_ids[1]
    v = rt.state.publish_adapter(agent, rt.sync.served_adapter(agent))  # what an upload on another worker does
    req = _req(rt, 1)
    before = _inlined()
    res = rt.submit(req).result()
    assert _inlined() == before + 1
    assert res.versions.tolist() == [v if a == agent else rt.applied[a] for a in rt.spec.agent_ids]
    assert rt.applied[agent] == v


def test_inline_off_when_its_limit_is_zero(rt):
    off = replace(rt.batcher.cfg, inline_max_rows=0)
    rt.batcher.cfg, saved = off, rt.batcher.cfg
    try:
        before = _inlined()
        rt.submit(_req(rt, 1)).result(timeout=30)
        assert _inlined() == before
    finally:
        rt.batcher.cfg = saved
