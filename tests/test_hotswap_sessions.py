"""Hot swap under concurrent readers, adding agents at run time, recurrent sessions and eviction."""
from __future__ import annotations

import threading

import pytest
import torch
from reference import forward_loop, zero_padding

from lorasa_serve import (AgentSpec, Engine, FingerprintMismatchError, InputError, NonFiniteError,
                          UnknownAgentError, init_adapter)
from lorasa_serve.artifacts import adapter_bytes
from lorasa_serve.caches import CacheLimits
from lorasa_serve.sessions import SessionStore


def test_hot_swap_is_atomic_under_concurrent_act(tiny_policy):
    """Readers in 4 threads must always see exactly version k's outputs for some k, never a mix."""
    d, spec, backbone, ads = tiny_policy
    eng = Engine.from_dir(d, device="cpu", mode="lora")
    g = torch.Generator().manual_seed(3)
    versions = [ads["agent_1"]] + [init_adapter(spec, g, b_std=0.3) for _ in range(6)]
    ids = ["agent_0", "agent_1", "agent_2"] * 8
    obs = torch.randn(len(ids), spec.obs_max, generator=g)
    expected = []  # per version: the reference head for the whole batch
    for v in versions:
        expected.append(forward_loop(spec, backbone, {**ads, "agent_1": v}, ids, obs)[0].float())
    stop, seen, errors = threading.Event(), set(), []

    def reader():
        while not stop.is_set():
            head, _ = eng.forward(ids, obs)
            match = [k for k, e in enumerate(expected) if torch.allclose(head, e, atol=1e-5, rtol=0)]
            if len(match) != 1:
                errors.append(head)
                return
            seen.add(match[0])

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for k, v in enumerate(versions[1:], start=2):
        for _ in range(30):  # let readers run on each version
            head, _ = eng.forward(ids, obs)
        assert eng.set_adapter("agent_1", v) == k
    stop.set()
    for t in threads:
        t.join()
    assert not errors, "a reader saw a mix of adapter versions"
    assert len(seen) >= 2
    assert eng.versions() == {"agent_0": 1, "agent_1": 7, "agent_2": 1}


def test_hot_swap_validates_before_publishing(tiny_policy, tmp_path):
    d, spec, _, ads = tiny_policy
    eng = Engine.from_dir(d, device="cpu")
    obs = torch.randn(3, spec.obs_max)
    before = eng.forward(spec.agent_ids, obs)[0]
    bad = {k: v.clone() for k, v in ads["agent_0"].items()}
    bad["head.lora_B.weight"][0, 0] = float("nan")
    with pytest.raises(NonFiniteError):
        eng.set_adapter("agent_0", bad)
    from conftest import make_policy
    other_spec, _, other_ads = make_policy(tmp_path / "o", seed=9)
    with pytest.raises(FingerprintMismatchError):
        eng.load_adapter(adapter_bytes(other_spec, "agent_0", other_ads["agent_0"]))
    assert eng.versions()["agent_0"] == 1
    assert torch.equal(eng.forward(spec.agent_ids, obs)[0], before)
    # a valid upload from bytes swaps only that agent
    new = init_adapter(spec, torch.Generator().manual_seed(4), b_std=0.3)
    assert eng.load_adapter(adapter_bytes(spec, "agent_0", new)) == 2
    after = eng.forward(spec.agent_ids, obs)[0]
    assert not torch.allclose(after[0], before[0])
    assert torch.equal(after[1:], before[1:])


def test_merged_agent_stays_merged_after_swap(tiny_policy):
    d, spec, backbone, ads = tiny_policy
    eng = Engine.from_dir(d, device="cpu", mode="merged")
    eng.merge()
    new = init_adapter(spec, torch.Generator().manual_seed(4), b_std=0.3)
    eng.set_adapter("agent_2", new)
    ids = ["agent_2"] * 5 + ["agent_0"] * 5
    obs = torch.randn(10, spec.obs_max)
    ref = forward_loop(spec, backbone, {**ads, "agent_2": new}, ids, obs)[0]
    torch.testing.assert_close(eng.forward(ids, obs)[0].double(), ref, atol=1e-5, rtol=0)
    assert "agent_2" in eng.merged_agents


def test_add_agent_at_run_time(tiny_policy):
    d, spec, backbone, ads = tiny_policy
    eng = Engine.from_dir(d, device="cpu")
    new = init_adapter(spec, torch.Generator().manual_seed(8), b_std=0.3)
    with pytest.raises(UnknownAgentError):
        eng.set_adapter("newbie", new)
    with pytest.raises(InputError, match="does not fit"):
        eng.set_adapter("giant", new, AgentSpec("giant", spec.obs_max + 1, 1))
    assert eng.set_adapter("newbie", new, AgentSpec("newbie", 4, 1)) == 1
    assert eng.agent_ids[-1] == "newbie"
    ids = ["newbie", "agent_0", "newbie", "agent_1"] * 4
    obs = zero_padding(eng.spec, ids, torch.randn(16, spec.obs_max))
    head, _ = eng.forward(ids, obs)
    ref = forward_loop(eng.spec, backbone, {**ads, "newbie": new}, ids, obs)[0]
    torch.testing.assert_close(head.double(), ref, atol=1e-5, rtol=0)
    out = eng.act(ids, obs)
    assert (out.actions[0::2, 1:] == 0).all()  # act_dim 1


def test_sessions_carry_state_and_reset(tiny_policy):
    d, spec, backbone, ads = tiny_policy
    eng = Engine.from_dir(d, device="cpu")
    ids = ["agent_0", "agent_2"]
    o1, o2 = torch.randn(2, spec.obs_max), torch.randn(2, spec.obs_max)
    s1 = eng.act_session("ep1", ids, o1)
    s2 = eng.act_session("ep1", ids, o2)
    a1 = eng.act(ids, o1)
    a2 = eng.act(ids, o2, a1.state)
    torch.testing.assert_close(s1.actions, a1.actions)
    torch.testing.assert_close(s2.actions, a2.actions)
    assert s2.versions == [1, 1]
    # another session is independent, and an agent joining later starts from zeros
    s_other = eng.act_session("ep2", ["agent_2"], o2[1:])
    torch.testing.assert_close(s_other.actions, eng.act(["agent_2"], o2[1:]).actions)
    assert eng.reset_session("ep1") and not eng.reset_session("ep1")
    torch.testing.assert_close(eng.act_session("ep1", ids, o2).actions, eng.act(ids, o2).actions)
    with pytest.raises(InputError):
        eng.act_session("ep1", ["agent_0", "agent_0"], torch.randn(2, spec.obs_max))
    with pytest.raises(UnknownAgentError):
        eng.act_session("ep3", ["nobody"], torch.randn(1, spec.obs_max))
    assert "ep3" not in eng.sessions


def test_engine_builds_its_session_store_on_first_session_call(tiny_policy):
    """Only `act_session` needs the store (the HTTP service keeps sessions in its state backend);
    `CacheLimits.sessions` bounds it once it exists."""
    d, spec, _, _ = tiny_policy
    eng = Engine.from_dir(d, device="cpu", limits=CacheLimits(sessions=2))
    obs = torch.randn(1, spec.obs_max)
    eng.act(["agent_0"], obs)
    assert eng._sessions is None
    for s in ("a", "b", "c"):
        eng.act_session(s, ["agent_0"], obs)
    assert eng.sessions.session_ids() == ["b", "c"]
    with pytest.raises(ValueError, match="sessions"):
        CacheLimits(sessions=0)


def test_session_eviction_is_lru():
    store = SessionStore(hidden=4, max_sessions=3)
    for s in ["a", "b", "c"]:
        store.put(s, ["x"], torch.full((1, 4), float(ord(s))))
    store.get("a", ["x"])  # touch a: b is now least recently used
    store.put("d", ["x"], torch.zeros(1, 4))
    assert store.session_ids() == ["c", "a", "d"] and store.evictions == 1
    state, new = store.get("b", ["x"])
    assert new.tolist() == [True] and (state == 0).all()
    state, new = store.get("a", ["x", "y"])
    assert new.tolist() == [False, True] and state[0, 0] == ord("a")


def test_session_store_thread_safe():
    store = SessionStore(hidden=2, max_sessions=50)

    def worker(k):
        for i in range(300):
            store.put(f"s{k}-{i % 80}", ["a", "b"], torch.ones(2, 2) * i)
            store.get(f"s{(k + 1) % 4}-{i % 80}", ["a"])
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store) == 50
