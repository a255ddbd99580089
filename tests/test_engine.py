"""Engine vs the per-row reference loop, merge/unmerge, sampling, input errors: on every device in
conftest.DEVICES (inputs on the engine's device, outputs compared on the CPU)."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from conftest import make_policy, on_device
from reference import forward_loop, zero_padding

from lorasa_serve import Engine, InputError, UnknownAgentError
from lorasa_serve.caches import CacheLimits
from lorasa_serve.layout import Planner, plan

MODES = ["lora", "merged", "auto"]


def mixed_batch(spec, B, seed=1, order="random"):
    g = torch.Generator().manual_seed(seed)
    ids = spec.agent_ids
    if order == "random":
        idx = torch.randint(len(ids), (B,), generator=g).tolist()
    else:  # env-major: a, b, c, a, b, c, ...
        idx = [i % len(ids) for i in range(B)]
    agent_ids = [ids[i] for i in idx]
    obs = zero_padding(spec, agent_ids, torch.randn(B, spec.obs_max, generator=g))
    h = torch.randn(B, spec.hidden, generator=g) * 0.5
    reset = torch.rand(B, generator=g) < 0.3
    return agent_ids, obs, h, reset


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B,order", [(1, "random"), (3, "env"), (7, "random"), (48, "env"),
                                     (300, "random"), (1024, "random")])
def test_engine_matches_per_agent_loop(tiny_policy, device, mode, B, order):
    d, spec, backbone, ads = tiny_policy
    eng = Engine.from_dir(d, device=device, mode=mode)
    ids, obs, h, reset = mixed_batch(eng.spec, B, order=order)
    head, h_next = eng.forward(ids, *on_device(device, obs, h, reset))
    ref_head, ref_h = forward_loop(eng.spec, backbone, ads, ids, obs, h, reset)
    torch.testing.assert_close(head.cpu().double(), ref_head, atol=1e-5, rtol=0)
    torch.testing.assert_close(h_next.cpu().double(), ref_h, atol=1e-5, rtol=0)


def test_adapters_really_differ(tiny_policy, device):
    """Guard against a vacuous oracle: the same row through two agents gives different outputs."""
    d, spec, _, _ = tiny_policy
    eng = Engine.from_dir(d, device=device)
    obs = torch.randn(1, spec.obs_max).repeat(3, 1)
    head, _ = eng.forward(spec.agent_ids, obs.to(device))
    assert (head[0] - head[1]).abs().max() > 1e-2
    assert (head[1] - head[2]).abs().max() > 1e-2


@pytest.mark.parametrize("mode", MODES)
def test_heterogeneous_sizes(hetero_policy, device, mode):
    d, spec, backbone, ads = hetero_policy
    eng = Engine.from_dir(d, device=device, mode=mode)
    ids, obs, h, reset = mixed_batch(spec, 40)
    head, h_next = eng.forward(ids, *on_device(device, obs, h, reset))
    ref_head, ref_h = forward_loop(spec, backbone, ads, ids, obs, h, reset)
    torch.testing.assert_close(head.cpu().double(), ref_head, atol=1e-5, rtol=0)
    torch.testing.assert_close(h_next.cpu().double(), ref_h, atol=1e-5, rtol=0)
    out = eng.act(ids, *on_device(device, obs, h, reset), deterministic=False,
                  generator=torch.Generator().manual_seed(0))
    act_dims = torch.tensor([spec.agent(a).act_dim for a in ids])
    assert out.actions.shape == (40, 9)
    assert (out.actions.cpu()[act_dims == 8, 8] == 0).all()  # the 170/8 agent never gets a 9th action
    # obs columns beyond an agent's size must be zero (a wrong agent's row): refused, naming the row
    narrow = [i for i, a in enumerate(ids) if spec.agent(a).obs_dim == 170]
    obs2 = obs.clone()
    obs2[narrow[1:], 170:] = 123.0
    msg = f"row {narrow[1]} (agent_1, obs_dim 170): non-zero values past its obs_dim: wrong agent's row?"
    for call in (eng.forward, eng.act):
        with pytest.raises(InputError, match=re.escape(msg)):
            call(ids, *on_device(device, obs2, h, reset))


@pytest.mark.parametrize("recurrent", [True, False])
@pytest.mark.parametrize("action", ["gaussian", "categorical"])
def test_variants_match_reference(tmp_path, device, recurrent, action):
    spec, backbone, ads = make_policy(tmp_path / "p", obs=(5, 7, 4), act=(3, 5, 2),
                                      recurrent=recurrent, action=action,
                                      layers=("mlp.0", "post", "head"))
    eng = Engine.from_dir(tmp_path / "p", device=device, mode="lora")
    ids, obs, h, reset = mixed_batch(spec, 33)
    head, h_next = eng.forward(ids, *on_device(device, obs, h if recurrent else None,
                                               reset if recurrent else None))
    ref_head, ref_h = forward_loop(spec, backbone, ads, ids, obs, h if recurrent else None, reset)
    torch.testing.assert_close(head.cpu().double(), ref_head, atol=1e-5, rtol=0)
    assert (h_next is None) == (not recurrent)


def test_zero_b_adapter_equals_backbone(tmp_path, device):
    spec, backbone, _ = make_policy(tmp_path / "z", b_std=0.0)
    plain_spec, _, _ = make_policy(tmp_path / "plain", adapters=False)
    lora = Engine.from_dir(tmp_path / "z", device=device, mode="lora")
    plain = Engine.from_dir(tmp_path / "plain", device=device)
    ids, obs, h, reset = mixed_batch(spec, 64)
    x = on_device(device, obs, h, reset)
    torch.testing.assert_close(lora.forward(ids, *x)[0], plain.forward(ids, *x)[0], atol=1e-6, rtol=0)


def test_merge_unmerge_restores_bitwise(tiny_policy, device):
    d, spec, backbone, ads = tiny_policy
    eng = Engine.from_dir(d, device=device, mode="auto")
    before = {k: v.clone() for k, v in eng.backbone().items()}
    ids, obs, h, reset = on_device(device, *mixed_batch(spec, 64))
    out_before = eng.forward(ids, obs, h, reset, mode="lora")[0]
    eng.merge(["agent_0", "agent_2"])
    assert eng.merged_agents == ["agent_0", "agent_2"]
    merged = eng.merged_weights("agent_0")
    w = backbone["mlp.0.weight"] + (spec.lora.alpha / spec.lora.rank) * ads["agent_0"]["mlp.0.lora_B.weight"] @ \
        ads["agent_0"]["mlp.0.lora_A.weight"]
    torch.testing.assert_close(merged["mlp.0"].cpu(), w)
    torch.testing.assert_close(eng.forward(ids, obs, h, reset, mode="merged")[0], out_before,
                               atol=1e-5, rtol=0)
    eng.unmerge()
    assert eng.merged_agents == []
    for k, v in eng.backbone().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(eng.forward(ids, obs, h, reset, mode="lora")[0], out_before)


def test_sampling_is_seedable_and_deterministic_is_mean(tiny_policy, device):
    d, spec, _, _ = tiny_policy
    eng = Engine.from_dir(d, device=device)
    ids, obs, h, reset = on_device(device, *mixed_batch(spec, 20))
    a1 = eng.act(ids, obs, h, reset, deterministic=False, generator=torch.Generator().manual_seed(5))
    a2 = eng.act(ids, obs, h, reset, deterministic=False, generator=torch.Generator().manual_seed(5))
    a3 = eng.act(ids, obs, h, reset, deterministic=False, generator=torch.Generator().manual_seed(6))
    det = eng.act(ids, obs, h, reset)
    assert torch.equal(a1.actions, a2.actions) and not torch.equal(a1.actions, a3.actions)
    torch.testing.assert_close(det.actions, eng.forward(ids, obs, h, reset)[0])
    # log-prob of the sampled action under the Gaussian, computed independently
    mean = det.actions
    std = eng.backbone()["log_std"].exp()
    ref = torch.distributions.Normal(mean, std).log_prob(a1.actions).sum(-1)
    torch.testing.assert_close(a1.log_probs, ref, atol=1e-4, rtol=0)


def test_a_seed_draws_the_same_numbers_on_every_device(tiny_policy, device):
    """A seeded CPU generator serves an engine on any device with the numbers it draws on the CPU
    (the service seeds requests that way); a generator on the engine's device works too."""
    d, spec, _, _ = tiny_policy
    eng = Engine.from_dir(d, device=device)
    ids, obs, h, reset = mixed_batch(spec, 20)
    x = on_device(device, obs, h, reset)
    out = eng.act(ids, *x, deterministic=False, generator=torch.Generator().manual_seed(5))
    noise = torch.randn(20, spec.act_max, generator=torch.Generator().manual_seed(5))  # [B, act_max]
    want = eng.act(ids, *x).actions.cpu() + noise * eng.backbone()["log_std"].cpu().exp()
    torch.testing.assert_close(out.actions.cpu(), want, atol=1e-5, rtol=0)
    a, b = (eng.act(ids, *x, deterministic=False, generator=torch.Generator(device).manual_seed(5))
            for _ in range(2))
    assert torch.equal(a.actions, b.actions) and a.actions.device == eng.act(ids, *x).actions.device


def test_categorical_masks(tmp_path, device):
    spec, _, _ = make_policy(tmp_path / "c", obs=(5, 5), act=(4, 6), action="categorical")
    eng = Engine.from_dir(tmp_path / "c", device=device)
    ids = ["agent_0", "agent_1"] * 50
    obs = torch.randn(100, 5)
    avail = torch.ones(100, 6, dtype=torch.bool)
    avail[:, 1] = False
    out = eng.act(ids, *on_device(device, obs), avail=avail.to(device), deterministic=False,
                  generator=torch.Generator().manual_seed(0))
    a, log_probs = out.actions.cpu(), out.log_probs.cpu()
    assert (a != 1).all()
    assert (a[0::2] < 4).all()  # agent_0 has 4 actions: never 4 or 5
    assert torch.isfinite(log_probs).all()
    logits = eng.forward(ids, obs.to(device))[0].cpu()
    ref = torch.distributions.Categorical(logits=logits[0::2, :4].masked_fill(~avail[0::2, :4], -1e30))
    torch.testing.assert_close(log_probs[0::2], ref.log_prob(a[0::2]), atol=1e-5, rtol=0)
    bad = avail.clone()
    bad[3] = False
    with pytest.raises(InputError, match="no available action"):
        eng.act(ids, obs.to(device), avail=bad.to(device))
    only_invalid = torch.zeros(100, 6, dtype=torch.bool)
    only_invalid[:, 5] = True  # action 5 exists for agent_1 only
    with pytest.raises(InputError, match="rows \\[0, 2"):
        eng.act(ids, obs.to(device), avail=only_invalid.to(device))


def test_bad_inputs_raise_typed_errors(tiny_policy, device):
    d, spec, _, _ = tiny_policy
    eng = Engine.from_dir(d, device=device)
    obs = torch.randn(2, spec.obs_max, device=device)
    with pytest.raises(UnknownAgentError):
        eng.act(["agent_0", "nobody"], obs)
    with pytest.raises(InputError, match="obs has 7 values, more than the policy's obs_max 6"):
        eng.act(["agent_0", "agent_1"], torch.randn(2, spec.obs_max + 1, device=device))
    with pytest.raises(InputError, match="obs has shape"):
        eng.act(["agent_0"], obs)
    with pytest.raises(InputError, match="NaN"):
        eng.act(["agent_0", "agent_1"], torch.tensor([[float("nan")] * 6] * 2, device=device))
    with pytest.raises(InputError, match="row 0: state has 3 values, expected the policy's hidden size 16"):
        eng.act(["agent_0", "agent_1"], obs, torch.zeros(2, 3, device=device))
    with pytest.raises(InputError, match="empty"):
        eng.act([], torch.zeros(0, 6, device=device))
    with pytest.raises(UnknownAgentError):
        eng.act(np.array([0, 9]), obs)
    with pytest.raises(InputError, match="avail"):
        eng.act(["agent_0", "agent_1"], obs, avail=torch.ones(2, 2, device=device))


def test_agent_index_and_numpy_inputs(tiny_policy, device):
    d, spec, _, _ = tiny_policy
    eng = Engine.from_dir(d, device=device)
    ids, obs, h, reset = mixed_batch(spec, 30)
    idx = eng.agent_index(ids)
    a = eng.act(ids, *on_device(device, obs, h, reset))  # tensors on the device: checked there
    b = eng.act(idx, obs.numpy(), h.numpy(), reset.numpy())  # host data: checked by the protocol
    assert torch.equal(a.actions, b.actions) and torch.equal(a.state, b.state)


def test_layout_plans_cover_every_row():
    rng = np.random.default_rng(0)
    for B, S in [(1, 1), (5, 5), (64, 4), (1000, 3), (333, 100), (4096, 1000)]:
        for skew in [False, True]:
            p = rng.dirichlet(np.ones(S) * (0.05 if skew else 10.0))
            slots = rng.choice(S, size=B, p=p).astype(np.int64)
            planner = Planner(CacheLimits().plans)
            lay = planner.plan(slots)
            assert planner.plan(slots) is lay  # cached: an env loop repeats its agent order every step
            pos = np.arange(B) if lay.pos is None else lay.pos
            assert len(np.unique(pos)) == B and pos.max() < lay.C * lay.M
            assert (lay.chunk_slot[pos // lay.M] == slots).all()
            assert lay.C * lay.M <= 2 * B + 8 * S  # bounded padding
            for p in (lay, plan(slots, mixed=True)):  # each row's slot, as the plan gives it
                assert (p.rows == slots).all()
                assert torch.equal(p.on_device("rows", torch.device("cpu")), torch.from_numpy(slots))


@pytest.mark.parametrize("mode", MODES)
def test_blocked_forward_matches_reference(tiny_policy, monkeypatch, device, mode):
    """Big batches run in blocks of chunks (and capped chunk sizes): same results as one block."""
    import lorasa_serve.engine as engine_mod
    import lorasa_serve.layout as layout_mod
    monkeypatch.setattr(engine_mod, "BLOCK_ROWS", 24)
    monkeypatch.setattr(layout_mod, "MAX_TILE", 8)  # the engine's own plan cache starts empty
    d, spec, backbone, ads = tiny_policy
    eng = Engine.from_dir(d, device=device, mode=mode)
    ids, obs, h, reset = mixed_batch(spec, 301)
    ids[:200] = ["agent_1"] * 200  # one agent dominates: several chunks of the same agent
    x = on_device(device, obs, h, reset)
    head, h_next = eng.forward(ids, *x)
    ref_head, ref_h = forward_loop(spec, backbone, ads, ids, obs, h, reset)
    torch.testing.assert_close(head.cpu().double(), ref_head, atol=1e-5, rtol=0)
    torch.testing.assert_close(h_next.cpu().double(), ref_h, atol=1e-5, rtol=0)
    plain_spec, plain_bb, _ = make_policy(d.parent / "plain", adapters=False)
    plain = Engine.from_dir(d.parent / "plain", device=device)
    ref_plain, _ = forward_loop(plain_spec, plain_bb, {}, ids, obs, h, reset)
    torch.testing.assert_close(plain.forward(ids, *x)[0].cpu().double(), ref_plain, atol=1e-5, rtol=0)
