"""One small multi-agent interface for every environment the trainer and evaluator run.

A *vector* env steps E environments at once and auto-resets them. All arrays are numpy, batched over
envs, with agents in a fixed order (`EnvInfo.agent_ids`), observations zero-padded to `obs_max`:

    step = venv.reset(seed)                    # Step (reward/done fields all zero)
    step = venv.step(actions)                  # actions [E, N, act_max] float (Gaussian) or [E, N] int
    step.obs [E, N, obs_max]  step.state [E, S]  step.avail [E, N, act_max]
    step.reward [E]  step.done [E]  step.terminated [E]  step.final_state [E, S]
    step.ep_return [E]  step.ep_length [E]  step.ep_won [E]     # valid where done

When `done[e]`, obs/state/avail already belong to env e's next episode; `final_state[e]` is the state the
finished episode stopped in (used to bootstrap the value of a time-limit truncation, `done & ~terminated`).
Rewards are the team reward (MaMuJoCo and SMAX give every agent the same reward).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from lorasa_serve.errors import LorasaError


class EnvUnavailableError(LorasaError, RuntimeError):
    """An environment's package (or game) is not installed on this machine (the message names the
    install command; a CLI prints it as one line, exit 2)."""


class UnknownTaskError(LorasaError, ValueError):
    """The environment package has no such scenario / map / agent partition (a user error)."""


@dataclass(frozen=True)
class EnvConfig:
    """Which environment to run. Written to `env.json` beside a policy so `lorasa-eval` can rebuild it."""

    kind: Literal["mamujoco", "smax", "smac"] = "mamujoco"  # the environment package
    scenario: str = "HalfCheetah"  # MaMuJoCo scenario, or SMAX / SMAC map name (e.g. 3s5z)
    agent_conf: str = "2x3"  # MaMuJoCo only: the agent partition, e.g. 2x3 or 9|8
    agent_obsk: int = 1  # MaMuJoCo only: agents observe joints up to this many hops away
    episode_limit: int = 1000  # MaMuJoCo: max_episode_steps; SMAX: max_steps; SMAC: only lowers the map's
    n_envs: int = 8  # environments stepped together
    workers: int = 2  # subprocesses for MaMuJoCo/SMAC (0: step in this process); SMAX uses JAX vmap
    # where rollouts run: local (this process, `workers` env subprocesses, the actor acting here) or ray
    # (`workers` Ray actors across the cluster, each stepping its share of the envs and acting with its own
    # CPU copy of the actor; weights go out once per update; lorasa-serve[ray], training/ray_rollouts.py)
    backend: Literal["local", "ray"] = "local"
    ray_address: str = "auto"  # --env.backend ray: the cluster (auto, host:port of `ray start`, local)
    # --env.backend ray: each worker acts at the whole batch's shape (its envs' rows in place, zeros
    # elsewhere), so trajectories equal the local backend's bit for bit; False: on its own rows only, with
    # its own seeded generator (less acting work per worker; the same distribution, other samples)
    ray_exact: bool = True

    @property
    def name(self) -> str:
        if self.kind == "mamujoco":
            return f"{self.scenario} {self.agent_conf}"
        return f"{self.kind} {self.scenario}"

    def env_block(self) -> dict:
        """What identifies the task (no parallelism settings)."""
        return {"kind": self.kind, "scenario": self.scenario, "agent_conf": self.agent_conf,
                "agent_obsk": self.agent_obsk, "episode_limit": self.episode_limit}


@dataclass(frozen=True)
class EnvInfo:
    name: str
    agent_ids: tuple[str, ...]
    obs_dims: tuple[int, ...]
    act_dims: tuple[int, ...]
    state_dim: int
    action: Literal["gaussian", "categorical"]
    episode_limit: int

    @property
    def n_agents(self) -> int:
        return len(self.agent_ids)

    @property
    def obs_max(self) -> int:
        return max(self.obs_dims)

    @property
    def act_max(self) -> int:
        return max(self.act_dims)

    def agent_specs(self) -> tuple:
        from lorasa_serve import AgentSpec  # lazy: env worker processes never import torch
        return tuple(AgentSpec(a, o, d) for a, o, d in zip(self.agent_ids, self.obs_dims, self.act_dims))

    def dim_mask(self) -> np.ndarray:
        """[N, act_max] bool: which action columns each agent really has."""
        return np.arange(self.act_max)[None, :] < np.asarray(self.act_dims)[:, None]


@dataclass
class Step:
    obs: np.ndarray  # [E, N, obs_max] float32
    state: np.ndarray  # [E, S] float32
    avail: np.ndarray  # [E, N, act_max] bool
    reward: np.ndarray  # [E] float32
    done: np.ndarray  # [E] bool
    terminated: np.ndarray  # [E] bool
    final_state: np.ndarray  # [E, S] float32
    ep_return: np.ndarray  # [E] float64 (valid where done)
    ep_length: np.ndarray  # [E] int64 (valid where done)
    ep_won: np.ndarray  # [E] float32: 1/0 (SMAX, SMAC), nan when the task has no win condition


class VecEnv(Protocol):
    info: EnvInfo
    n_envs: int

    def reset(self, seed: int) -> Step: ...

    def step(self, actions: np.ndarray) -> Step: ...

    def close(self) -> None: ...


@dataclass
class Transition:
    """One step of one single (non-vector) env, before auto-reset."""

    obs: np.ndarray  # [N, obs_max]
    state: np.ndarray  # [S]
    avail: np.ndarray  # [N, act_max] bool
    reward: float
    terminated: bool
    truncated: bool
    won: float  # 1/0, nan if no win condition


class SingleEnv(Protocol):
    """One environment instance; the vector envs in `vector.py` batch and auto-reset these."""

    info: EnvInfo

    def reset(self, seed: int | None) -> Transition: ...

    def step(self, actions: np.ndarray) -> Transition: ...  # [N, act_max] float or [N] int

    def close(self) -> None: ...
