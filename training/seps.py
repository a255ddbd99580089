"""SePS's agent clustering (Christianos et al., ICML 2021), in a light form.

SePS trains an encoder of each agent's transitions (obs, action -> next obs, reward) on data from a
short random-policy probe and clusters the agents' embeddings with k-means; agents in one cluster share
one network. Here the per-agent model is a ridge-regularised *linear* one, `[obs_i, act_i, 1] @ W_i ->
[next obs_i - obs_i, reward]` on globally standardised features, and the embedding is `W_i` flattened.
Agents whose observations respond the same way to their actions land together (e.g. symmetric legs).
"""
from __future__ import annotations

import numpy as np

from .envs import VecEnv
from .episodes import random_act


def probe_transitions(venv: VecEnv, steps: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`steps` random-action steps of every env -> obs [K, N, D], act [K, N, A], next obs [K, N, D],
    reward [K] over the K transitions that did not end an episode (their next obs is in the same one)."""
    info = venv.info
    act_fn = random_act(info, seed)
    step = venv.reset(seed)
    obs, acts, nxt, rew = [], [], [], []
    for _ in range(steps):
        a, _ = act_fn(step.obs, step.avail, None, np.zeros(venv.n_envs, bool))
        new = venv.step(a)
        if info.action == "categorical":
            a = np.eye(info.act_max, dtype=np.float32)[a]  # as features: one-hot [E, N, A]
        live = ~new.done
        obs.append(step.obs[live]), acts.append(a[live]), nxt.append(new.obs[live]), rew.append(new.reward[live])
        step = new
    return np.concatenate(obs), np.concatenate(acts), np.concatenate(nxt), np.concatenate(rew)


def agent_embeddings(obs: np.ndarray, act: np.ndarray, nxt: np.ndarray, rew: np.ndarray,
                     ridge: float = 1e-2) -> np.ndarray:
    """Per-agent linear transition models, flattened: [N, (D + A + 1) * (D + 1)]."""
    K, N, D = obs.shape
    mu, sd = obs.reshape(-1, D).mean(0), obs.reshape(-1, D).std(0) + 1e-6  # shared by all agents
    delta = (nxt - obs) / sd
    dmu, dsd = delta.reshape(-1, D).mean(0), delta.reshape(-1, D).std(0) + 1e-6
    r = ((rew - rew.mean()) / (rew.std() + 1e-6))[:, None]  # [K, 1]
    out = []
    for i in range(N):
        x = np.concatenate([(obs[:, i] - mu) / sd, act[:, i], np.ones((K, 1))], axis=1)  # [K, D+A+1]
        y = np.concatenate([(delta[:, i] - dmu) / dsd, r], axis=1)  # [K, D+1]
        w = np.linalg.solve(x.T @ x + ridge * K * np.eye(x.shape[1]), x.T @ y)
        out.append(w.reshape(-1))
    return np.stack(out)


def kmeans(x: np.ndarray, k: int, seed: int, restarts: int = 16, iters: int = 100) -> np.ndarray:
    """k-means++ with restarts (the lowest inertia wins) -> labels [N], renumbered by first appearance."""
    n = len(x)
    if k >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    best, best_inertia = None, np.inf
    for _ in range(restarts):
        centers = [x[rng.integers(n)]]
        for _ in range(1, k):
            d2 = np.min([((x - c) ** 2).sum(1) for c in centers], axis=0)
            centers.append(x[rng.choice(n, p=d2 / d2.sum())] if d2.sum() > 0 else x[rng.integers(n)])
        c = np.stack(centers)
        for _ in range(iters):
            labels = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
            new = np.stack([x[labels == j].mean(0) if (labels == j).any() else c[j] for j in range(k)])
            if np.allclose(new, c):
                break
            c = new
        inertia = ((x - c[labels]) ** 2).sum()
        if len(set(labels.tolist())) == k and inertia < best_inertia:
            best, best_inertia = labels, inertia
    if best is None:
        raise ValueError(f"k-means could not find {k} non-empty clusters among {n} agents")
    return renumber(best)


def renumber(labels) -> np.ndarray:
    """Groups numbered 0, 1, ... in order of first appearance (a canonical form for comparisons)."""
    seen: dict[int, int] = {}
    return np.array([seen.setdefault(int(v), len(seen)) for v in labels])


def cluster_agents(venv: VecEnv, k: int, probe_steps: int, seed: int) -> tuple[int, ...]:
    obs, act, nxt, rew = probe_transitions(venv, probe_steps, seed)
    return tuple(int(v) for v in kmeans(agent_embeddings(obs, act, nxt, rew), k, seed))
