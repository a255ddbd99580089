"""The state backends (services/state): the SAME tests run against the local state dir and a real
redis-server. Each test gets a fresh store; `make()` opens another handle on it (another worker)."""
from __future__ import annotations

import multiprocessing as mp
import shutil
import time

import numpy as np
import pytest
import torch

from lorasa_serve.sessions import SessionStore
from services.state import (SessionBusy, SessionLimits, SessionStep, StateConfigError, StateUnavailable,
                            open_backend)
from services.state.base import redact

H = 4  # hidden size of the stored states


def _open(kind: str, where: str, limits: SessionLimits = SessionLimits(), fp: str = "fp" * 8):
    return open_backend(where if kind == "redis" else "", "" if kind == "redis" else where, fp, H, limits)


@pytest.fixture(params=["local", "redis"])
def store(request, tmp_path):
    """-> make(limits=...) opening a handle on one fresh store; .kind, .where, .wipe() (lose all data)."""
    if request.param == "redis":
        srv = request.getfixturevalue("redis_server")
        srv.client().flushall()
        where, wipe = srv.url, lambda: srv.client().flushall()
    else:
        where = str(tmp_path / "state")
        wipe = lambda: shutil.rmtree(where)  # noqa: E731
    handles = []

    def make(limits: SessionLimits = SessionLimits()):
        handles.append(_open(request.param, where, limits))
        return handles[-1]
    make.kind, make.where, make.wipe = request.param, where, wipe
    yield make
    for h in handles:
        h.close()


def seeded(make, **kw):
    """A handle on a seeded store (what a server's first sync does on a fresh Redis)."""
    s = make(SessionLimits(**kw)) if kw else make()
    s.reseed({}, lambda a: b"", set())
    return s


def _publish_many(kind: str, where: str, n: int, q) -> None:
    s = _open(kind, where)
    q.put([s.publish_adapter("a", b"x" * 10) for _ in range(n)])


def test_versions_are_unique_and_monotonic_across_processes(store):
    reader = seeded(store)
    gen0 = reader.generation()
    assert reader.published().version("a") == 1
    ctx = mp.get_context("spawn")  # fresh handles in fresh processes (fork after JAX/torch threads can deadlock)
    q = ctx.Queue()
    procs = [ctx.Process(target=_publish_many, args=(store.kind, store.where, 10, q)) for _ in range(3)]
    [p.start() for p in procs]
    versions = sorted(v for _ in procs for v in q.get(timeout=120))
    [p.join() for p in procs]
    assert versions == list(range(2, 32))  # 30 publishes, no version given twice
    assert reader.generation() != gen0
    assert reader.published().version("a") == 31
    assert reader.adapter_blob("a", 31) == b"x" * 10


def test_every_publish_is_seen_even_when_quick(store):
    writer, reader = seeded(store), store()
    for k in range(30):  # back-to-back publishes of same-size blobs
        gen = reader.generation()
        assert writer.publish_adapter("a", bytes([k])) == k + 2
        assert reader.generation() != gen, k
        assert reader.published().version("a") == k + 2
        assert reader.adapter_blob("a", k + 2) == bytes([k])


def test_merged_flags_are_shared(store):
    a, b = seeded(store), store()
    gen = b.generation()
    assert a.publish_merged(["x", "y"], True) == ("x", "y")
    assert b.generation() != gen and b.published().merged == {"x", "y"}
    assert b.publish_merged(["x"], False) == ("y",)
    assert a.published().merged == {"y"}


def test_lost_store_is_reseeded_and_versions_never_go_back(store):
    s = seeded(store)
    for _ in range(3):
        s.publish_adapter("a", b"v")  # a at version 4
    s.publish_merged(["a"], True)
    store.wipe()
    s = store()
    if store.kind == "redis":  # Redis restarted empty: uploads are refused until servers re-seed it
        assert s.published().lost
        with pytest.raises(StateUnavailable, match="re-seeding"):
            s.publish_adapter("a", b"w")
    s.reseed({"a": 4, "b": 1}, lambda agent: b"served-" + agent.encode(), {"a"})
    pub = s.published()
    assert not pub.lost and pub.version("a") == 4 and pub.version("b") == 1
    assert s.adapter_blob("a", 4) == b"served-a"
    s.reseed({"a": 2}, lambda agent: b"old", set())  # a stale server never lowers a version
    assert s.published().version("a") == 4 and s.adapter_blob("a", 4) == b"served-a"
    assert s.publish_adapter("a", b"next") == 5


def test_sessions_are_shared_and_match_the_memory_store(store):
    a, b = seeded(store), store()
    mem = SessionStore(hidden=H)
    for sid in ["s1", "s2"]:
        (step,) = a.open_steps([(sid, ["x", "y"])])
        assert step.is_new.tolist() == [True, True] and not step.state.any()
        h = np.full((2, H), float(ord(sid[-1])), dtype=np.float32) + np.arange(2)[:, None]
        assert a.close_steps([(step, h)]) == [True]
        mem.put(sid, ["x", "y"], torch.from_numpy(h))
    (step,) = b.open_steps([("s2", ["y", "z"])])  # another worker continues s2; z joins it
    ref_state, ref_new = mem.get("s2", ["y", "z"])
    np.testing.assert_array_equal(step.state, ref_state.numpy())
    assert step.is_new.tolist() == ref_new.tolist() == [False, True]
    assert b.close_steps([(step, None)]) == [True]  # a failed step stores nothing...
    (step,) = a.open_steps([("s2", ["y"])])
    np.testing.assert_array_equal(step.state, ref_state.numpy()[:1])  # ...the state is unchanged
    a.close_steps([(step, None)])
    assert b.session_stats() == {"sessions": 2, "bytes": 2 * 2 * 4 * H}
    assert b.reset_session("s2") and not a.reset_session("s2")
    assert a.open_steps([("s2", ["y"])])[0].is_new.tolist() == [True]


def test_a_concurrent_step_of_one_session_is_refused(store):
    a, b = seeded(store, lease_s=0.5), store(SessionLimits(lease_s=0.5))
    (first,) = a.open_steps([("s", ["x"])])
    second, other = b.open_steps([("s", ["x"]), ("t", ["x"])])
    assert isinstance(second, SessionBusy) and isinstance(other, SessionStep)
    assert a.close_steps([(first, np.ones((1, H), np.float32))]) == [True]
    (third,) = b.open_steps([("s", ["x"])])  # the first step was answered: the next one may run
    assert third.state.tolist() == [[1.0] * H]
    # a step that outlives its lease loses it: its state is not stored over the newer step's
    time.sleep(0.7)
    (fourth,) = a.open_steps([("s", ["x"])])
    assert b.close_steps([(third, np.full((1, H), 3.0, np.float32))]) == [False]
    assert a.close_steps([(fourth, np.full((1, H), 4.0, np.float32))]) == [True]
    (step,) = b.open_steps([("s", ["x"])])
    assert step.state.tolist() == [[4.0] * H]
    b.close_steps([(step, None)])
    # a reset during a step: the step's state is not stored
    (step,) = a.open_steps([("s", ["x"])])
    assert b.reset_session("s")
    assert a.close_steps([(step, np.ones((1, H), np.float32))]) == [False]
    assert b.open_steps([("s", ["x"])])[0].is_new.tolist() == [True]


def test_sessions_expire_after_the_ttl(store):
    s = seeded(store, ttl_s=0.4)
    (step,) = s.open_steps([("old", ["x"])])
    s.close_steps([(step, np.ones((1, H), np.float32))])
    time.sleep(0.6)
    (step,) = s.open_steps([("new", ["x"])])
    s.close_steps([(step, np.ones((1, H), np.float32))])  # a write sweeps expired sessions
    assert s.open_steps([("old", ["x"])])[0].is_new.tolist() == [True]
    assert s.session_stats()["sessions"] <= 2


@pytest.mark.parametrize("bound", ["bytes", "count"])
def test_session_bounds_evict_the_least_recently_used(store, bound):
    row = 4 * H
    limits = dict(max_bytes=3 * 2 * row) if bound == "bytes" else dict(max_sessions=3)
    s = seeded(store, **limits)
    for sid in ["s1", "s2", "s3", "s4"]:
        (step,) = s.open_steps([(sid, ["x", "y"])])
        assert s.close_steps([(step, np.ones((2, H), np.float32))]) == [True]
        time.sleep(0.01)  # distinct last-use times
    stats = s.session_stats()
    assert stats == {"sessions": 3, "bytes": 3 * 2 * row}
    new = [s.open_steps([(sid, ["x"])])[0] for sid in ["s1", "s2", "s3", "s4"]]
    assert [st.is_new.tolist() for st in new] == [[True], [False], [False], [False]]


def test_local_state_dir_belongs_to_one_backbone(tmp_path):
    s = _open("local", str(tmp_path))
    s.publish_adapter("a", b"x")
    with pytest.raises(StateConfigError, match="another LORASA_STATE_DIR"):
        _open("local", str(tmp_path), fp="other" * 4)


def test_redis_url_password_is_never_shown_and_errors_are_typed():
    url = "redis://:hunter2@127.0.0.1:1/0"
    assert redact(url) == "redis://***@127.0.0.1:1/0" and "hunter2" not in redact("rediss://u:hunter2@h:6380/1")
    s = _open("redis", url)  # nothing listens on port 1
    assert "hunter2" not in s.description
    t0 = time.monotonic()
    with pytest.raises(StateUnavailable) as e:
        s.generation()
    assert "hunter2" not in str(e.value) and time.monotonic() - t0 < 3
    with pytest.raises(StateUnavailable):
        s.open_steps([("s", ["x"])])
    _open("redis", "rediss://:pw@127.0.0.1:1/0")  # TLS URLs are accepted
    with pytest.raises(StateConfigError, match="redis://"):
        _open("redis", "http://127.0.0.1:1")
    from services.config import ServiceConfig
    cfg = ServiceConfig.from_env({"LORASA_REDIS_URL": url, "LORASA_ADMIN_TOKEN": "tok"})
    assert "hunter2" not in repr(cfg) and "'tok'" not in repr(cfg)


def test_memory_store_holds_copies_and_is_bounded_in_bytes():
    """Next to 1,024-row requests, each stored session holds only its own rows: bytes held by the
    store (storage actually referenced), not RSS."""
    hidden, n = 64, 200
    store = SessionStore(hidden, max_sessions=10_000, max_bytes=100 * 2 * hidden * 4)
    for k in range(n):
        batch = torch.randn(1024, hidden)  # [1024, H]: a big request's output
        store.put(f"s{k}", ["a", "b"], batch[2 * (k % 512):2 * (k % 512) + 2])
    held = sum(t.untyped_storage().nbytes() for s in store._sessions.values() for t in s.values())
    assert held == store.nbytes == 100 * 2 * hidden * 4  # a view would hold 1024 * H * 4 per row
    assert len(store) == 100 and store.evictions == n - 100
    ttl = SessionStore(hidden, ttl_s=0.2)
    ttl.put("s", ["a"], torch.ones(1, hidden))
    time.sleep(0.3)
    assert "s" not in ttl and ttl.get("s", ["a"])[1].tolist() == [True] and ttl.nbytes == 0

