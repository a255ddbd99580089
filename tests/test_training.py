"""MAPPO pieces against slow, obviously-correct references (no environment needed except where noted)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lorasa_serve import AgentSpec, Engine, LoraSpec, PolicySpec, save_policy
from lorasa_serve.adapter_layout import adapter_shapes
from lorasa_serve.cli import UsageError
from lorasa_serve.network import actor_forward, shared_params
from training.actor import Actor, param_counts
from training.cli import parse_config
from training.config import TrainConfig
from training.mappo import ValueNorm, gae, to_sequences

HETERO = PolicySpec(agents=(AgentSpec("a", 10, 3), AgentSpec("b", 7, 2), AgentSpec("c", 10, 1)),
                    hidden=16, lora=LoraSpec(rank=4, alpha=8.0))


def gae_reference(rewards, values, last_value, ends, gamma, lam):
    """Definition: A_t = sum_l (gamma lam)^l delta_{t+l}, summed inside the episode only (plain loops)."""
    T, E = len(rewards), len(rewards[0])
    adv = [[0.0] * E for _ in range(T)]
    for e in range(E):
        for t in range(T):
            total, coef = 0.0, 1.0
            for k in range(t, T):
                nxt = 0.0 if ends[k][e] else (values[k + 1][e] if k + 1 < T else last_value[e])
                total += coef * (rewards[k][e] + gamma * nxt - values[k][e])
                if ends[k][e]:
                    break
                coef *= gamma * lam
            adv[t][e] = total
    return adv


def test_gae_matches_plain_loop():
    g = torch.Generator().manual_seed(0)
    T, E = 23, 4
    r, v, last = torch.randn(T, E, generator=g), torch.randn(T, E, generator=g), torch.randn(E, generator=g)
    ends = torch.rand(T, E, generator=g) < 0.15
    adv, ret = gae(r, v, last, ends, 0.97, 0.9)
    ref = torch.tensor(gae_reference(r.tolist(), v.tolist(), last.tolist(), ends.tolist(), 0.97, 0.9))
    torch.testing.assert_close(adv, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret, ref + v, rtol=1e-5, atol=1e-5)


def test_to_sequences_layout():
    T, N, E, L = 6, 2, 3, 3
    x = torch.arange(T * N * E).reshape(T, N, E)
    s = to_sequences(x, L, 2)  # [L, N, Q]
    assert s.shape == (L, N, (T // L) * E)
    for k in range(T // L):
        for e in range(E):
            for l in range(L):
                assert torch.equal(s[l, :, k * E + e], x[k * L + l, :, e])
    y = torch.arange(T * E).reshape(T, E)
    assert torch.equal(to_sequences(y, L, 1)[:, 4], y[[3, 4, 5], 1])


def test_value_norm_matches_numpy():
    vn, chunks = ValueNorm(), [torch.randn(50) * 3 + 2, torch.randn(70) * 0.5 - 1, torch.randn(5)]
    for c in chunks:
        vn.update(c)
    allx = torch.cat(chunks).numpy()
    assert vn.mean == pytest.approx(allx.mean(), rel=1e-5)
    assert vn.var == pytest.approx(allx.var(), rel=1e-4)
    x = torch.randn(9)
    torch.testing.assert_close(vn.denormalize(vn.normalize(x)), x)


def _forward(actor: Actor, obs, h):
    return actor_forward(actor.spec, actor.params(), obs, h, None)


def test_lora_with_zero_b_equals_ps_and_nps_with_copies_equals_ps():
    g = torch.Generator().manual_seed(1)
    ps = Actor.new_ps(HETERO, g, -0.5)
    obs, h = torch.randn(3, 5, HETERO.obs_max, generator=g), torch.randn(3, 5, 16, generator=g)
    ref_out, ref_h = _forward(ps, obs, h)
    lora = Actor.lora_from_backbone(HETERO, ps.backbone(), g)  # B = 0
    out, hn = _forward(lora, obs, h)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(hn, ref_h)
    nps = Actor.new_nps(HETERO, g, -0.5)
    for k, v in ps.trainable.items():  # every agent's network := the PS backbone
        with torch.no_grad():
            if k == "log_std":
                nps.trainable[k].copy_(v.expand_as(nps.trainable[k]))
            elif v.dim() == 2:
                nps.trainable[k].copy_(v.T.expand_as(nps.trainable[k]))
            else:
                nps.trainable[k].copy_(v.view(1, 1, -1).expand_as(nps.trainable[k]))
    out, hn = _forward(nps, obs, h)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hn, ref_h, rtol=1e-5, atol=1e-5)


def test_nps_agents_are_independent_networks():
    """NPS chunk i == a PS forward with agent i's own weights (transposed back to [out, in])."""
    g = torch.Generator().manual_seed(2)
    nps = Actor.new_nps(HETERO, g, -0.5)
    obs, h = torch.randn(3, 4, HETERO.obs_max, generator=g), torch.randn(3, 4, 16, generator=g)
    out, _ = _forward(nps, obs, h)
    for i in range(3):
        t = nps.trainable
        bb = {k: (v[i].T if v.dim() == 3 and k.replace(".weight", "") in HETERO.linear_names()
                  and k.endswith("weight") else v[i].reshape(-1)) for k, v in t.items()}
        ref, _ = actor_forward(HETERO, shared_params(HETERO, bb), obs[i:i + 1], h[i:i + 1], None)
        torch.testing.assert_close(out[i:i + 1], ref, rtol=1e-5, atol=1e-5)
    assert len({float(t["mlp.0.weight"][i].detach().sum()) for i in range(3)}) == 3


def test_trained_lora_actor_equals_served_policy(tmp_path):
    """The training forward of PS+LoRA and Engine.forward on the saved directory agree (both modes)."""
    g = torch.Generator().manual_seed(3)
    ps = Actor.new_ps(HETERO, g, -0.5)
    lora = Actor.lora_from_backbone(HETERO, ps.backbone(), g)
    with torch.no_grad():
        for k, v in lora.trainable.items():
            v.normal_(0, 0.3, generator=g)
    spec = save_policy(tmp_path / "p", HETERO, lora.backbone(), lora.adapters())
    obs = torch.randn(3, 6, HETERO.obs_max, generator=g)
    for i, a in enumerate(HETERO.agents):
        obs[i, :, a.obs_dim:] = 0  # the env pads each agent's observation
    h = torch.randn(3, 6, 16, generator=g)
    out, hn = _forward(lora, obs, h)
    ids = [a for a in spec.agent_ids for _ in range(6)]
    for mode in ("lora", "merged"):
        eng = Engine.from_dir(tmp_path / "p", device="cpu", mode=mode)
        head, h2 = eng.forward(ids, obs.reshape(18, -1), h.reshape(18, -1))
        torch.testing.assert_close(head, out.reshape(18, -1), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(h2, hn.reshape(18, -1), rtol=1e-4, atol=1e-5)


def test_param_counts():
    c = param_counts(HETERO)
    n_backbone = sum(int(np.prod(s)) for s in HETERO.backbone_shapes().values())
    n_adapter = sum(int(np.prod(s)) for s in adapter_shapes(HETERO).values())
    assert c["ps_total"] == n_backbone and c["nps_total"] == 3 * n_backbone
    assert c["lorasa_total"] == n_backbone + 3 * n_adapter
    g = torch.Generator().manual_seed(0)
    assert Actor.new_nps(HETERO, g, 0.0).n_trainable() == c["nps_total"]
    assert Actor.new_ps(HETERO, g, 0.0).n_trainable() == c["ps_total"]
    ps = Actor.new_ps(HETERO, g, 0.0)
    assert Actor.lora_from_backbone(HETERO, ps.backbone(), g).n_trainable() == 3 * n_adapter


def test_cli_parses_typed_flags_over_a_preset():
    cfg, resume = parse_config(["--preset", "humanoid_9_8", "--ppo.lr", "3e-4", "--env.n-envs", "3",
                                "--lora.layers", "mlp.0,head", "--no-tensorboard", "--mode", "nps"])
    assert not resume and isinstance(cfg, TrainConfig)
    assert cfg.env.scenario == "Humanoid" and cfg.env.agent_conf == "9|8" and cfg.env.n_envs == 3
    assert cfg.ppo.lr == 3e-4 and cfg.ppo.epochs == TrainConfig().ppo.epochs
    assert cfg.lora.layers == ("mlp.0", "head") and cfg.tensorboard is False and cfg.mode == "nps"
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(UsageError, match="invalid choice: 'bogus'"):
        parse_config(["--mode", "bogus"])
