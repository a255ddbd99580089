"""MaMuJoCo (gymnasium-robotics `mamujoco_v1`) as a `SingleEnv`: any scenario / agent_conf / agent_obsk."""
from __future__ import annotations

import contextlib
import io
import logging
import warnings

import numpy as np

from lorasa_serve.protocol import pad_obs

from .base import EnvConfig, EnvInfo, EnvUnavailableError, Transition, UnknownTaskError


log = logging.getLogger(__name__)
KNOWN_MODEL_WARNINGS = ("compiler attribute 'settotalmass' is deprecated",)  # in gymnasium's own XML


def _route_mujoco_warnings() -> None:
    """MuJoCo's default warning handler prints and appends to MUJOCO_LOG.TXT in the working directory;
    send its warnings to Python logging instead (unless the user installed a handler)."""
    import mujoco
    if mujoco.get_mju_user_warning() is None:
        mujoco.set_mju_user_warning(lambda msg: log.log(
            logging.DEBUG if msg.startswith(KNOWN_MODEL_WARNINGS) else logging.WARNING, "MuJoCo: %s", msg))


class MaMuJoCoEnv:
    def __init__(self, cfg: EnvConfig):
        try:
            # the import prints a Farama notice about the Adroit hand envs (not used here) to stderr
            with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                from gymnasium_robotics import mamujoco_v1
        except ImportError as e:
            raise EnvUnavailableError(f"MaMuJoCo needs gymnasium-robotics and mujoco "
                                      f"(pip install -e '.[mujoco]'): {e}") from None
        _route_mujoco_warnings()
        kw = {"max_episode_steps": cfg.episode_limit} if cfg.episode_limit > 0 else {}
        try:
            self.env = mamujoco_v1.parallel_env(cfg.scenario, cfg.agent_conf,
                                                agent_obsk=cfg.agent_obsk, **kw)
        except Exception as e:  # gymnasium-robotics raises bare Exception for unknown configs
            raise UnknownTaskError(f"MaMuJoCo cannot build {cfg.scenario} {cfg.agent_conf!r}: {e}; pass a "
                                   "scenario and agent_conf that gymnasium_robotics.mamujoco_v1 knows "
                                   "(--env.scenario HalfCheetah --env.agent-conf 2x3)") from None
        self.agents = list(self.env.possible_agents)
        spaces = [self.env.action_space(a) for a in self.agents]
        self.low = [s.low.astype(np.float32) for s in spaces]
        self.high = [s.high.astype(np.float32) for s in spaces]
        obs_dims = tuple(int(self.env.observation_space(a).shape[0]) for a in self.agents)
        act_dims = tuple(int(s.shape[0]) for s in spaces)
        self.info = EnvInfo(cfg.name, tuple(self.agents), obs_dims, act_dims,
                            self._state_dim(), "gaussian",
                            cfg.episode_limit)
        self._avail = np.ones((len(self.agents), self.info.act_max), bool)

    def _state_dim(self) -> int:
        self.env.reset(seed=0)
        return int(np.asarray(self.env.state()).shape[0])

    def _pack(self, obs: dict, reward: float = 0.0, terminated: bool = False,
              truncated: bool = False) -> Transition:
        o = pad_obs([np.asarray(obs[a], np.float32) for a in self.agents], self.info.obs_max)
        return Transition(o, np.asarray(self.env.state(), np.float32), self._avail, reward,
                          terminated, truncated, float("nan"))

    def reset(self, seed: int | None) -> Transition:
        obs, _ = self.env.reset(seed=seed)
        return self._pack(obs)

    def step(self, actions: np.ndarray) -> Transition:
        """actions [N, act_max]: each agent's first act_dim columns, clipped to the action box."""
        act = {a: np.clip(actions[i, :len(lo)], lo, hi)
               for i, (a, lo, hi) in enumerate(zip(self.agents, self.low, self.high))}
        obs, rew, term, trunc, _ = self.env.step(act)
        a0 = self.agents[0]
        return self._pack(obs, float(rew[a0]), bool(term[a0]), bool(trunc[a0]) and not bool(term[a0]))

    def close(self) -> None:
        self.env.close()
