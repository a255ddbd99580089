"""A2PO (Wang et al., "Order Matters: Agent-by-agent Policy Optimization", ICLR 2023) over the same
rollouts, actor and critic as MAPPO (`mappo.py`).

Within one update the agents are optimised one after another (order: a random permutation, or fixed).
Agent k, after the agents P before it have been updated:
  * objective: PPO's clipped surrogate on  r_k * clip(prod_{i in P} r_i, 1 +- others_clip), the ratio
    product of the preceding agents' *current* policies (recomputed after every agent: with shared
    parameters one agent's update moves the others too);
  * advantage correction: GAE of the team reward with traces c_t = min(1, prod_{i in P} r_i(t))
    (off-policy correction for the preceding agents' change, Retrace-style), then normalised;
  * only agent k's rows are forwarded (its chunk of the grouped layout), and only its parameters move:
    rows of per-agent / per-group tensors that belong to other groups, and their Adam moments, are
    restored after each step (Adam's momentum would otherwise keep moving them on zero gradients).
The critic is trained on the usual MAPPO schedule. Not implemented: A2PO's semi-greedy agent order and
its per-position adaptive clip; both are refinements on top of the sequential scheme.
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


def agent_order(n: int, how: str, g: torch.Generator) -> list[int]:
    return torch.randperm(n, generator=g).tolist() if how == "random" else list(range(n))


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
    order = agent_order(ro.obs.shape[1], a2.order, g)
    for pos, k in enumerate(order):
        adv = batch.seq["adv"]  # [L, Q]
        if a2.trace and pos > 0:
            c = from_sequences(log_prec.exp().clamp(max=1.0), E)  # [T, E]
            a, _ = gae(ro.reward, ro.value, ro.last_value, ro.end, cfg.gamma, cfg.gae_lambda, trace=c)
            adv = to_sequences(normalise(a), cfg.chunk, 1)
        prec = log_prec.exp().clamp(1 - a2.others_clip, 1 + a2.others_clip)  # [L, Q]
        for _ in range(cfg.epochs):
            for idx in torch.randperm(batch.n_seq, generator=g).chunk(cfg.minibatches):
                stats.append(_agent_step(policy, batch, k, idx, adv[:, idx], prec[:, idx], cfg, actor_opt))
        log_prec = _log_ratio_of(policy, batch, order[:pos + 1])
    s = np.mean(stats, axis=0)
    return UpdateStats(float(s[0]), float(np.mean(value_losses)), float(s[1]), float(s[2]), float(s[3]))


def _agent_step(policy: Policy, batch, k: int, idx: Tensor, adv: Tensor, prec: Tensor, cfg: PPOConfig,
                opt: torch.optim.Optimizer) -> tuple[float, float, float, float]:
    """One minibatch step of agent k's surrogate; adv, prec [L, Qm]."""
    mb, h0 = batch.minibatch(idx)
    sl = slice(k, k + 1)
    logp, ent = policy.evaluate(mb["obs"][:, sl], None if h0 is None else h0[sl], mb["reset"].unsqueeze(1),
                                mb["avail"][:, sl], mb["actions"][:, sl], agents=sl)
    logp, old = logp[:, 0], mb["logp"][:, k]  # [L, Qm]
    ratio = torch.exp(logp - old) * prec
    pl = -torch.min(ratio * adv, ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * adv).mean()
    entropy = ent.mean()
    opt.zero_grad(set_to_none=True)
    (pl - cfg.entropy_coef * entropy).backward()
    nn.utils.clip_grad_norm_(list(policy.actor.trainable.values()), cfg.max_grad_norm)
    step_only_agent(opt, policy.actor, k)
    return (float(pl.detach()), float(entropy.detach()), *ratio_stats(logp, old, cfg.clip))


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
