"""SePS, MTL, SePS+LoRA actors and A2PO's pieces against slow, obviously-correct references."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lorasa_serve import AgentSpec, LoraSpec, PolicySpec
from lorasa_serve.network import actor_forward
import copy

from training.a2po import (a2po_update, agent_order, agent_scores, position_clip, semi_greedy_order,
                           step_only_agent)
from training.actor import Actor
from training.mappo import collect, from_sequences, gae, make_batch, to_sequences
from training.seps import kmeans, renumber

from test_training import HETERO, gae_reference
from test_training_smoke import CHEETAH, _eval_json, _rows, tiny

from training.envs import EnvConfig
from training.trainer import Trainer


def _forward(actor: Actor, obs, h):
    return actor_forward(actor.spec, actor.params(), obs, h, None)


def _inputs(seed: int, m: int = 5):
    g = torch.Generator().manual_seed(seed)
    return g, torch.randn(3, m, HETERO.obs_max, generator=g), torch.randn(3, m, 16, generator=g)


def _ps_forward_with(actor: Actor, agent: int, obs, h):
    """Agent `agent`'s own network as a PS (all-shared) forward: the slow reference."""
    bb = {}
    for k in {**actor.frozen, **actor.trainable}:
        if k.endswith((".lora_a", ".lora_b")):
            continue
        v = actor._get(k)
        if v.dim() == 3:  # per agent after the gather: [N, in, out] / [N, 1, D]
            v = v[agent].T if v.shape[1] != 1 else v[agent].reshape(-1)
        bb[k] = v
    ps = Actor(actor.spec, "ps", bb)
    return _forward(ps, obs[agent:agent + 1], h[agent:agent + 1])


@pytest.mark.parametrize("groups", [(0, 1, 0), (0, 0, 1), (0, 1, 2)])
def test_seps_agents_use_their_group_network(groups):
    g, obs, h = _inputs(4)
    seps = Actor.new_seps(HETERO, g, -0.5, groups)
    assert seps.trainable["mlp.0.weight"].shape[0] == max(groups) + 1
    out, hn = _forward(seps, obs, h)
    for i in range(3):
        ref, ref_h = _ps_forward_with(seps, i, obs, h)
        torch.testing.assert_close(out[i:i + 1], ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hn[i:i + 1], ref_h, rtol=1e-5, atol=1e-5)
    same = [(i, j) for i in range(3) for j in range(i + 1, 3) if groups[i] == groups[j]]
    for i, j in same:  # one network: equal inputs give equal outputs
        o, _ = _forward(seps, obs[[i, i, i]], h[[i, i, i]])
        torch.testing.assert_close(o[i], o[j])
    # gradients reach exactly the groups whose agents have a loss
    out[0].sum().backward()
    grad = seps.trainable["mlp.0.weight"].grad
    assert float(grad[groups[0]].abs().sum()) > 0
    assert all(float(grad[k].abs().sum()) == 0 for k in set(groups) - {groups[0]})


def test_mtl_shares_the_trunk_and_owns_the_heads():
    g, obs, h = _inputs(5)
    mtl = Actor.new_mtl(HETERO, g, -0.5)
    t = mtl.trainable
    assert t["mlp.0.weight"].dim() == 2 and t["gru.x.weight"].dim() == 2  # shared trunk
    assert t["head.weight"].shape[0] == 3 and t["post.weight"].shape[0] == 3 and t["log_std"].shape[0] == 3
    assert t["post.ln.weight"].shape == (3, 1, 16)
    out, hn = _forward(mtl, obs, h)
    for i in range(3):
        ref, ref_h = _ps_forward_with(mtl, i, obs, h)
        torch.testing.assert_close(out[i:i + 1], ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hn[i:i + 1], ref_h, rtol=1e-5, atol=1e-5)  # the trunk's state
    assert not torch.equal(t["head.weight"][0], t["head.weight"][1])


def test_lora_over_seps_starts_equal_and_trains_only_adapters():
    g, obs, h = _inputs(6)
    seps = Actor.new_seps(HETERO, g, -0.5, (0, 1, 0))
    lora = Actor.lora_from_base(seps, g)  # B = 0
    assert lora.kind == "lora" and lora.groups == (0, 1, 0) and not lora.servable()
    assert set(lora.trainable) == {f"{n}.{p}" for n in HETERO.adapted_layers for p in ("lora_a", "lora_b")}
    ref, ref_h = _forward(seps, obs, h)
    out, hn = _forward(lora, obs, h)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(hn, ref_h)
    assert lora.n_total() == seps.n_total() + lora.n_trainable()


def test_kmeans_finds_planted_clusters():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 0.0]])
    labels = np.array([2, 0, 1, 0, 2, 1, 1])
    x = centres[labels] + rng.normal(0, 0.1, (7, 3))
    got = kmeans(x, 3, seed=1)
    assert got.tolist() == renumber(labels).tolist() == [0, 1, 2, 1, 0, 2, 2]
    assert kmeans(x, 7, seed=1).tolist() == list(range(7))
    with pytest.raises(ValueError):
        kmeans(np.zeros((4, 2)), 2, seed=0)  # identical agents cannot form 2 groups


def test_traced_gae_matches_plain_loop():
    g = torch.Generator().manual_seed(7)
    T, E, gamma, lam = 17, 3, 0.97, 0.9
    r, v, last = torch.randn(T, E, generator=g), torch.randn(T, E, generator=g), torch.randn(E, generator=g)
    ends = torch.rand(T, E, generator=g) < 0.15
    c = torch.rand(T, E, generator=g)
    adv, _ = gae(r, v, last, ends, gamma, lam, trace=c)
    ref = torch.zeros(T, E, dtype=torch.float64)
    for e in range(E):  # A_t = sum_l (gamma lam)^l (c_{t+1} ... c_{t+l}) delta_{t+l}, inside the episode
        for t in range(T):
            total, coef = 0.0, 1.0
            for k in range(t, T):
                if k > t:
                    coef *= gamma * lam * float(c[k, e])
                nxt = 0.0 if ends[k, e] else (float(v[k + 1, e]) if k + 1 < T else float(last[e]))
                total += coef * (float(r[k, e]) + gamma * nxt - float(v[k, e]))
                if ends[k, e]:
                    break
            ref[t, e] = total
    torch.testing.assert_close(adv.double(), ref, rtol=1e-5, atol=1e-5)
    plain, _ = gae(r, v, last, ends, gamma, lam, trace=torch.ones(T, E))
    torch.testing.assert_close(plain, torch.tensor(gae_reference(r.tolist(), v.tolist(), last.tolist(),
                                                                 ends.tolist(), gamma, lam)))


def test_from_sequences_inverts_to_sequences():
    x = torch.arange(12 * 4 * 2).reshape(12, 4, 2)
    assert torch.equal(from_sequences(to_sequences(x, 3, 1), 4), x)


@pytest.mark.parametrize("kind", ["ps", "nps", "seps", "mtl", "lora"])
def test_a2po_step_moves_only_the_agents_own_parameters(kind):
    g, obs, h = _inputs(8)
    actor = {"ps": lambda: Actor.new_ps(HETERO, g, -0.5), "nps": lambda: Actor.new_nps(HETERO, g, -0.5),
             "seps": lambda: Actor.new_seps(HETERO, g, -0.5, (0, 1, 0)),
             "mtl": lambda: Actor.new_mtl(HETERO, g, -0.5),
             "lora": lambda: Actor.lora_from_base(Actor.new_seps(HETERO, g, -0.5, (0, 1, 0)), g)}[kind]()
    if kind == "lora":
        with torch.no_grad():
            for v in actor.trainable.values():
                v.normal_(0, 0.1, generator=g)
    opt = torch.optim.Adam(list(actor.trainable.values()), lr=1e-2)
    for k in (1, 0, 0):  # steps for different agents: Adam has moments for every row afterwards
        before = {n: v.detach().clone() for n, v in actor.trainable.items()}
        moments = {n: {s: t.clone() for s, t in opt.state.get(v, {}).items() if t.dim() > 0}
                   for n, v in actor.trainable.items()}
        out, _ = _forward(actor, obs, h)
        opt.zero_grad()
        out.pow(2).sum().backward()  # every agent has a gradient; only agent k may move
        step_only_agent(opt, actor, k)
        rows = actor.group_rows()
        for n, v in actor.trainable.items():
            if n == "log_std":  # not in this loss (the forward's output is the Gaussian mean)
                continue
            if n not in rows:  # shared: moves with anyone's update
                assert not torch.equal(v.detach(), before[n]), n
                continue
            mine = rows[n][k]
            for r in range(v.shape[0]):
                moved = not torch.equal(v.detach()[r], before[n][r])
                assert moved == (r == int(mine)), (n, r)
                for s, t in moments[n].items():
                    if r != int(mine):
                        assert torch.equal(opt.state[v][s][r], t[r]), (n, s, r)


HETERO_ANT = EnvConfig("mamujoco", "Ant", "4x2", episode_limit=20, n_envs=2, workers=0)


def test_seps_then_lora_with_a2po_end_to_end(tmp_path):
    """SePS (clustered on a probe) -> snapshot -> SePS+LoRA with A2PO from the snapshot; lorasa-eval runs it."""
    seps_out, lora_out = tmp_path / "seps", tmp_path / "sl"
    s = Trainer(tiny(seps_out, HETERO_ANT, mode="seps", algo="a2po", total_steps=80, eval_every=0,
                     snapshot_steps=(40,), final_eval_episodes=2)).train(progress=False)
    assert len(s["groups"]) == 4 and max(s["groups"]) == 1  # 2 groups over 4 legs
    snap = seps_out / "snapshots" / "40"
    assert (snap / "train_state" / "state.json").is_file() and len(_rows(snap)) == 1
    s2 = Trainer(tiny(lora_out, HETERO_ANT, mode="seps_lorasa", algo="a2po", init_from=str(snap),
                      total_steps=80, final_eval_episodes=2)).train(progress=False)
    assert s2["phase_switch_step"] == 40 and s2["groups"] == s["groups"]
    assert s2["actor_params"] == s["actor_params"] + s2["trainable_params"]
    assert [r["phase"] for r in _rows(lora_out)] == ["lora"]
    res = _eval_json(lora_out, tmp_path)
    assert res["via"].startswith("the SePS+LoRA training actor") and res["policy"]["episodes"] == 2
    summary = json.loads((lora_out / "summary.json").read_text())
    assert summary["final_eval"]["episodes"] == 2 and summary["algo"] == "a2po"


@pytest.mark.parametrize("mode", ["ps", "nps", "mtl"])
def test_a2po_trains_each_mode(tmp_path, mode):
    out = tmp_path / mode
    s = Trainer(tiny(out, CHEETAH, mode=mode, algo="a2po", total_steps=40, eval_every=0,
                     final_eval_episodes=1)).train(progress=False)
    assert s["env_steps"] == 40 and np.isfinite(s["final_eval"]["mean_return"])
    row = _rows(out)[0]
    assert float(row["approx_kl"]) > 0 and np.isfinite(float(row["policy_loss"]))


def test_acting_params_are_reused_until_a_step_changes_the_weights():
    g, obs, h = _inputs(9)
    seps = Actor.new_seps(HETERO, g, -0.5, (0, 1, 0))
    with torch.no_grad():
        p1, p2 = seps.params(), seps.params()
        assert p1 is p2  # no gather per environment step
        before, _ = actor_forward(HETERO, p1, obs, h, None)
    opt = torch.optim.Adam(list(seps.trainable.values()), lr=1e-2)
    _forward(seps, obs, h)[0].pow(2).sum().backward()
    opt.step()
    with torch.no_grad():
        after, _ = actor_forward(HETERO, seps.params(), obs, h, None)
        assert seps.params() is not p1 and not torch.equal(after, before)
    fresh, _ = _forward(seps, obs, h)  # autograd: always built anew, equal values
    torch.testing.assert_close(after, fresh.detach())
    assert seps.log_std().requires_grad and not torch.no_grad()(seps.log_std)().requires_grad


# --- A2PO: semi-greedy order and adaptive clip (the authors' code: _get_agent_sequence, near_linear) ---
def test_a2po_semi_greedy_order_alternates_best_and_random():
    scores = [0.5, 3.0, 1.0, 2.0, 0.1]  # ranked best first: 1, 3, 2, 0, 4
    seconds = set()
    for seed in range(200):
        order = semi_greedy_order(scores, torch.Generator().manual_seed(seed))
        assert sorted(order) == [0, 1, 2, 3, 4]
        assert order[0] == 1  # greedy: the best
        rest = [i for i in (1, 3, 2, 0, 4) if i not in order[:2]]
        assert order[2] == rest[0]  # greedy: the best of what the random pick left
        assert order[4] == [i for i in rest if i not in order[2:4]][0]
        seconds.add(order[1])
    assert seconds == {3, 2, 0, 4}  # the random positions draw from every remaining agent
    assert semi_greedy_order([1.0, 1.0, 1.0], torch.Generator().manual_seed(0))[0] == 0  # ties: index order
    assert semi_greedy_order([2.0], torch.Generator()) == [0]
    assert agent_order(3, "fixed", torch.Generator()) == [0, 1, 2]
    with pytest.raises(ValueError):
        agent_order(3, "semi_greedy", torch.Generator(), [1.0, 2.0])


def test_a2po_position_clip_grows_with_the_position():
    # eps * (w (p + 1) / N + 1 - w), eps 0.2, N 4
    assert [position_clip(0.2, p, 4, 0.5) for p in range(4)] == pytest.approx([0.125, 0.15, 0.175, 0.2])
    assert [position_clip(0.2, p, 4, 1.0) for p in range(4)] == pytest.approx([0.05, 0.1, 0.15, 0.2])
    assert [position_clip(0.2, p, 2, 0.0) for p in range(2)] == pytest.approx([0.2, 0.2])


def test_a2po_agent_scores_are_advantage_log_prob_covariances():
    adv = torch.tensor([[1.0, -1.0], [1.0, -1.0]])  # [L, Q], mean 0, E[A^2] = 1
    logp = torch.stack([adv + 3.0, -2.0 * adv, torch.full_like(adv, -1.5)], dim=1)  # [L, N=3, Q]
    assert agent_scores(adv, logp) == pytest.approx([1.0, 2.0, 0.0])


class _RecordingAdam(torch.optim.Adam):
    """A real Adam that keeps the parameters as they are before each actor step (after the previous
    step's restore of other agents' rows)."""

    def __init__(self, named: dict, lr: float):
        super().__init__(list(named.values()), lr=lr, eps=1e-5)
        self.named, self.snapshots = named, []

    def zero_grad(self, set_to_none: bool = True):
        self.snapshots.append({n: p.detach().clone() for n, p in self.named.items()})
        super().zero_grad(set_to_none=set_to_none)


def test_a2po_update_semi_greedy_adaptive_clip_moves_one_agent_per_turn(tmp_path):
    from dataclasses import replace
    cfg = tiny(tmp_path / "nps", HETERO_ANT, mode="nps", algo="a2po")
    cfg = replace(cfg, a2po=replace(cfg.a2po, order="semi_greedy", adaptive_clip=True))
    tr = Trainer(cfg)
    try:
        ro, _, _ = collect(tr.venv, tr.policy, tr.critic, tr.vnorm, tr._start_cursor(), cfg.ppo.rollout,
                           cfg.ppo.gamma, tr.g)
        batch = make_batch(ro, copy.deepcopy(tr.vnorm), cfg.ppo)  # the update's own batch
        scores = agent_scores(batch.seq["adv"], batch.seq["logp"])
        opt = _RecordingAdam(tr.actor.trainable, lr=1e-2)
        a2po_update(tr.policy, tr.critic, tr.vnorm, ro, cfg.ppo, cfg.a2po, opt, tr.critic_opt, tr.g)
    finally:
        tr.close()
    snaps = opt.snapshots + [{n: p.detach().clone() for n, p in tr.actor.trainable.items()}]
    rows = tr.actor.group_rows()
    movers = []
    for before, after in zip(snaps, snaps[1:]):
        moved = {int(rows[n][r]) for n in after for r in range(after[n].shape[0])
                 if not torch.equal(after[n][r], before[n][r])}
        assert len(moved) == 1, moved  # each step moves exactly one agent's own network
        movers.append(moved.pop())
    per_turn = cfg.ppo.epochs * cfg.ppo.minibatches
    turns = [movers[i:i + per_turn] for i in range(0, len(movers), per_turn)]
    assert len(turns) == 4 and all(len(set(t)) == 1 for t in turns)
    order = [t[0] for t in turns]
    assert sorted(order) == [0, 1, 2, 3]
    assert order[0] == int(np.argmax(scores))  # greedy first position
    assert order[2] == max((i for i in range(4) if i not in order[:2]), key=lambda i: (scores[i], -i))
