"""Redis-only edges of the state backend, against a real redis-server: a version counter lost to
eviction never hands out a used version; the session bounds never evict a session whose step is in
flight nor the session just stored; a publish or merge whose answer is lost while Redis is stalled
(SIGSTOP) says it may have been applied (it is, when Redis resumes), one refused before it was sent
never goes live; sessions lost with a restart report `session_state` "new"."""
from __future__ import annotations

import signal
import time
from contextlib import contextmanager

import numpy as np
import pytest

from services.state import SessionLimits, SessionStep, StateUnavailable, open_backend
from services.state.base import StateOutcomeUnknown

H = 4


@pytest.fixture
def make(redis_server):
    redis_server.client().flushall()
    return lambda limits=SessionLimits(): open_backend(redis_server.url, "", "fp" * 8, H, limits)


def _prefix(redis_server):
    return "lorasa:" + ("fp" * 8)[:16] + ":"


def _step(store, sid, value=None):
    """One step of session `sid` on agent "a": open, then store `value` (None: release only)."""
    (step,) = store.open_steps([(sid, ["a"])])
    assert isinstance(step, SessionStep)
    state = None if value is None else np.full((1, H), value, dtype=np.float32)
    assert store.close_steps([(step, state)]) == [True]
    return step


def _stored(store, sid):
    """The stored state of `sid` (None: new) without disturbing it."""
    (step,) = store.open_steps([(sid, ["a"])])
    assert store.close_steps([(step, None)]) == [True]
    return None if step.is_new.all() else float(step.state[0, 0])


def test_an_evicted_version_counter_never_reuses_a_version(make, redis_server):
    store = make()
    store.reseed({}, lambda a: b"", set())  # seeded, as by a server
    assert [store.publish_adapter("x", f"v{k}".encode()) for k in (2, 3, 4)] == [2, 3, 4]
    redis_server.client().delete(_prefix(redis_server) + "ver:x")  # as an allkeys-* maxmemory policy may
    assert store.publish_adapter("x", b"v5") == 5
    assert store.published().version("x") == 5
    assert store.adapter_blob("x", 4) == b"v4" and store.adapter_blob("x", 5) == b"v5"


def test_session_eviction_skips_a_session_whose_step_is_in_flight(make, redis_server):
    store = make(SessionLimits(max_sessions=2))
    _step(store, "s1", 1.0)
    _step(store, "s2", 2.0)
    (busy,) = store.open_steps([("s1", ["a"])])  # s1, the least recently used, has a step in flight
    _step(store, "s3", 3.0)  # over the bound: s2 goes, not s1
    assert redis_server.client().exists(_prefix(redis_server) + "s:s1")
    assert store.close_steps([(busy, np.full((1, H), 1.5, dtype=np.float32))]) == [True]
    assert _stored(store, "s1") == 1.5 and _stored(store, "s3") == 3.0 and _stored(store, "s2") is None
    assert store.session_stats()["sessions"] == 2


def test_session_eviction_never_drops_the_session_just_stored(make):
    store = make(SessionLimits(max_sessions=1))
    _step(store, "t1", 1.0)
    (busy,) = store.open_steps([("t1", ["a"])])
    _step(store, "t2", 2.0)  # t1 in flight, t2 just stored: both kept (over the bound for a moment)
    assert store.session_stats()["sessions"] == 2
    assert store.close_steps([(busy, np.full((1, H), 1.5, dtype=np.float32))]) == [True]  # now t2 goes
    assert store.session_stats()["sessions"] == 1
    assert _stored(store, "t1") == 1.5 and _stored(store, "t2") is None


@contextmanager
def stalled(redis_server):
    """redis-server stopped (SIGSTOP: connections stay open, nothing is answered), then resumed."""
    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)


def _published_soon(store, agent, version, within_s=5.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if store.published().version(agent) == version:
            return True
        time.sleep(0.05)
    return False


def test_a_publish_refused_before_it_was_sent_never_goes_live(make, redis_server):
    store = make()
    store.reseed({}, lambda a: b"", set())
    with stalled(redis_server):
        with pytest.raises(StateUnavailable) as e:
            store.publish_adapter("x", b"v2")
        assert not isinstance(e.value, StateOutcomeUnknown)  # the answer is "retry-safe"
    assert not _published_soon(store, "x", 2, within_s=1.5)  # and it was: nothing went live
    assert store.published().version("x") == 1
    v = store.publish_adapter("x", b"again")
    assert store.published().version("x") == v and store.adapter_blob("x", v) == b"again"


def test_a_publish_whose_answer_is_lost_says_it_may_have_gone_live(make, redis_server):
    """Redis stalls after the blob is stored, while the publishing script is sent: the script times
    out here and runs when Redis resumes, so the version goes live after the error. The error says it may."""
    store = make()
    store.reseed({}, lambda a: b"", set())
    store_blob = store._store_blob

    def store_then_stall(*args):  # the real store, then Redis stops before the next command
        store_blob(*args)
        redis_server.proc.send_signal(signal.SIGSTOP)
    store._store_blob = store_then_stall
    try:
        with pytest.raises(StateOutcomeUnknown, match="may or may not have been published"):
            store.publish_adapter("x", b"v2")
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    assert _published_soon(store, "x", 2)  # it did go live: a "retry-safe" answer would have lied
    assert store.adapter_blob("x", 2) == b"v2"


def test_a_merge_whose_answer_is_lost_says_it_may_have_been_applied(make, redis_server):
    store = make()
    store.reseed({}, lambda a: b"", set())
    published = store.published

    def read_then_stall():
        out = published()
        redis_server.proc.send_signal(signal.SIGSTOP)
        return out
    store.published = read_then_stall
    try:
        with pytest.raises(StateOutcomeUnknown, match="may or may not have been applied"):
            store.publish_merged(["x"], True)
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
        del store.published
    deadline = time.monotonic() + 5
    while "x" not in store.published().merged and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "x" in store.published().merged


def test_sessions_lost_with_a_restart_are_reported_new(make, redis_server):
    store = make()
    _step(store, "s1", 1.0)
    assert _step(store, "s1", 2.0).session_state == "resumed"
    redis_server.restart()  # back empty (no persistence)
    store = make()
    store.reseed({}, lambda a: b"", set())  # as the servers do
    step = _step(store, "s1", 3.0)
    assert step.session_state == "new" and not step.state.any()
    assert _step(store, "s1", 4.0).session_state == "resumed"
