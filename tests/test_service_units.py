"""Service building blocks in-process (fast): overlay publishing across handles and processes,
the shared SQLite session store, configuration parsing, the admin token check."""
from __future__ import annotations

import multiprocessing as mp

import pytest
import torch
from starlette.requests import Request

from lorasa_serve.sessions import SessionStore
from services.config import ServiceConfig
from services.http import _authorize
from services.overlay import Overlay, OverlayError
from services.schema import BadRequest
from services.shared_sessions import SharedSessionStore


def _publish_many(root: str, agent: str, n: int, q) -> None:
    ov = Overlay(root, "fp")
    q.put([ov.publish_adapter(agent, b"x" * 10) for _ in range(n)])


def test_overlay_versions_are_unique_across_processes(tmp_path):
    reader = Overlay(tmp_path, "fp")
    assert not reader.changed() and reader.read().version("a") == 1
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_publish_many, args=(str(tmp_path), "a", 15, q)) for _ in range(3)]
    [p.start() for p in procs]
    versions = sorted(v for _ in procs for v in q.get(timeout=60))
    [p.join() for p in procs]
    assert versions == list(range(2, 47))  # 45 publishes, no version given twice
    assert reader.changed()
    m = reader.read()
    assert m.version("a") == 46 and not reader.changed()
    assert reader.adapter_path(m, "a").read_bytes() == b"x" * 10
    # old files are pruned, the current one is kept
    assert len(list((tmp_path / "adapters").glob("a.v*.safetensors"))) <= 4
    assert Overlay(tmp_path, "fp").publish_merged(["a", "b"], True) == ("a", "b")
    assert reader.changed() and reader.read().merged == ("a", "b")
    with pytest.raises(OverlayError, match="another LORASA_STATE_DIR"):
        Overlay(tmp_path, "other-fingerprint")


def test_every_publish_is_seen_even_when_quick(tmp_path):
    writer, reader = Overlay(tmp_path, "fp"), Overlay(tmp_path, "fp")
    for k in range(50):  # back-to-back publishes of same-size manifests
        writer.publish_adapter("a", b"y")
        assert reader.changed(), k
        assert reader.read().version("a") == k + 2


def test_shared_sessions_match_memory_store_and_evict_lru(tmp_path):
    a = SharedSessionStore(tmp_path / "s.sqlite", hidden=4, max_sessions=3)
    b = SharedSessionStore(tmp_path / "s.sqlite", hidden=4, max_sessions=3)  # another "worker"
    mem = SessionStore(hidden=4, max_sessions=3)
    for sid in ["s1", "s2", "s3"]:
        for store in (a, mem):
            store.put(sid, ["x", "y"], torch.full((2, 4), float(len(sid) + ord(sid[-1]))))
    state, new = b.get("s2", ["y", "z"])
    ref_state, ref_new = mem.get("s2", ["y", "z"])
    torch.testing.assert_close(state, ref_state)
    assert new.tolist() == ref_new.tolist() == [False, True]
    b.put("s4", ["x"], torch.ones(1, 4))  # evicts the least recently touched session (s1)
    assert len(a) == 3 and b.evictions == 1
    assert a.get("s1", ["x"])[1].tolist() == [True]
    assert b.reset("s2") and not a.reset("s2")


def test_config_from_env_validates():
    cfg = ServiceConfig.from_env({"LORASA_WORKERS": "2", "LORASA_POLICY": "p", "LORASA_TIMEOUT_S": "5"})
    assert cfg.workers == 2 and cfg.policy == "p" and cfg.timeout_s == 5.0 and cfg.shared_sessions
    assert ServiceConfig.from_env({}).policy == "policies/halfcheetah_2x3"
    with pytest.raises(ValueError, match="LORASA_WORKERS"):
        ServiceConfig.from_env({"LORASA_WORKERS": "two"})
    with pytest.raises(ValueError, match="LORASA_MAX_BATCH_ROWS"):
        ServiceConfig.from_env({"LORASA_MAX_BATCH_ROWS": "2", "LORASA_MAX_ROWS_PER_REQUEST": "8"})


def _request(auth: str | None) -> Request:
    headers = [] if auth is None else [(b"authorization", auth.encode())]
    return Request({"type": "http", "method": "PUT", "path": "/", "headers": headers})


@pytest.mark.parametrize("token,auth,status", [
    ("", "Bearer anything", 403), ("s3cret", None, 401), ("s3cret", "Basic s3cret", 401),
    ("s3cret", "Bearer s3cre", 403), ("s3cret", "Bearer s3cret!", 403),
    # compared exactly: no trimming of any kind of whitespace
    ("s3cret", "Bearer s3cret\x1f", 403), ("s3cret", "Bearer s3cret\xa0", 403), ("s3cret", "Bearer s3cret\t", 403),
    ("s3cret", "Bearer  s3cret", 403), ("s3cret", "Bearer s3cret ", 403), ("s3cret", "Bearer\ts3cret", 401)])
def test_admin_token_check(token, auth, status):
    with pytest.raises(BadRequest) as e:
        _authorize(_request(auth), token)
    assert e.value.status == status


@pytest.mark.parametrize("token", [" s3cret", "s3cret\n", "s3 cret", "s3cret\x1f", "s3cr\xe9t"])
def test_admin_token_with_whitespace_is_refused_at_config_load(token):
    with pytest.raises(ValueError, match="LORASA_ADMIN_TOKEN must be printable ASCII without spaces"):
        ServiceConfig.from_env({"LORASA_ADMIN_TOKEN": token})


def test_access_log_setting():
    assert ServiceConfig.from_env({}).access_log == 0
    assert ServiceConfig.from_env({"LORASA_ACCESS_LOG": "1"}).access_log == 1
    with pytest.raises(ValueError, match="LORASA_ACCESS_LOG"):
        ServiceConfig.from_env({"LORASA_ACCESS_LOG": "2"})


def test_admin_token_accepts_the_right_token():
    _authorize(_request("Bearer s3cret"), "s3cret")
    _authorize(_request("bearer s3cret"), "s3cret")
