"""A2PO (Wang et al., "Order Matters: Agent-by-agent Policy Optimization", ICLR 2023) over the same
rollouts, actor and critic as MAPPO (`mappo.py`).

Within one update the agents are optimised one after another. Agent k, at position p (0-based) of the
order, after the agents P before it have been updated:
  * objective: PPO's clipped surrogate on  r_k * clip(prod_{i in P} r_i, 1 +- others_clip), the ratio
    product of the preceding agents' *current* policies (recomputed after every agent: with shared
    parameters one agent's update moves the others too); r_k is clipped at 1 +- eps_p (below);
  * advantage correction: GAE of the team reward with traces c_t = min(1, prod_{i in P} r_i(t))
    (off-policy correction for the preceding agents' change, Retrace-style), then normalised;
  * only agent k's rows are forwarded (its chunk of the grouped layout), and only its parameters move:
    rows of per-agent / per-group tensors that belong to other groups, and their Adam moments, are
    restored after each step (Adam's momentum would otherwise keep moving them on zero gradients).
The critic is trained on the usual MAPPO schedule.

Agent order (`--a2po.order`), from the authors' code (github.com/xihuai18/A2PO-ICLR2023,
onpolicy/algorithms/r_mappo/r_mappo.py `_get_agent_sequence`, strategy "semi_greedy", the default of
its onpolicy/config.py `--seq_strategy`):
  * semi_greedy: sort the agents by a score, largest first (ties: lower index first, Python's stable
    sort as there); then the order is built by alternating: the best-scored remaining agent, then a
    uniformly random one of the remaining agents, then the best remaining, then random, ...
    So positions 0, 2, 4, ... are greedy and positions 1, 3, 5, ... random.
  * random: a uniform permutation per update; fixed: 0, 1, ..., N-1.
  The reference score is mean_{t,e} |A_i / V_i| with a per-agent critic value V_i. Our critic is one
  V(s) for the team, so that score is the same number for every agent and the greedy part would never
  choose. We score agent k instead by how much of the team advantage its own action explains:
      score_k = | mean_{t,e} (A - mean A) (log pi_old(a_k | o_k) - mean log pi_old(a_k | o_k)) |,
  the covariance of the (normalised) advantage with the agent's action log-likelihood, i.e. the scalar
  part of the score-function policy gradient E[A grad log pi_k] (`agent_scores`). This substitution is
  ours; the sequence construction around it is the reference rule exactly.

Adaptive clip per position (`--a2po.adaptive-clip`, on by default; the authors' MuJoCo/GRF A2PO scripts
run with `--clip_param_tuner True`): the reference `near_linear` (onpolicy/algorithms/utils/
tune_constant.py) with agent_order = position + 1:
      eps_p = eps * (w * (p + 1) / N + (1 - w)),   w = --a2po.clip-weight (reference default 0.5),
so the first agent of the order clips tightest (eps * (1 - w + w / N)) and the last at eps: later
agents see the preceding agents' change already and may move further (`position_clip`).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from .actor import Actor
from .config import A2POConfig, PPOConfig
from .mappo import (Critic, Policy, Rollout, UpdateStats, ValueNorm, critic_step, from_sequences, gae,
                    make_batch, normalise, ratio_stats, to_sequences)


def semi_greedy_order(scores: list[float], g: torch.Generator) -> list[int]:
    """The reference semi-greedy sequence: best remaining, random remaining, best remaining, ..."""
    ranked = sorted(range(len(scores)), key=lambda i: -scores[i])  # stable: ties keep index order
    order: list[int] = []
    while ranked:
        order.append(ranked.pop(0))
        if ranked:
            order.append(ranked.pop(int(torch.randint(len(ranked), (1,), generator=g))))
    return order


def agent_order(n: int, how: str, g: torch.Generator, scores: list[float] | None = None) -> list[int]:
    if how == "random":
        return torch.randperm(n, generator=g).tolist()
    if how == "semi_greedy":
        if scores is None or len(scores) != n:
            raise ValueError(f"semi_greedy order needs one score per agent ({n})")
        return semi_greedy_order(scores, g)
    return list(range(n))


def position_clip(eps: float, pos: int, n: int, weight: float) -> float:
    """The reference `near_linear` clip of the agent at 0-based position `pos` of `n`."""
    return eps * (weight * (pos + 1) / n + (1.0 - weight))


def agent_scores(adv: Tensor, logp: Tensor) -> list[float]:
    """adv [L, Q], logp [L, N, Q] (behaviour log-probs) -> per agent |Cov(A, log pi_k)| over samples."""
    a = adv - adv.mean()
    lp = logp - logp.mean(dim=(0, 2), keepdim=True)
    return (a.unsqueeze(1) * lp).mean(dim=(0, 2)).abs().tolist()


def a2po_update(policy: Policy, critic: Critic, vnorm: ValueNorm, ro: Rollout, cfg: PPOConfig,
                a2: A2POConfig, actor_opt: torch.optim.Optimizer, critic_opt: torch.optim.Optimizer,
                g: torch.Generator) -> UpdateStats:
    batch = make_batch(ro, vnorm, cfg)
    E = ro.reward.shape[1]
    value_losses = []
    for _ in range(cfg.epochs):
        for idx in torch.randperm(batch.n_seq, generator=g).chunk(cfg.minibatches):
            value_losses.append(critic_step(critic, critic_opt, batch.minibatch(idx)[0], cfg))
    log_prec = torch.zeros_like(batch.seq["adv"])  # [L, Q]: log prod of the preceding agents' ratios
    stats = []
    N = ro.obs.shape[1]
    scores = agent_scores(batch.seq["adv"], batch.seq["logp"]) if a2.order == "semi_greedy" else None
    order = agent_order(N, a2.order, g, scores)
    for pos, k in enumerate(order):
        clip = position_clip(cfg.clip, pos, N, a2.clip_weight) if a2.adaptive_clip else cfg.clip
        adv = batch.seq["adv"]  # [L, Q]
        if a2.trace and pos > 0:
            c = from_sequences(log_prec.exp().clamp(max=1.0), E)  # [T, E]
            a, _ = gae(ro.reward, ro.value, ro.last_value, ro.end, cfg.gamma, cfg.gae_lambda, trace=c)
            adv = to_sequences(normalise(a), cfg.chunk, 1)
        prec = log_prec.exp().clamp(1 - a2.others_clip, 1 + a2.others_clip)  # [L, Q]
        for _ in range(cfg.epochs):
            for idx in torch.randperm(batch.n_seq, generator=g).chunk(cfg.minibatches):
                stats.append(_agent_step(policy, batch, k, idx, adv[:, idx], prec[:, idx], clip, cfg,
                                         actor_opt))
        log_prec = _log_ratio_of(policy, batch, order[:pos + 1])
    s = np.mean(stats, axis=0)
    return UpdateStats(float(s[0]), float(np.mean(value_losses)), float(s[1]), float(s[2]), float(s[3]))


def _agent_step(policy: Policy, batch, k: int, idx: Tensor, adv: Tensor, prec: Tensor, clip: float,
                cfg: PPOConfig, opt: torch.optim.Optimizer) -> tuple[float, float, float, float]:
    """One minibatch step of agent k's surrogate (its own ratio clipped at 1 +- clip); adv, prec [L, Qm]."""
    mb, h0 = batch.minibatch(idx)
    sl = slice(k, k + 1)
    logp, ent = policy.evaluate(mb["obs"][:, sl], None if h0 is None else h0[sl], mb["reset"].unsqueeze(1),
                                mb["avail"][:, sl], mb["actions"][:, sl], agents=sl)
    logp, old = logp[:, 0], mb["logp"][:, k]  # [L, Qm]
    ratio = torch.exp(logp - old) * prec
    pl = -torch.min(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv).mean()
    entropy = ent.mean()
    opt.zero_grad(set_to_none=True)
    (pl - cfg.entropy_coef * entropy).backward()
    nn.utils.clip_grad_norm_(list(policy.actor.trainable.values()), cfg.max_grad_norm)
    step_only_agent(opt, policy.actor, k)
    return (float(pl.detach()), float(entropy.detach()), *ratio_stats(logp, old, clip))


def step_only_agent(opt: torch.optim.Optimizer, actor: Actor, k: int) -> None:
    """`opt.step()`, then put back the rows of per-group tensors outside agent k's group (values and
    optimiser moments): shared tensors move, other agents' own parameters do not."""
    saved = []
    for name, rows in actor.group_rows().items():
        others = torch.unique(rows[rows != rows[k]])
        if others.numel():
            p = actor.trainable[name]
            state = {s: v[others].clone() for s, v in opt.state.get(p, {}).items()
                     if torch.is_tensor(v) and v.dim() > 0}
            saved.append((p, others, p.detach()[others].clone(), state))
    opt.step()
    with torch.no_grad():
        for p, rows, value, state in saved:
            p[rows] = value
            for s, v in state.items():
                opt.state[p][s][rows] = v


def _log_ratio_of(policy: Policy, batch, agents: list[int]) -> Tensor:
    """sum over `agents` of log(pi_now / pi_old) on the whole batch -> [L, Q]."""
    s = batch.seq
    N = s["obs"].shape[1]
    with torch.no_grad():
        reset = s["reset"].unsqueeze(1).expand(-1, N, -1)
        logp, _ = policy.evaluate(s["obs"], batch.h0, reset, s["avail"], s["actions"])
        return (logp - s["logp"])[:, agents].sum(1)
