"""A synthetic env whose every step costs a fixed wall time (it sleeps), standing for a heavy simulator: the
Ray scaling benchmark and the rollout-worker tests. Dynamics are cheap and deterministic given the reset
seed: obs_{t+1} = 0.9 obs_t + 0.1 tanh(actions padded / cut to obs size) + noise; reward -mean(a^2);
time-limit truncation after `episode_limit` steps.

    factory = FixedCost(step_s=0.002)          # picklable EnvFactory: factory(cfg, index) -> SingleEnv
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .base import EnvConfig, EnvInfo, Transition


@dataclass(frozen=True)
class FixedCost:
    step_s: float = 0.002  # wall time of one step
    n_agents: int = 2
    obs_dim: int = 8
    act_dim: int = 3
    state_dim: int = 12
    episode_limit: int = 50

    def __call__(self, cfg: EnvConfig, index: int = 0) -> "FixedCostEnv":
        return FixedCostEnv(self)


class FixedCostEnv:
    def __init__(self, spec: FixedCost):
        self.spec = spec
        n = spec.n_agents
        self.info = EnvInfo(f"fixed_cost {spec.step_s * 1e3:g}ms", tuple(f"agent_{i}" for i in range(n)),
                            (spec.obs_dim,) * n, (spec.act_dim,) * n, spec.state_dim, "gaussian",
                            spec.episode_limit)
        self.rng = np.random.default_rng(0)
        self.obs = np.zeros((n, spec.obs_dim), np.float32)
        self.t = 0

    def _transition(self, reward: float = 0.0, truncated: bool = False) -> Transition:
        s = self.spec
        state = np.resize(self.obs.reshape(-1), s.state_dim).astype(np.float32)
        return Transition(self.obs.copy(), state, np.ones((s.n_agents, s.act_dim), bool), reward, False,
                          truncated, float("nan"))

    def reset(self, seed: int | None) -> Transition:
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        self.obs = self.rng.standard_normal(self.obs.shape).astype(np.float32)
        self.t = 0
        return self._transition()

    def step(self, actions: np.ndarray) -> Transition:
        """actions [N, act_dim] float."""
        time.sleep(self.spec.step_s)
        a = np.asarray(actions, np.float32)
        push = np.resize(np.tanh(a), self.obs.shape) if a.size else 0.0
        noise = 0.05 * self.rng.standard_normal(self.obs.shape)
        self.obs = (0.9 * self.obs + 0.1 * push + noise).astype(np.float32)
        self.t += 1
        return self._transition(-float(np.mean(a * a)), truncated=self.t >= self.spec.episode_limit)

    def close(self) -> None:
        pass
