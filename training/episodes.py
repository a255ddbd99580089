"""Run whole episodes of a policy in a vector env and summarise them (used by training's periodic
evaluation and by `lorasa-eval`). Every env contributes exactly its first episode (no bias towards
short episodes); recurrent state is carried per env and reset at episode starts."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .envs import VecEnv

# (obs [E, N, D], avail [E, N, A], state [E, N, H] | None, reset [E] bool) -> (actions [E, N, ...], state')
ActFn = Callable[[np.ndarray, np.ndarray, object, np.ndarray], tuple[np.ndarray, object]]


@dataclass
class EpisodeStats:
    episodes: int
    mean_return: float
    std_return: float
    mean_length: float
    win_rate: float  # nan when the task has no win condition
    returns: list[float]

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in self.__dict__.items()}


def run_episodes(venv: VecEnv, act: ActFn, seed: int, max_steps: int | None = None) -> EpisodeStats:
    """One episode in each of the venv's envs."""
    E = venv.n_envs
    step = venv.reset(seed)
    ret, length, won = np.full(E, np.nan), np.zeros(E), np.full(E, np.nan)
    finished = np.zeros(E, bool)
    state, reset = None, np.ones(E, bool)
    limit = max_steps or 100 * max(venv.info.episode_limit, 1)
    for _ in range(limit):
        actions, state = act(step.obs, step.avail, state, reset)
        step = venv.step(actions)
        new = step.done & ~finished
        ret[new], length[new], won[new] = step.ep_return[new], step.ep_length[new], step.ep_won[new]
        finished |= step.done
        reset = step.done
        if finished.all():
            break
    if not finished.all():
        raise RuntimeError(f"{int((~finished).sum())} of {E} episodes did not finish in {limit} steps")
    wins = won[~np.isnan(won)]
    return EpisodeStats(E, float(ret.mean()), float(ret.std()), float(length.mean()),
                        float(wins.mean()) if len(wins) else float("nan"), ret.tolist())


def random_act(info, seed: int) -> ActFn:
    """Uniform random actions: Gaussian tasks in [-1, 1], Categorical tasks over available actions."""
    rng = np.random.default_rng(seed)
    dim_mask = info.dim_mask()

    def act(obs, avail, state, reset):
        E, N = obs.shape[:2]
        if info.action == "gaussian":
            return rng.uniform(-1, 1, (E, N, info.act_max)) * dim_mask, None
        u = rng.random(avail.shape) * (avail & dim_mask)  # argmax of uniform noise over valid actions
        return u.argmax(-1), None

    return act
