"""PolicyRuntime in-process against real backends (a state dir, a real redis-server): a request
cancelled by a timeout never kills the batcher nor hurts its batch; a process that never synced with a
Redis restarted empty waits for the servers that did instead of seeding it with version 1; a transient
failure at start is retried; an adapter that cannot be loaded is backed off and reported."""
from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import numpy as np
import pytest
import torch
from conftest import make_policy, require_extra

from lorasa_serve import Engine, init_adapter
from lorasa_serve.artifacts import adapter_bytes, fingerprint

require_extra("serve", "starlette", "bentoml", "prometheus_client")
from prometheus_client import REGISTRY  # noqa: E402

from services import adapter_sync  # noqa: E402
from services.config import ServiceConfig  # noqa: E402
from benchmarks.servers import RedisServer  # noqa: E402
from services.runtime import PolicyRuntime  # noqa: E402
from services.schema import parse_act  # noqa: E402
from services.state import (SessionBusy, SessionLimits, SessionStep, StateUnavailable,  # noqa: E402
                            open_backend)


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    root = tmp_path_factory.mktemp("policy")
    spec, _, _ = make_policy(root)
    return root, spec


def _team(spec, seed):
    g = np.random.default_rng(seed)
    return [{"agent_id": a.agent_id, "obs": g.standard_normal(a.obs_dim).astype(np.float32).tolist()}
            for a in spec.agents]


def _req(rt, rows, **kw):
    return parse_act({"rows": rows, **kw}, rt.spec, 64)


def _expected(ref, rows, state=None):
    obs = torch.zeros(len(rows), ref.spec.obs_max)
    for i, r in enumerate(rows):
        obs[i, :len(r["obs"])] = torch.tensor(r["obs"])
    return ref.act([r["agent_id"] for r in rows], obs, state)


def _adapter(spec, agent_id, seed):
    return adapter_bytes(spec, agent_id, init_adapter(spec, torch.Generator().manual_seed(seed), b_std=0.8))


def _wait(cond, timeout=15.0, what=""):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _failures(agent_id):
    return REGISTRY.get_sample_value("lorasa_adapter_load_failures_total", {"agent_id": agent_id}) or 0.0


# --- 1: cancellation ---------------------------------------------------------------------------------
def test_cancelled_requests_never_kill_the_batcher_nor_hurt_their_batch(policy, tmp_path):
    root, spec = policy
    rt = PolicyRuntime(ServiceConfig(policy=str(root), state_dir=str(tmp_path / "state")), root)
    ref = Engine.from_dir(root, device="cpu", mode="lora")
    ran = []

    # (a) cancelled while queued (the client's timeout fired first): dropped before any lease is taken
    gate = threading.Event()
    held = rt.control(gate.wait)
    _wait(held.running, what="the batcher to be held")
    queued = rt.submit(_req(rt, _team(spec, 1), session_id="c-queued"))
    ctl = rt.control(lambda: ran.append(1))
    good_rows = _team(spec, 2)
    good = rt.submit(_req(rt, good_rows, session_id="c-good"))
    assert queued.cancel() and ctl.cancel()
    gate.set()
    held.result(timeout=30)
    np.testing.assert_allclose(good.result(timeout=30).actions, _expected(ref, good_rows).actions.numpy(),
                               atol=1e-5)
    assert ran == [] and queued.cancelled()
    probe = open_backend("", str(tmp_path / "state"), spec.backbone_fingerprint, spec.hidden,
                         SessionLimits())  # its own handle: the runtime's belongs to its batcher thread
    (step,) = probe.open_steps([("c-queued", spec.agent_ids)])  # never leased, nothing stored
    assert isinstance(step, SessionStep) and step.is_new.all()
    assert probe.close_steps([(step, None)]) == [True]
    probe.close()

    # (b) cancelled while its batch runs, the way BentoML's timeout does it (asyncio.wrap_future + cancel):
    # the step completes (stored once, lease released), its session stays in flight until then
    gate1, gate2 = threading.Event(), threading.Event()
    held = rt.control(gate1.wait)
    _wait(held.running, what="the batcher to be held")
    hold2 = rt.control(gate2.wait)  # same cycle as the steps below: they are taken (running) meanwhile
    rows1, rows_other = _team(spec, 3), _team(spec, 4)
    running = rt.submit(_req(rt, rows1, session_id="c-run"))
    other = rt.submit(_req(rt, rows_other, session_id="c-other"))
    gate1.set()
    held.result(timeout=30)
    _wait(running.running, what="the step to be taken")

    async def cancel_like_a_timeout():
        waiting = asyncio.wrap_future(running)
        await asyncio.sleep(0)
        waiting.cancel()
        await asyncio.sleep(0)  # the cancellation reaches the concurrent future (too late: it runs)
        return waiting.cancelled()
    assert asyncio.run(cancel_like_a_timeout()) and not running.cancelled()
    with pytest.raises(SessionBusy):  # a retry cannot overtake the step still in flight
        rt.submit(_req(rt, _team(spec, 5), session_id="c-run"))
    gate2.set()
    hold2.result(timeout=30)
    first = running.result(timeout=30)
    np.testing.assert_allclose(first.actions, _expected(ref, rows1).actions.numpy(), atol=1e-5)
    np.testing.assert_allclose(other.result(timeout=30).actions, _expected(ref, rows_other).actions.numpy(),
                               atol=1e-5)
    nxt = _team(spec, 6)  # the step was stored exactly once: the next one continues from it
    res = rt.submit(_req(rt, nxt, session_id="c-run")).result(timeout=30)
    np.testing.assert_allclose(res.actions, _expected(ref, nxt, _expected(ref, rows1).state).actions.numpy(),
                               atol=1e-5)
    _wait(lambda: not rt.sessions.in_flight, what="the last step's done-callback")
    assert rt.batcher.alive and rt.ready


# --- 2: Redis restarted empty ------------------------------------------------------------------------
@pytest.fixture
def redis_server(tmp_path):
    """A real redis-server per test: the runtimes of a test keep checking theirs after it ends."""
    with RedisServer(tmp_path / "redis") as server:
        yield server


def _redis_rt(root, url):
    return PolicyRuntime(ServiceConfig(policy=str(root), redis_url=url), root)


def test_a_fresh_process_waits_for_the_servers_of_a_restarted_redis(policy, redis_server):
    root, spec = policy
    redis_server.client().flushall()
    seed = open_backend(redis_server.url, "", spec.backbone_fingerprint, spec.hidden, SessionLimits())
    seed.reseed({}, lambda a: b"", set())  # seeded (as by a server that ran before): no grace at start
    old = _redis_rt(root, redis_server.url)
    assert old.ready
    for k in (1, 2):
        old.state.publish_adapter("agent_1", _adapter(spec, "agent_1", 10 + k))
    assert old.refresh() is None  # what an upload on this worker waits for
    assert old.applied["agent_1"] == 3
    served = _fingerprint(old)

    redis_server.restart()  # empty, while `old` is idle
    fresh = _redis_rt(root, redis_server.url)  # a respawned worker or a new replica: knows only v1
    assert fresh.ready or "waiting for a server that served it" in fresh.state_error  # (unless `old` was quicker)
    waited = _wait(lambda: fresh.ready, what="the fresh process to become ready")
    print(f"fresh process ready {waited:.1f} s after start")
    assert fresh.applied["agent_1"] == 3 and old.applied["agent_1"] == 3  # never v1, never backwards
    assert _fingerprint(fresh) == served
    after = open_backend(redis_server.url, "", spec.backbone_fingerprint, spec.hidden, SessionLimits())
    assert after.published().version("agent_1") == 3 and not after.published().lost
    res = fresh.submit(_req(fresh, _team(spec, 7))).result(timeout=30)
    assert res.versions.tolist() == [1, 3, 1]
    # an upload through the fresh process continues the numbering and reaches the old one
    assert fresh.state.publish_adapter("agent_1", _adapter(spec, "agent_1", 13)) == 4
    assert old.refresh() is None  # what an upload on this worker waits for
    assert old.applied["agent_1"] == 4


def _fingerprint(rt):
    return fingerprint({n: t.cpu() for n, t in rt.engine.adapter("agent_1").items()})


def test_a_first_deployment_seeds_an_empty_redis_after_the_grace(policy, redis_server):
    root, spec = policy
    redis_server.client().flushall()
    t0 = time.monotonic()
    rt = _redis_rt(root, redis_server.url)
    assert not rt.ready
    _wait(lambda: rt.ready, what="the first server to seed the empty Redis")
    assert time.monotonic() - t0 >= adapter_sync.SEED_GRACE_S
    assert rt.applied == {a: 1 for a in spec.agent_ids}
    assert rt.state.publish_adapter("agent_0", _adapter(spec, "agent_0", 20)) == 2  # seeded: uploads work


def test_a_stalled_redis_is_checked_off_the_request_path(policy, redis_server):
    """Redis is checked on a thread of its own: while it is stopped (SIGSTOP) stateless requests are
    answered with the versions last applied, session steps fail fast, a refresh after a publish says it
    could not finish; after SIGCONT everything resumes (tests/test_runtime_state_faults.py: the same
    against a real server, with the latency bound)."""
    root, spec = policy
    redis_server.client().flushall()
    seed = open_backend(redis_server.url, "", spec.backbone_fingerprint, spec.hidden, SessionLimits())
    seed.reseed({}, lambda a: b"", set())  # seeded (as by a server that ran before): no grace at start
    rt = PolicyRuntime(ServiceConfig(policy=str(root), redis_url=redis_server.url, timeout_s=2.0), root)
    assert rt.ready and not rt.sync.inline_ok  # never on the event loop: it may wait for the check thread
    assert rt.state.publish_adapter("agent_1", _adapter(spec, "agent_1", 60)) == 2
    assert rt.refresh() is None and rt.applied["agent_1"] == 2
    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    try:
        for k in range(5):
            res = rt.submit(_req(rt, _team(spec, 60 + k))).result(timeout=30)
            assert res.versions.tolist() == [1, 2, 1]
        with pytest.raises(StateUnavailable):
            rt.submit(_req(rt, _team(spec, 70), session_id="stalled")).result(timeout=30)
        assert "did not finish a check" in rt.refresh()  # what an upload answered meanwhile is told
        assert rt.ready  # it served before: stateless requests go on
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    _wait(lambda: rt.refresh() is None and rt.state_error is None, what="the check to succeed again")
    res = rt.submit(_req(rt, _team(spec, 71), session_id="stalled")).result(timeout=30)
    assert res.versions.tolist() == [1, 2, 1]


# --- 8, 9: load failures -----------------------------------------------------------------------------
def test_a_transient_failure_at_start_is_retried(policy, tmp_path):
    root, spec = policy
    state = open_backend("", str(tmp_path / "state"), spec.backbone_fingerprint, spec.hidden, SessionLimits())
    assert state.publish_adapter("agent_2", _adapter(spec, "agent_2", 30)) == 2
    (tmp_path / "state" / "adapters" / "agent_2.v2.safetensors").unlink()  # pruned meanwhile, say
    rt = PolicyRuntime(ServiceConfig(policy=str(root), state_dir=str(tmp_path / "state")), root)
    assert not rt.ready and "missing" in rt.state_error  # not ready (503), not failed for good
    assert rt.applied["agent_2"] == 1
    assert state.publish_adapter("agent_2", _adapter(spec, "agent_2", 31)) == 3
    _wait(lambda: rt.ready, what="the worker to retry its start")
    assert rt.applied["agent_2"] == 3 and rt.state_error is None


def test_an_unloadable_adapter_is_backed_off_and_reported(policy, tmp_path):
    root, spec = policy
    rt = PolicyRuntime(ServiceConfig(policy=str(root), state_dir=str(tmp_path / "state")), root)
    before = _failures("agent_0")
    assert rt.state.publish_adapter("agent_0", b"not a safetensors file") == 2  # bypassing validation
    for k in range(10):  # every batch checks the backend: one failed load, not ten
        res = rt.submit(_req(rt, _team(spec, 40 + k))).result(timeout=30)
        assert res.versions.tolist() == [1, 1, 1]
    assert _failures("agent_0") - before == 1
    info = {a["agent_id"]: a for a in rt.control(rt.agents_info).result(timeout=30)}
    assert info["agent_0"]["load_error"]["version"] == 2 and info["agent_1"]["load_error"] is None
    assert rt.ready  # a running worker keeps serving its previous version
    assert rt.state.publish_adapter("agent_0", _adapter(spec, "agent_0", 41)) == 3  # a newer one: at once
    res = rt.submit(_req(rt, _team(spec, 50))).result(timeout=30)
    assert res.versions.tolist() == [3, 1, 1]
    info = {a["agent_id"]: a for a in rt.control(rt.agents_info).result(timeout=30)}
    assert info["agent_0"]["load_error"] is None and _failures("agent_0") - before == 1
