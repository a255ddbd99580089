"""MAPPO for LoRASA, CleanRL-style: recurrent actor (the serving forward, grouped per agent), shared
centralised critic on the global state, GAE, running value normalisation, PPO clip, entropy bonus.

Tensor layout: rollouts are stored agent-major, `[T, N, E, ...]` (time, agent, env), so each time step
is already the grouped batch `[N, E, D]` that `actor_forward` takes (chunk i = agent i). Env-level
quantities (team reward, value, done) are `[T, E]`. Training cuts time into chunks of length L and
treats every (chunk, env) pair as one sequence: `[L, N, Q, ...]` with Q = (T / L) * E.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lorasa_serve.distributions import (categorical_act, categorical_entropy, categorical_log_prob,
                                        gaussian_act, gaussian_entropy, gaussian_log_prob)
from lorasa_serve.network import actor_forward, slice_chunks

from .actor import Actor
from .config import PPOConfig
from .envs import EnvInfo, Step, VecEnv


# --- critic and value normalisation -------------------------------------------------------------
class Critic(nn.Module):
    """V(global state): LayerNorm -> [Linear -> ReLU -> LayerNorm] x 2 -> Linear(1). Shared by all agents."""

    def __init__(self, state_dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(state_dim),
                                 nn.Linear(state_dim, hidden), nn.ReLU(), nn.LayerNorm(hidden),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.LayerNorm(hidden),
                                 nn.Linear(hidden, 1))
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.orthogonal_(m.weight, 1.0 if m.out_features == 1 else 2 ** 0.5)
                nn.init.zeros_(m.bias)

    def forward(self, state: Tensor) -> Tensor:  # [..., S] -> [...] (normalised value)
        return self.net(state).squeeze(-1)


class ValueNorm:
    """Running mean / variance of value targets (parallel Welford); the critic predicts normalised values."""

    def __init__(self, eps: float = 1e-5):
        self.mean, self.var, self.count, self.eps = 0.0, 1.0, 0.0, eps

    def update(self, x: Tensor) -> None:
        n, m, v = x.numel(), float(x.mean()), float(x.var(unbiased=False))
        total = self.count + n
        delta = m - self.mean
        self.var = (self.var * self.count + v * n + delta ** 2 * self.count * n / total) / total
        self.mean += delta * n / total
        self.count = total

    def normalize(self, x: Tensor) -> Tensor:
        return (x - self.mean) / (self.var + self.eps) ** 0.5

    def denormalize(self, x: Tensor) -> Tensor:
        return x * (self.var + self.eps) ** 0.5 + self.mean

    def to_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load(self, d: dict) -> None:
        self.mean, self.var, self.count = float(d["mean"]), float(d["var"]), float(d["count"])


# --- GAE ----------------------------------------------------------------------------------------
def gae(rewards: Tensor, values: Tensor, last_value: Tensor, ends: Tensor, gamma: float,
        lam: float, trace: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """rewards, values, ends [T, E]; last_value [E] -> (advantages, returns) [T, E].

    `ends[t]` marks an episode that ended with step t (no bootstrapping across it; truncated episodes
    have their bootstrap value already added to the reward). `trace` [T, E] (A2PO's off-policy
    correction, Retrace-style): A_t = sum_l (gamma lam)^l (c_{t+1} ... c_{t+l}) delta_{t+l}.
    """
    T = rewards.shape[0]
    adv = torch.zeros_like(rewards)
    running = torch.zeros_like(last_value)
    for t in reversed(range(T)):
        next_value = last_value if t == T - 1 else values[t + 1]
        live = 1.0 - ends[t].float()
        delta = rewards[t] + gamma * next_value * live - values[t]
        if trace is not None and t < T - 1:
            running = running * trace[t + 1]
        running = delta + gamma * lam * live * running
        adv[t] = running
    return adv, adv + values


# --- acting -------------------------------------------------------------------------------------
@dataclass
class Policy:
    """Everything needed to act: the actor and the per-agent masks of the task."""

    actor: Actor
    info: EnvInfo
    dim_mask: Tensor  # [N, 1, A] bool: the agent's true action columns
    onehot: Tensor | None = None  # [N, 1, K] each agent's one-hot (specs with agent_onehot), else None

    @classmethod
    def build(cls, actor: Actor, info: EnvInfo) -> "Policy":
        spec, onehot = actor.spec, None
        if spec.agent_onehot:
            cols = torch.tensor([spec.onehot_index(i) for i in range(len(spec.agents))])
            onehot = torch.nn.functional.one_hot(cols, spec.agent_onehot).float().unsqueeze(1)
        return cls(actor, info, torch.as_tensor(info.dim_mask()).unsqueeze(1), onehot)

    def inputs(self, obs: Tensor, agents: slice = slice(None)) -> Tensor:
        """obs [n, Q, obs_max] of agents `agents` -> the actor's input [n, Q, input_width] (the agent
        one-hot appended when the spec has one; the same rule as the Engine's)."""
        if self.onehot is None:
            return obs
        oh = self.onehot[agents]  # [n, 1, K]
        return torch.cat([obs, oh.expand(-1, obs.shape[1], -1)], -1)

    def act(self, obs: Tensor, h: Tensor | None, reset: Tensor, avail: Tensor, deterministic: bool,
            g: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """obs [N, E, D], h [N, E, H], reset [N, E], avail [N, E, A] -> actions, log-probs [N, E], h'."""
        a = self.actor
        head, h_next = actor_forward(a.spec, a.params(), self.inputs(obs), h, reset)
        if a.spec.action == "gaussian":
            actions, logp = gaussian_act(head, a.log_std(), self.dim_mask, deterministic, g)
        else:
            actions, logp = categorical_act(head, avail & self.dim_mask, deterministic, g)
        return actions, logp, h_next

    def evaluate(self, obs: Tensor, h0: Tensor | None, reset: Tensor, avail: Tensor,
                 actions: Tensor, agents: slice = slice(None)) -> tuple[Tensor, Tensor]:
        """Sequences of the agents `agents` (n of them): obs [L, n, Q, D], h0 [n, Q, H], reset [L, n, Q]
        -> log-probs, entropies [L, n, Q]."""
        a = self.actor
        p, h, heads = slice_chunks(a.params(), agents), h0, []
        for t in range(obs.shape[0]):
            head, h = actor_forward(a.spec, p, self.inputs(obs[t], agents), h, reset[t])
            heads.append(head)
        head = torch.stack(heads)  # [L, n, Q, A]
        dim_mask = self.dim_mask[agents]
        if a.spec.action == "gaussian":
            log_std = a.log_std()
            log_std = log_std[agents] if a.per_agent_log_std else log_std  # [n, 1, A] or [A]
            logp = gaussian_log_prob(head, log_std, actions, dim_mask)
            ent = gaussian_entropy(log_std, dim_mask).expand_as(logp)
        else:
            valid = avail & dim_mask
            logp = categorical_log_prob(head, valid, actions)
            ent = categorical_entropy(head, valid)
        return logp, ent


def grouped(x: np.ndarray) -> Tensor:
    """env-major [E, N, ...] numpy -> agent-major [N, E, ...] tensor."""
    return torch.from_numpy(np.ascontiguousarray(np.swapaxes(x, 0, 1)))


def env_actions(actions: Tensor) -> np.ndarray:
    """[N, E, A] float or [N, E] int -> env-major numpy [E, N, ...]."""
    return np.swapaxes(actions.numpy(), 0, 1)


# --- rollout ------------------------------------------------------------------------------------
@dataclass
class Rollout:
    obs: Tensor  # [T, N, E, D]
    avail: Tensor  # [T, N, E, A] bool
    actions: Tensor  # [T, N, E, A] float or [T, N, E] int64
    logp: Tensor  # [T, N, E]
    h: Tensor | None  # [T, N, E, H]: actor state *before* step t (zeroed by reset[t] in the forward)
    reset: Tensor  # [T, E] bool: step t starts an episode
    state: Tensor  # [T, E, S]
    value: Tensor  # [T, E] (denormalised)
    reward: Tensor  # [T, E] (plus gamma * V(final state) on time-limit truncations)
    end: Tensor  # [T, E] bool: the episode ended with step t
    last_value: Tensor  # [E]


@dataclass
class Cursor:
    """Where the vector env is between rollouts."""

    step: Step
    h: Tensor | None  # [N, E, H]
    reset: Tensor  # [E] bool


ActFn = Callable[[Tensor, Tensor | None, Tensor, Tensor], tuple[Tensor, Tensor, Tensor | None]]
ROLLOUT_KEYS = ("obs", "avail", "actions", "logp", "h", "reset", "state", "reward", "end")


@dataclass
class Segment:
    """The acting part of T steps of E envs, before the critic (what a Ray rollout worker sends back)."""

    data: dict[str, Tensor | None]  # ROLLOUT_KEYS: agent-major [T, N, E, ...], env-level [T, E, ...], h None
    last_state: Tensor  # [E, S]: the state after the last step
    cuts: list[tuple[int, np.ndarray, np.ndarray]]  # time-limit truncations: (t, env indices, final states [k, S])
    episodes: list[tuple[int, int, float, int, float]]  # finished: (t, env, return, length, won), by (t, env)


def collect(venv: VecEnv, policy: Policy, critic: Critic, vnorm: ValueNorm, cur: Cursor, T: int,
            gamma: float, g: torch.Generator) -> tuple[Rollout, Cursor, list[tuple[float, int, float]]]:
    """T steps of every env. Returns the rollout, the new cursor and finished episodes (return, length, won)."""
    seg, cur = act_segment(venv, policy, cur, T, g)
    ro, episodes = finish_rollout(seg, critic, vnorm, gamma)
    return ro, cur, episodes


def act_segment(venv: VecEnv, policy: Policy, cur: Cursor, T: int, g: torch.Generator | None,
                act: ActFn | None = None) -> tuple[Segment, Cursor]:
    """T acting steps of every env of `venv`; `act(obs, h, reset, avail)` [N, E, ...] -> (actions, logp, h')
    defaults to sampling from `policy` with generator `g`."""
    bufs: dict[str, list] = {k: [] for k in ROLLOUT_KEYS}
    episodes, cuts = [], []
    step, h, reset = cur.step, cur.h, cur.reset
    N = policy.info.n_agents
    if act is None:
        def act(obs, h, reset, avail):
            return policy.act(obs, h, reset, avail, False, g)
    with torch.no_grad():
        for t in range(T):
            obs, avail, state = grouped(step.obs), grouped(step.avail), torch.from_numpy(step.state)
            actions, logp, h_next = act(obs, h, reset.expand(N, -1), avail)
            step = venv.step(env_actions(actions))
            trunc = step.done & ~step.terminated
            if trunc.any():
                idx = np.flatnonzero(trunc)
                cuts.append((t, idx, step.final_state[idx]))
            for k, v in (("obs", obs), ("avail", avail), ("actions", actions), ("logp", logp), ("h", h),
                         ("reset", reset), ("state", state), ("reward", torch.from_numpy(step.reward)),
                         ("end", torch.from_numpy(step.done))):
                bufs[k].append(v)
            episodes += [(t, int(e), float(step.ep_return[e]), int(step.ep_length[e]), float(step.ep_won[e]))
                         for e in np.flatnonzero(step.done)]
            h, reset = h_next, torch.from_numpy(step.done)
    data = {k: (None if v[0] is None else torch.stack(v)) for k, v in bufs.items()}
    return Segment(data, torch.from_numpy(step.state), cuts, episodes), Cursor(step, h, reset)


def finish_rollout(seg: Segment, critic: Critic, vnorm: ValueNorm,
                   gamma: float) -> tuple[Rollout, list[tuple[float, int, float]]]:
    """The critic's part: values of all T+1 states (one pass, the critic does not influence acting) and
    r + gamma * V(s_final) at each time-limit cut -> (rollout, finished episodes (return, length, won))."""
    data = dict(seg.data)
    with torch.no_grad():
        values = vnorm.denormalize(critic(torch.cat([data["state"], seg.last_state[None]])))
        reward = data.pop("reward").float()
        if seg.cuts:
            v_final = vnorm.denormalize(critic(torch.from_numpy(np.concatenate([c[2] for c in seg.cuts]))))
            k = 0
            for t, idx, _ in seg.cuts:
                reward[t, idx] += gamma * v_final[k:k + len(idx)]
                k += len(idx)
    episodes = [(r, n, w) for _, _, r, n, w in seg.episodes]
    return Rollout(**data, value=values[:-1], reward=reward, last_value=values[-1]), episodes


def concat_segments(segs: list[Segment], offsets: list[int]) -> Segment:
    """Segments of consecutive env slices (slice w starts at env offsets[w]) -> the segment of all envs,
    exactly as one `act_segment` over all of them would have recorded it (cuts and episodes by step, env)."""
    data = {k: None if segs[0].data[k] is None else
            torch.cat([s.data[k] for s in segs], dim=2 if k in AGENT_KEYS or k == "h" else 1)
            for k in ROLLOUT_KEYS}
    by_t: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    for s, off in zip(segs, offsets):
        for t, idx, fs in s.cuts:
            by_t.setdefault(t, []).append((idx + off, fs))
    cuts = [(t, np.concatenate([i for i, _ in v]), np.concatenate([f for _, f in v])) for t, v in sorted(by_t.items())]
    episodes = sorted(((t, e + off, r, n, w) for s, off in zip(segs, offsets) for t, e, r, n, w in s.episodes),
                      key=lambda x: (x[0], x[1]))
    return Segment(data, torch.cat([s.last_state for s in segs]), cuts, episodes)


# --- PPO update ---------------------------------------------------------------------------------
def from_sequences(x: Tensor, E: int) -> Tensor:
    """Inverse of `to_sequences(., L, 1)`: [L, Q, ...] with Q = K * E -> [T, E, ...], T = K * L."""
    L, Q = x.shape[:2]
    x = x.reshape(L, Q // E, E, *x.shape[2:])  # [L, K, E, ...]
    return x.transpose(0, 1).reshape(-1, E, *x.shape[3:])


def to_sequences(x: Tensor, L: int, env_dim: int) -> Tensor:
    """[T, ...] with the env axis at `env_dim` (1-based after T) -> [L, ..., Q] with Q = (T/L) * E
    replacing the env axis: sequence q = (chunk k, env e) holds steps k*L .. k*L+L-1 of env e."""
    T = x.shape[0]
    x = x.reshape(T // L, L, *x.shape[1:])  # [K, L, ...]
    x = x.movedim(0, env_dim)  # [L, ..., K, E, ...]
    return x.flatten(env_dim, env_dim + 1)


AGENT_KEYS = ("obs", "avail", "actions", "logp")  # [L, N, Q, ...]; the rest are [L, Q, ...]


@dataclass
class UpdateStats:
    policy_loss: float
    value_loss: float
    entropy: float
    approx_kl: float
    clip_frac: float


@dataclass
class Batch:
    """A rollout cut into GRU training sequences: agent-major `[L, N, Q, ...]`, env-level `[L, Q, ...]`."""

    seq: dict[str, Tensor]
    h0: Tensor | None  # [N, Q, H]: actor state at each sequence start

    @property
    def n_seq(self) -> int:
        return self.seq["adv"].shape[1]

    def minibatch(self, idx: Tensor) -> tuple[dict[str, Tensor], Tensor | None]:
        mb = {k: v[:, :, idx] if k in AGENT_KEYS else v[:, idx] for k, v in self.seq.items()}
        return mb, None if self.h0 is None else self.h0[:, idx]


def normalise(adv: Tensor) -> Tensor:
    return (adv - adv.mean()) / (adv.std() + 1e-8)


def make_batch(ro: Rollout, vnorm: ValueNorm, cfg: PPOConfig) -> Batch:
    """GAE, value-normaliser update, advantage normalisation, sequences of length `cfg.chunk`."""
    L = cfg.chunk
    adv, returns = gae(ro.reward, ro.value, ro.last_value, ro.end, cfg.gamma, cfg.gae_lambda)
    vnorm.update(returns)
    seq = {"obs": to_sequences(ro.obs, L, 2), "avail": to_sequences(ro.avail, L, 2),
           "actions": to_sequences(ro.actions, L, 2), "logp": to_sequences(ro.logp, L, 2),
           "state": to_sequences(ro.state, L, 1), "ret": to_sequences(vnorm.normalize(returns), L, 1),
           "v_old": to_sequences(vnorm.normalize(ro.value), L, 1), "adv": to_sequences(normalise(adv), L, 1),
           "reset": to_sequences(ro.reset, L, 1)}
    return Batch(seq, None if ro.h is None else to_sequences(ro.h, L, 2)[0])


def critic_step(critic: Critic, opt: torch.optim.Optimizer, mb: dict[str, Tensor], cfg: PPOConfig) -> float:
    """One clipped Huber value-loss step on normalised returns."""
    v = critic(mb["state"])  # [L, Qm] normalised
    v_clip = mb["v_old"] + (v - mb["v_old"]).clamp(-cfg.value_clip, cfg.value_clip)
    vl = torch.max(F.huber_loss(v, mb["ret"], reduction="none", delta=cfg.huber_delta),
                   F.huber_loss(v_clip, mb["ret"], reduction="none", delta=cfg.huber_delta)).mean()
    opt.zero_grad(set_to_none=True)
    (cfg.value_coef * vl).backward()
    nn.utils.clip_grad_norm_(critic.parameters(), cfg.max_grad_norm)
    opt.step()
    return float(vl.detach())


def ppo_update(policy: Policy, critic: Critic, vnorm: ValueNorm, ro: Rollout, cfg: PPOConfig,
               actor_opt: torch.optim.Optimizer, critic_opt: torch.optim.Optimizer,
               g: torch.Generator) -> UpdateStats:
    """MAPPO: every agent's clipped surrogate on the team advantage, all agents updated together."""
    batch = make_batch(ro, vnorm, cfg)
    N = ro.obs.shape[1]
    stats = []
    actor_params = list(policy.actor.trainable.values())
    for _ in range(cfg.epochs):
        perm = torch.randperm(batch.n_seq, generator=g)
        for idx in perm.chunk(cfg.minibatches):
            mb, h0 = batch.minibatch(idx)
            reset = mb["reset"].unsqueeze(1).expand(-1, N, -1)  # [L, N, Qm]
            logp, ent = policy.evaluate(mb["obs"], h0, reset, mb["avail"], mb["actions"])
            ratio = torch.exp(logp - mb["logp"])
            a = mb["adv"].unsqueeze(1)  # [L, 1, Qm]: the team advantage for every agent
            pl = -torch.min(ratio * a, ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * a).mean()
            entropy = ent.mean()
            actor_opt.zero_grad(set_to_none=True)
            (pl - cfg.entropy_coef * entropy).backward()
            nn.utils.clip_grad_norm_(actor_params, cfg.max_grad_norm)
            actor_opt.step()
            vl = critic_step(critic, critic_opt, mb, cfg)
            stats.append((float(pl.detach()), vl, float(entropy.detach()),
                          *ratio_stats(logp, mb["logp"], cfg.clip)))
    return UpdateStats(*np.mean(stats, axis=0).tolist())


def ratio_stats(logp: Tensor, old: Tensor, clip: float) -> tuple[float, float]:
    """(approx KL (k3 estimator), fraction of ratios outside the clip range)."""
    with torch.no_grad():
        lr = logp - old
        return float((lr.exp() - 1 - lr).mean()), float(((lr.exp() - 1).abs() > clip).float().mean())
