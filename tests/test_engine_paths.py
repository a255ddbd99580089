"""Every dispatch path of the Engine forced on, against the float64 per-row reference.

Paths: mixed chunks (several agents per chunk, masked low-rank blocks), one-agent chunks, traced
small batches (and their eager fallback), the LRU bound on agents `auto` merges on demand. On every
device in conftest.DEVICES (inputs on the engine's device, outputs compared on the CPU).
No test depends on timing.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_policy, on_device
from reference import forward_loop, zero_padding

import lorasa_serve.engine as engine_mod
import lorasa_serve.traced as traced_mod
from lorasa_serve import Engine
from lorasa_serve.caches import CacheLimits
from lorasa_serve.layout import Planner, mixed_candidates, plan, plan_single


def batch(spec, B, seed=1, counts=None):
    """A random mixed batch; `counts` (per agent) gives a skewed agent mix."""
    g = torch.Generator().manual_seed(seed)
    ids = spec.agent_ids
    if counts is None:
        idx = torch.randint(len(ids), (B,), generator=g).tolist()
    else:
        idx = [i for i, c in enumerate(counts) for _ in range(c)]
        idx = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
    B = len(idx)
    obs = zero_padding(spec, [ids[i] for i in idx], torch.randn(B, spec.obs_max, generator=g))
    h = torch.randn(B, spec.hidden, generator=g) * 0.5
    reset = torch.rand(B, generator=g) < 0.3
    return [ids[i] for i in idx], obs, h, reset


def check(eng, spec, backbone, ads, ids, obs, h, reset, mode=None):
    """The engine (inputs on its device) against the float64 per-row reference on the CPU."""
    rec = spec.recurrent
    head, h_next = eng.forward(ids, *on_device(eng.device, obs, h if rec else None, reset if rec else None),
                               mode=mode)
    ref_head, ref_h = forward_loop(spec, backbone, ads, ids, obs, h if rec else None,
                                   reset if rec else None)
    torch.testing.assert_close(head.cpu().double(), ref_head, atol=1e-5, rtol=0)
    if rec:
        torch.testing.assert_close(h_next.cpu().double(), ref_h, atol=1e-5, rtol=0)
    else:
        assert h_next is None


@pytest.fixture
def force_plan(monkeypatch):
    """force_plan(M): lora-mode forwards use the mixed plan with M rows per chunk."""
    def force(M: int):
        def fake(self, slots, mixed=False):
            if not mixed:
                return plan_single(slots)
            cands = {lay.M: lay for lay in mixed_candidates(slots)}
            return cands.get(M) or plan_single(slots)
        monkeypatch.setattr(Planner, "plan", fake)
    return force


# --- layouts ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("B,S", [(2, 2), (7, 3), (64, 4), (333, 100), (4096, 1000), (1000, 1000)])
def test_mixed_plans_cover_every_row(B, S):
    rng = np.random.default_rng(B)
    slots = rng.integers(0, S, B).astype(np.int64)
    for lay in mixed_candidates(slots) + [plan(slots, mixed=True)]:
        pos = np.arange(B) if lay.pos is None else lay.pos
        assert len(np.unique(pos)) == B and pos.max() < lay.C * lay.M
        if lay.row_block is None:  # one agent per chunk
            assert (lay.chunk_slots[pos // lay.M, 0] == slots).all()
            continue
        block = lay.row_block.reshape(-1)
        assert (block[pos] >= 0).all()  # live rows have an adapter block
        dead = np.setdiff1d(np.arange(lay.C * lay.M), pos)
        assert (block[dead] == -1).all()
        assert (lay.chunk_slots[pos // lay.M, block[pos]] == slots).all()  # its own agent's block
        assert lay.C * lay.M - B < lay.M  # only the tail is padded


@pytest.mark.parametrize("mixed", [False, True])
def test_gather_index_inverts_positions(mixed):
    """`src` (padded position -> caller row) is the gather that `pos` (caller row -> padded
    position) describes; dead positions read a valid row."""
    rng = np.random.default_rng(3)
    slots = rng.integers(0, 7, 101).astype(np.int64)
    lay = plan(slots, mixed=mixed)
    assert lay.pos is not None and lay.src.shape == (lay.C * lay.M,)
    assert (lay.src[lay.pos] == np.arange(len(slots))).all()
    assert lay.src.min() >= 0 and lay.src.max() < len(slots)


@pytest.mark.parametrize("block_rows", [16, 64])
@pytest.mark.parametrize("mode", ["lora", "merged"])
def test_block_by_block_gather_matches_reference(tmp_path, monkeypatch, mode, block_rows, device):
    """Batches bigger than BLOCK_ROWS gather each block's rows on their own (shrunk here: a 74-row
    batch in 16-row chunks, padded, runs as 6 one-chunk blocks or as blocks of 4 and 2 chunks)."""
    spec, backbone, ads = make_policy(tmp_path / "p")
    monkeypatch.setattr(engine_mod, "BLOCK_ROWS", block_rows)
    eng = Engine.from_dir(tmp_path / "p", device=device, mode=mode)
    ids, obs, h, reset = batch(spec, 0, counts=[40, 3, 31])
    lay = plan(eng.agent_index(ids), mixed=mode == "lora")
    assert lay.pos is not None and lay.C * lay.M > 64 and lay.C > block_rows // lay.M
    check(eng, spec, backbone, ads, ids, obs, h, reset)


@pytest.mark.parametrize("mode", ["lora", "merged"])
def test_block_by_block_rows_in_place(tmp_path, monkeypatch, mode, device):
    """Rows already grouped in runs of M (no gather): each block is a slice at its own offset."""
    spec, backbone, ads = make_policy(tmp_path / "p")
    monkeypatch.setattr(engine_mod, "BLOCK_ROWS", 32)
    eng = Engine.from_dir(tmp_path / "p", device=device, mode=mode)
    ids, obs, h, reset = batch(spec, 0, counts=[32, 32, 32])
    ids = sorted(ids)
    lay = plan(eng.agent_index(ids), mixed=mode == "lora")
    assert lay.pos is None and lay.C == 3 and lay.M == 32  # three blocks of one chunk each
    check(eng, spec, backbone, ads, ids, obs, h, reset)


@pytest.mark.parametrize("M", [2, 4, 8])
def test_mixed_chunks_sorted_rows_with_dead_tail(tmp_path, force_plan, M, device):
    """Rows already grouped by agent (no reordering) but not a multiple of M: dead tail rows."""
    spec, backbone, ads = make_policy(tmp_path / "p")
    force_plan(M)
    eng = Engine.from_dir(tmp_path / "p", device=device, mode="lora")
    ids, obs, h, reset = batch(spec, 0, counts=[3, 1, 3])
    ids = sorted(ids)
    check(eng, spec, backbone, ads, ids, obs, h, reset)


def test_mixed_plan_chosen_for_many_small_agents():
    rng = np.random.default_rng(0)
    slots = np.concatenate([np.arange(100), rng.integers(0, 100, 1500)])
    rng.shuffle(slots)
    planner = Planner(CacheLimits().plans)
    lay = planner.plan(slots, mixed=True)
    assert lay.P > 1 and lay.C * lay.M < 1.1 * len(slots)  # no per-agent padding
    assert planner.plan(slots, mixed=True) is lay
    assert planner.plan(slots).P == 1  # merged weights still get one agent per chunk


# --- mixed chunks against the reference ---------------------------------------------------------------
@pytest.mark.parametrize("M", [2, 4, 8, 32])
@pytest.mark.parametrize("recurrent", [True, False])
def test_mixed_chunks_match_reference(tmp_path, force_plan, M, recurrent, device):
    spec, backbone, ads = make_policy(tmp_path / "p", obs=(5, 7, 4, 7), act=(3, 5, 2, 5),
                                      recurrent=recurrent, action="gaussian")
    force_plan(M)
    eng = Engine.from_dir(tmp_path / "p", device=device, mode="lora")
    check(eng, spec, backbone, ads, *batch(spec, 0, counts=[1, 9, 3, 20]))
    check(eng, spec, backbone, ads, *batch(spec, 77))


def test_mixed_chunks_heterogeneous_humanoid_sizes(hetero_policy, force_plan, device):
    d, spec, backbone, ads = hetero_policy
    force_plan(8)
    eng = Engine.from_dir(d, device=device, mode="lora")
    check(eng, spec, backbone, ads, *batch(spec, 0, counts=[13, 6]))


def test_mixed_chunks_categorical_masks(tmp_path, force_plan, device):
    spec, backbone, ads = make_policy(tmp_path / "c", obs=(5, 5, 5), act=(4, 6, 6),
                                      action="categorical")
    force_plan(4)
    eng = Engine.from_dir(tmp_path / "c", device=device, mode="lora")
    ids, obs, h, reset = batch(spec, 0, counts=[5, 2, 9])
    check(eng, spec, backbone, ads, ids, obs, h, reset)
    avail = torch.ones(len(ids), 6, dtype=torch.bool)
    avail[:, 0] = False
    out = eng.act(ids, *on_device(device, obs, h, reset, avail), deterministic=False,
                  generator=torch.Generator().manual_seed(0))
    actions, log_probs = out.actions.cpu(), out.log_probs.cpu()
    ref_head, _ = forward_loop(spec, backbone, ads, ids, obs, h, reset)
    act_dims = torch.tensor([spec.agent(a).act_dim for a in ids])
    valid = avail & (torch.arange(6) < act_dims[:, None])
    assert valid[torch.arange(len(ids)), actions].all()
    ref = torch.distributions.Categorical(logits=ref_head.float().masked_fill(~valid, -1e30))
    torch.testing.assert_close(log_probs, ref.log_prob(actions), atol=1e-5, rtol=0)


@pytest.mark.parametrize("B", [1000, 4000])
def test_thousand_agents_auto_matches_reference(tmp_path, B, device):
    n = 1000
    spec, backbone, ads = make_policy(tmp_path / "k", obs=(6,) * n, act=(2,) * n, rank=2,
                                      b_std=0.05, layers=("mlp.0", "gru.h", "head"))
    eng = Engine.from_dir(tmp_path / "k", device=device, mode="auto")
    counts = [1] * n if B == n else None
    ids, obs, h, reset = batch(spec, B, counts=counts)
    rows = np.random.default_rng(0).choice(len(ids), 300, replace=False)  # the oracle is slow
    head, h_next = eng.forward(ids, *on_device(device, obs, h, reset))
    sub = [ids[i] for i in rows]
    ref_head, ref_h = forward_loop(spec, backbone, ads, sub, obs[rows], h[rows], reset[rows])
    torch.testing.assert_close(head.cpu()[rows].double(), ref_head, atol=1e-5, rtol=0)
    torch.testing.assert_close(h_next.cpu()[rows].double(), ref_h, atol=1e-5, rtol=0)


# --- traced small batches ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["lora", "merged", "auto"])
@pytest.mark.parametrize("recurrent", [True, False])
def test_traced_small_batches_match_reference(tmp_path, mode, recurrent, device):
    spec, backbone, ads = make_policy(tmp_path / "t", obs=(5, 7, 4), act=(3, 5, 2),
                                      recurrent=recurrent)
    eng = Engine.from_dir(tmp_path / "t", device=device, mode=mode)
    args = batch(spec, 0, counts=[2, 1, 3])
    for _ in range(5):  # eager, eager + trace, then traced calls
        check(eng, spec, backbone, ads, *args)
    entries = list(eng._bank.cache.traced._entries.values())
    assert any(callable(e) for e in entries)  # the traced graph is in use


def test_traced_plain_policy(tmp_path, device):
    spec, backbone, _ = make_policy(tmp_path / "plain", adapters=False)
    eng = Engine.from_dir(tmp_path / "plain", device=device)
    args = batch(spec, 10)
    for _ in range(4):
        check(eng, spec, backbone, {}, *args)


def test_trace_failure_falls_back_to_eager(tmp_path, monkeypatch, device):
    def broken(*a, **k):
        raise RuntimeError("no tracing here")
    monkeypatch.setattr(traced_mod.torch.jit, "trace", broken)
    spec, backbone, ads = make_policy(tmp_path / "f")
    eng = Engine.from_dir(tmp_path / "f", device=device, mode="lora")
    args = batch(spec, 6)
    for _ in range(4):
        check(eng, spec, backbone, ads, *args)
    assert traced_mod._EAGER in eng._bank.cache.traced._entries.values()


def test_tracing_disabled_and_hot_swap_retraces(tmp_path, device):
    spec, backbone, ads = make_policy(tmp_path / "s")
    eng = Engine.from_dir(tmp_path / "s", device=device, mode="lora")
    args = batch(spec, 6)
    for _ in range(3):
        check(eng, spec, backbone, ads, *args)
    new = {k: v.flip(0) for k, v in ads["agent_1"].items()}
    eng.set_adapter("agent_1", new)  # a new bank: traces of the old weights are not reused
    ads2 = {**ads, "agent_1": new}
    for _ in range(3):
        check(eng, spec, backbone, ads2, *args)
    eager = Engine.from_dir(tmp_path / "s", device="cpu", mode="lora", limits=CacheLimits(traced_graphs=0))
    eager.set_adapter("agent_1", new)
    for _ in range(3):
        check(eager, spec, backbone, ads2, *args)
    assert len(eng._bank.cache.traced._entries) and not len(eager._bank.cache.traced._entries)


# --- LRU of auto-merged agents ------------------------------------------------------------------------
def test_auto_merged_agents_are_bounded(tmp_path, device):
    n = 12
    spec, backbone, ads = make_policy(tmp_path / "lru", obs=(6,) * n, act=(2,) * n)
    per_agent = Engine.from_dir(tmp_path / "lru", device=device)._bank.merged_bytes_per_agent
    eng = Engine.from_dir(tmp_path / "lru", device=device, mode="auto",
                          limits=CacheLimits(auto_merged_bytes=4 * per_agent))
    eng.merge(["agent_0"])  # pinned: never evicted
    for start in range(1, n - 2):  # teams of 3 agents drift over the population
        team = spec.agent_ids[start:start + 3]
        ids, obs, h, reset = batch(spec, 0, counts=[3 if a in team else 0 for a in spec.agent_ids])
        check(eng, spec, backbone, ads, ids, obs, h, reset, mode="merged")
        merged = set(eng.merged_agents)
        assert set(team) <= merged and "agent_0" in merged
        assert len(merged - {"agent_0"}) <= 4
    eng.unmerge(["agent_0"])
    assert "agent_0" not in eng.merged_agents


def test_single_thread_team_step_uses_lora_and_matches(tmp_path, monkeypatch):
    n = 8
    spec, backbone, ads = make_policy(tmp_path / "team", obs=(6,) * n, act=(2,) * n)
    eng = Engine.from_dir(tmp_path / "team", device="cpu", mode="auto")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    check(eng, spec, backbone, ads, *batch(spec, 0, counts=[1] * n))
    assert eng.merged_agents == []  # one thread, 8 chunks: low-rank path
    check(eng, spec, backbone, ads, *batch(spec, 0, counts=[1, 1] + [0] * (n - 2)))
    assert len(eng.merged_agents) == 2  # few chunks: merged
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    check(eng, spec, backbone, ads, *batch(spec, 0, counts=[1] * n))
    assert len(eng.merged_agents) == n


def test_params_cache_is_bounded_in_bytes(tmp_path, device):
    """Per-layout copies (gathered adapters, masks, stacked merged weights) stay under the byte
    budget; evicted layouts are rebuilt on demand with the same results."""
    spec, backbone, ads = make_policy(tmp_path / "p")
    eng = Engine.from_dir(tmp_path / "p", device=device, mode="lora")
    batches = [batch(spec, 0, seed=s, counts=c)
               for s, c in enumerate([[5, 1, 2], [1, 6, 3], [2, 2, 7], [4, 0, 1]])]
    sizes = []
    for ids, *x in batches:
        eng.forward(ids, *on_device(device, *x))
        sizes.append(eng._bank.cached_params_bytes())
    assert sizes[0] > 0 and sizes[-1] > sizes[0]  # each layout adds its copies
    limit = max(sizes[i + 1] - sizes[i] for i in range(len(sizes) - 1)) + 1  # about one layout
    eng = Engine.from_dir(tmp_path / "p", device=device, mode="lora", limits=CacheLimits(params_bytes=limit))
    for _ in range(2):
        for ids, obs, h, reset in batches:
            check(eng, spec, backbone, ads, ids, obs, h, reset)
            assert len(eng._bank.cache.params) == 1 or eng._bank.cached_params_bytes() <= limit
    assert len(eng._bank.cache.params) < len(batches)  # evicted by bytes, not by count
    cached = eng._bank.cache.params.keys()
    assert eng._bank.cache.traced._entries and all(k[:2] in cached for k in eng._bank.cache.traced._entries)


def test_in_order_team_step_copies_nothing(tmp_path, device):
    spec, backbone, ads = make_policy(tmp_path / "p")
    eng = Engine.from_dir(tmp_path / "p", device=device, mode="lora")
    eng.forward(spec.agent_ids, *on_device(device, torch.zeros(3, spec.obs_max), torch.zeros(3, spec.hidden)))
    assert len(eng._bank.cache.params) == 1 and eng._bank.cached_params_bytes() == 0
