"""The fast path (services/batcher.py, Batcher.on_loop): small stateless requests run the batcher's cycle
on the event loop, those that arrive together in one cycle. It must answer exactly what the batcher
thread answers, see every version published before it, merge concurrent requests, hand them to the
batcher thread while it is busy, and never take a big request or a session step."""
from __future__ import annotations

import asyncio
import threading
from contextlib import contextmanager
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
    before = _inlined()
    res = rt.submit(req).result(timeout=30)  # submit: always the batcher thread
    assert _inlined() == before
    return res


@contextmanager
def engine_lock_held(rt):
    """Another thread holds the engine lock (as the batcher thread does during a forward) until the
    block ends, or until the yielded event is set."""
    held, release = threading.Event(), threading.Event()

    def hold():
        with rt.batcher._lock:
            held.set()
            release.wait(10)
    t = threading.Thread(target=hold)
    t.start()
    held.wait(10)
    try:
        yield release
    finally:
        release.set()
        t.join()


def _act(rt, *reqs):
    """rt.act for each request, all started in one event-loop iteration (as concurrent handlers)."""
    async def main():
        return await asyncio.gather(*(rt.act(r) for r in reqs))
    return asyncio.run(main())


def test_a_lone_small_request_is_answered_on_the_loop_exactly_as_the_batcher_answers(rt):
    req = _req(rt, 1)  # 3 rows <= inline_max_rows 4
    before = _inlined()
    (fast,) = _act(rt, req)
    assert _inlined() == before + 1 and fast.batch == {"requests": 1, "rows": 3}
    slow = _through_batcher(rt, req)
    for a, b in ((fast.actions, slow.actions), (fast.log_probs, slow.log_probs), (fast.state, slow.state),
                 (fast.versions, slow.versions)):
        np.testing.assert_array_equal(a, b)


def test_requests_arriving_together_share_one_cycle_up_to_the_row_limit(rt):
    reqs = [_req(rt, 1, seed=s) for s in range(3)]  # 3 rows each, inline_max_rows 4: one per cycle
    small = [parse_act({"rows": [{"agent_id": rt.spec.agent_ids[0], "obs": [0.5] * rt.spec.agents[0].obs_dim}]},
                       rt.table, 64) for _ in range(4)]  # 1 row each: all four in one cycle
    before = _inlined()
    for res, req in zip(_act(rt, *reqs), reqs):
        assert res.batch == {"requests": 1, "rows": 3}
        np.testing.assert_array_equal(res.actions, _through_batcher(rt, req).actions)
    results = _act(rt, *small)
    assert [r.batch for r in results] == [{"requests": 4, "rows": 4}] * 4
    assert _inlined() == before + 7


def test_while_the_batcher_thread_holds_the_engine_it_takes_the_loop_requests(rt):
    """A cycle on the loop never waits for the engine lock: the requests go to the batcher's queue."""
    req = _req(rt, 1)
    with engine_lock_held(rt) as release:
        threading.Timer(0.3, release.set).start()
        before = _inlined()
        (res,) = _act(rt, req)
    assert _inlined() == before
    np.testing.assert_array_equal(res.actions, _through_batcher(rt, req).actions)


def test_big_requests_and_session_steps_go_through_the_batcher(rt):
    before = _inlined()
    assert _act(rt, _req(rt, 2))[0].actions.shape[0] == 6  # 6 rows > 4
    _act(rt, _req(rt, 1, session_id="s-inline"))  # a session step
    assert _inlined() == before


def test_an_inline_request_sees_a_version_published_before_it(rt):
    agent = rt.spec.agent_ids[1]
    v = rt.state.publish_adapter(agent, rt.sync.served_adapter(agent))  # what an upload on another worker does
    req = _req(rt, 1)
    before = _inlined()
    (res,) = _act(rt, req)
    assert _inlined() == before + 1
    assert res.versions.tolist() == [v if a == agent else rt.applied[a] for a in rt.spec.agent_ids]
    assert rt.applied[agent] == v


def test_inline_off_when_its_limit_is_zero(rt):
    off = replace(rt.batcher.cfg, inline_max_rows=0)
    rt.batcher.cfg, saved = off, rt.batcher.cfg
    try:
        before = _inlined()
        _act(rt, _req(rt, 1))
        assert _inlined() == before
    finally:
        rt.batcher.cfg = saved


def test_a_handler_gone_while_its_request_waits_for_the_batcher_cancels_it(rt):
    """The batcher thread holds the engine lock: a fast-path request is handed to its queue; its handler
    gives up (a timeout, the client gone) before the batcher takes it: the queued job is cancelled, so
    the batcher drops it instead of running its forward."""
    with engine_lock_held(rt):
        first = rt.control(lambda: None)  # the batcher thread takes it, then waits for the lock: busy
        for _ in range(100):
            with rt.batcher._cv:
                if not rt.batcher._queue:
                    break
            threading.Event().wait(0.01)

        async def main():
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(rt.act(_req(rt, 1)), 0.2)
            await asyncio.sleep(0)  # the cancellation's callbacks run
        asyncio.run(main())
        with rt.batcher._cv:
            queued = list(rt.batcher._queue)
        assert len(queued) == 1 and queued[0].future.cancelled()
    first.result(timeout=10)
    (res,) = _act(rt, _req(rt, 1))  # and the worker goes on serving
    assert res.actions.shape[0] == 3
