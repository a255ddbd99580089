"""The one bounded map (`caches.LRU`), the limits dataclass every Engine cache takes, and caches that
belong to their Engine (configured through `CacheLimits`, never through module globals)."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import fields

import numpy as np
import pytest
import torch
from conftest import make_policy

from lorasa_serve import Engine
from lorasa_serve.caches import LRU, CacheLimits


def test_lru_bounds_entries_and_bytes_keeping_the_newest():
    lru = LRU(max_entries=3, max_bytes=100)
    for k in "abc":
        assert lru.put(k, k.upper(), 10) == []
    assert lru.get("a") == "A"  # now the most recently used: b goes first
    assert lru.put("d", "D", 10) == [("b", "B")]
    assert lru.keys() == ["c", "a", "d"] and lru.nbytes == 30
    assert lru.put("e", "E", 85) == [("c", "C"), ("a", "A")]  # 115, then 105 bytes > 100: by bytes
    assert lru.keys() == ["d", "e"] and lru.nbytes == 95
    assert lru.put("f", "F", 500) == [("d", "D"), ("e", "E")]  # the newest stays, whatever its size
    assert lru.keys() == ["f"] and lru.nbytes == 500
    assert lru.pop("f") == "F" and lru.nbytes == 0 and len(lru) == 0


def test_lru_keep_and_oldest_first_insertion():
    lru = LRU(max_bytes=20)
    lru.add(1, None, 10)
    lru.add(2, None, 10)
    lru.put_oldest(3, None, 10)  # over the bound, but add/put_oldest never evict
    assert lru.keys() == [3, 1, 2] and lru.nbytes == 30
    assert lru.evict(keep={3}) == [(1, None)]
    lru.touch(3)
    assert lru.keys() == [2, 3] and lru.oldest() == 2


def test_cache_limits_validate_and_document_every_field():
    assert set(CacheLimits.help()) == {f.name for f in fields(CacheLimits)}
    assert all(len(h) > 20 for h in CacheLimits.help().values())
    for bad in [dict(plans=0), dict(params_bytes=-1), dict(sessions=1.5), dict(traced_graphs=-1),
                dict(session_ttl_s=0), dict(seen_layouts=True)]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            CacheLimits(**bad)
    CacheLimits(traced_graphs=0, session_ttl_s=2.5)  # 0 turns tracing off


def test_engine_caches_follow_its_limits(tmp_path):
    spec, _, _ = make_policy(tmp_path / "p")
    limits = CacheLimits(plans=1, params=1, traced_graphs=0, sessions=2)
    eng = Engine.from_dir(tmp_path / "p", device="cpu", mode="lora", limits=limits)  # one bank throughout
    other = Engine.from_dir(tmp_path / "p", device="cpu", mode="lora")
    g = torch.Generator().manual_seed(0)
    for B in (5, 9, 70, 5):
        ids = [spec.agent_ids[i] for i in torch.randint(3, (B,), generator=g).tolist()]
        for _ in range(3):
            eng.forward(ids, torch.zeros(B, spec.obs_max), torch.zeros(B, spec.hidden))
    cache = eng._bank.cache
    assert len(eng._planner._plans) == 1 and len(cache.params) == 1
    assert len(cache.traced._entries) == 0  # tracing off
    assert len(other._planner._plans) == 0  # another engine's caches are its own
    for s in ("s1", "s2", "s3"):
        eng.act_session(s, spec.agent_ids[:1], np.zeros((1, spec.obs_max), np.float32))
    assert eng.sessions.session_ids() == ["s2", "s3"]


def test_reading_the_umask_changes_nothing_and_is_right():
    code = ("import os; os.umask(0o027); from lorasa_serve import artifacts; "
            "print(artifacts.umask(), oct(os.umask(0o022)), artifacts.default_mode(), artifacts.default_mode(True))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == [str(0o027), "0o27", str(0o640), str(0o750)]
