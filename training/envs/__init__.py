"""Multi-agent environments behind one interface (see `base.py`): MaMuJoCo, SMAX, real SMAC."""
from __future__ import annotations

from .base import (EnvConfig, EnvInfo, EnvUnavailableError, SingleEnv, Step, Transition, UnknownTaskError,
                   VecEnv)

__all__ = ["EnvConfig", "EnvInfo", "EnvUnavailableError", "SingleEnv", "Step", "Transition", "UnknownTaskError",
           "VecEnv", "make_single", "make_vec_env"]


def make_single(cfg: EnvConfig, index: int = 0) -> SingleEnv:
    """One (non-vector) env of a MaMuJoCo or SMAC task; top-level so worker processes can pickle it."""
    if cfg.kind == "mamujoco":
        from .mamujoco import MaMuJoCoEnv
        return MaMuJoCoEnv(cfg)
    if cfg.kind == "smac":
        from .smac import SMACEnv
        return SMACEnv(cfg, seed=index)
    raise ValueError(f"no single-env adapter for kind {cfg.kind!r} (SMAX is vectorised with JAX)")


def make_vec_env(cfg: EnvConfig, n_envs: int | None = None, workers: int | None = None) -> VecEnv:
    """The vector env for `cfg` (n_envs / workers default to the config's)."""
    n = cfg.n_envs if n_envs is None else n_envs
    w = cfg.workers if workers is None else workers
    if n < 1:
        raise ValueError("n_envs must be >= 1")
    if cfg.kind == "smax":
        from .smax import SmaxVecEnv
        return SmaxVecEnv(cfg, n)
    if cfg.kind not in ("mamujoco", "smac"):
        raise ValueError(f"unknown env kind {cfg.kind!r}: mamujoco, smax or smac")
    if cfg.kind == "smac":
        from .smac import check_map, check_sc2_installed
        check_map(cfg.scenario)  # fail here (install hint, map list, missing game), not inside a worker
        check_sc2_installed(cfg.scenario)
    from .vector import SerialVecEnv, SubprocVecEnv
    if w <= 0:
        return SerialVecEnv(cfg, make_single, n)
    return SubprocVecEnv(cfg, make_single, n, w)
