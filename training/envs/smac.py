"""Optional adapter for the real SMAC (`smac.env.StarCraft2Env`, oxwhirl's package installed from its
git repository, which needs StarCraft II). Never the unrelated PyPI package named `smac`.

The constructor and `get_env_info()` work without the game; `reset()` launches StarCraft II.
"""
from __future__ import annotations

import numpy as np

from .base import EnvConfig, EnvInfo, EnvUnavailableError, Transition, pad_obs

INSTALL_HINT = ("the real SMAC needs StarCraft II and oxwhirl's smac "
                "(pip install git+https://github.com/oxwhirl/smac.git; never the PyPI package 'smac')")


def import_starcraft2env():
    try:
        from smac.env import StarCraft2Env  # type: ignore[import-not-found]
    except ImportError as e:
        raise EnvUnavailableError(f"SMAC is not installed: {INSTALL_HINT} ({e})") from None
    return StarCraft2Env


class SMACEnv:
    def __init__(self, cfg: EnvConfig, seed: int = 0):
        cls = import_starcraft2env()
        kw = {"episode_limit": cfg.episode_limit} if cfg.episode_limit > 0 else {}
        self.env = cls(map_name=cfg.scenario, seed=seed, **kw)
        ei = self.env.get_env_info()
        n = int(ei["n_agents"])
        self.info = EnvInfo(cfg.name, tuple(f"agent_{i}" for i in range(n)), (int(ei["obs_shape"]),) * n,
                            (int(ei["n_actions"]),) * n, int(ei["state_shape"]), "categorical",
                            int(ei["episode_limit"]))

    def _pack(self, reward=0.0, terminated=False, truncated=False, won=float("nan")) -> Transition:
        obs = pad_obs([np.asarray(o, np.float32) for o in self.env.get_obs()], self.info.obs_max)
        avail = np.asarray(self.env.get_avail_actions(), bool)
        return Transition(obs, np.asarray(self.env.get_state(), np.float32), avail, reward,
                          terminated, truncated, won)

    def reset(self, seed: int | None) -> Transition:
        self.env.reset()
        return self._pack()

    def step(self, actions: np.ndarray) -> Transition:
        reward, terminated, info = self.env.step([int(a) for a in actions])
        truncated = bool(info.get("episode_limit", False))
        won = float(bool(info.get("battle_won", False))) if terminated else float("nan")
        return self._pack(float(reward), bool(terminated) and not truncated, truncated, won)

    def close(self) -> None:
        self.env.close()
