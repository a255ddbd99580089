"""Redis-only edges of the state backend, against a real redis-server: a version counter lost to
eviction never hands out a used version, and the session bounds never evict a session whose step is
in flight nor the session just stored."""
from __future__ import annotations

import numpy as np
import pytest

from services.state import SessionLimits, SessionStep, open_backend

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
