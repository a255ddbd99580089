"""Where the trainer's rollouts come from (`--env.backend`): the vector env in this process (`local`: its
envs stepped here or in subprocesses, the actor acting here) or Ray actors across a cluster (`ray`,
training/ray_rollouts.py: each worker steps its share of the envs and acts with its own CPU copy of the
actor). Both give the learner the same `Rollout`; with the same seed and number of envs, the same one.

    src = make_rollouts(cfg.env)
    cur = src.start(seed, h0)                       # fresh episodes in every env
    ro, cur, episodes = src.collect(policy, critic, vnorm, cur, T, gamma, g)
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from .envs import EnvConfig, EnvInfo, make_vec_env
from .envs.vector import EnvFactory, SerialVecEnv, SubprocVecEnv
from .mappo import Critic, Cursor, Policy, Rollout, ValueNorm, collect


class Rollouts(Protocol):
    info: EnvInfo
    n_envs: int

    def start(self, seed: int, h0: Tensor | None) -> Cursor: ...

    def collect(self, policy: Policy, critic: Critic, vnorm: ValueNorm, cur: Cursor, T: int, gamma: float,
                g: torch.Generator) -> tuple[Rollout, Cursor, list[tuple[float, int, float]]]: ...

    def close(self) -> None: ...


class LocalRollouts:
    """The in-process backend: `mappo.collect` over the config's vector env."""

    def __init__(self, cfg: EnvConfig, factory: EnvFactory | None = None):
        if factory is None:
            self.venv = make_vec_env(cfg)
        else:
            self.venv = SerialVecEnv(cfg, factory, cfg.n_envs) if cfg.workers <= 0 else \
                SubprocVecEnv(cfg, factory, cfg.n_envs, cfg.workers)
        self.info, self.n_envs = self.venv.info, self.venv.n_envs

    def start(self, seed: int, h0: Tensor | None) -> Cursor:
        return Cursor(self.venv.reset(seed), h0, torch.ones(self.n_envs, dtype=torch.bool))

    def collect(self, policy, critic, vnorm, cur, T, gamma, g):
        return collect(self.venv, policy, critic, vnorm, cur, T, gamma, g)

    def close(self) -> None:
        self.venv.close()


def make_rollouts(cfg: EnvConfig, factory: EnvFactory | None = None) -> Rollouts:
    """The backend `cfg.backend` names; `factory` replaces the config's envs (benchmarks, tests)."""
    if cfg.backend == "ray":
        from .ray_rollouts import RayRollouts
        return RayRollouts(cfg) if factory is None else RayRollouts(cfg, factory)
    return LocalRollouts(cfg, factory)
