"""Observation rollouts that exports are verified on: random, and real ones when the task is known.

An `ObsRollout` (observations only; not training.mappo.Rollout) is per-agent observations
[T, E, obs_dim] for E environments over T steps, the reset mask [T, E] (episode starts, plus
random extra resets so the recurrent-state reset path is exercised) and,
from a real Categorical task, its available-action masks [T, E, act_dim]. Real rollouts step the
project's own environment interface (`training.envs`: MaMuJoCo, SMAX, SMAC) with the Engine's
deterministic actions, so the policy really drives the environment. Which task: the policy
directory's `env.json` (`lorasa_serve.env_file`); without one, HalfCheetah 2x3 when the agent
sizes match it.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from lorasa_serve import Engine
from lorasa_serve.env_file import env_block_or_guess
from lorasa_serve.spec import PolicySpec


@dataclass
class ObsRollout:
    source: str  # "random" or e.g. "HalfCheetah 2x3"
    obs: dict[str, np.ndarray]  # agent id -> [T, E, obs_dim] float32
    reset: np.ndarray  # [T, E] bool; step 0 is all True
    avail: dict[str, np.ndarray] | None = None  # agent id -> [T, E, act_dim] bool (real Categorical)

    @property
    def steps(self) -> int:
        return self.reset.shape[0]


def random_rollout(spec: PolicySpec, steps: int, envs: int, reset_prob: float, seed: int) -> ObsRollout:
    rng = np.random.default_rng(seed)
    obs = {a.agent_id: rng.standard_normal((steps, envs, a.obs_dim)).astype(np.float32)
           for a in spec.agents}
    return ObsRollout("random", obs, _resets(rng, np.zeros((steps, envs), bool), reset_prob))


def _resets(rng: np.random.Generator, starts: np.ndarray, prob: float) -> np.ndarray:
    reset = starts | (rng.random(starts.shape) < prob)
    reset[0] = True
    return reset


def real_env_config(policy_dir: Path, spec: PolicySpec) -> tuple[dict | None, str]:
    """-> (env config dict or None, a note saying why). Never raises for a missing/odd env.json
    (`lorasa_serve.env_file`: the file's env block, or the HalfCheetah 2x3 guess from the sizes)."""
    return env_block_or_guess(policy_dir, spec)


def env_rollout(cfg: dict, engine: Engine, steps: int, envs: int, reset_prob: float,
                seed: int) -> ObsRollout:
    """Step `envs` environments of the task for `steps` with the engine's deterministic actions."""
    from training.envs import EnvConfig, make_vec_env  # lazy: only exports with a known task need it

    known = {f.name for f in fields(EnvConfig)}
    env_cfg = EnvConfig(**{k: v for k, v in cfg.items() if k in known})
    spec = engine.spec
    ids, N = spec.agent_ids, len(spec.agents)
    venv = make_vec_env(env_cfg, n_envs=envs, workers=0)
    try:
        _check_sizes(venv.info, spec)
        step = venv.reset(seed)
        obs = {a: np.zeros((steps, envs, spec.agent(a).obs_dim), np.float32) for a in ids}
        avail = {a: np.zeros((steps, envs, spec.agent(a).act_dim), bool) for a in ids}
        starts = np.zeros((steps, envs), bool)
        starts[0] = True
        h = None  # the policy's GRU state [E*N, H] (step.state would be the env's global state)
        for t in range(steps):
            for i, a in enumerate(ids):
                obs[a][t] = step.obs[:, i, :spec.agent(a).obs_dim]
                avail[a][t] = step.avail[:, i, :spec.agent(a).act_dim]
            av = step.avail.reshape(envs * N, -1) if spec.action == "categorical" else None
            out = engine.act(ids * envs, step.obs.reshape(envs * N, -1), h,  # env-major rows
                             np.repeat(starts[t], N), av)
            h = out.state
            step = venv.step(out.actions.numpy().reshape(envs, N, *out.actions.shape[1:]))
            if t + 1 < steps:
                starts[t + 1] = step.done  # auto-reset: the next obs starts a new episode
    finally:
        venv.close()
    return ObsRollout(venv.info.name, obs, _resets(np.random.default_rng(seed), starts, reset_prob),
                   avail if spec.action == "categorical" else None)


def _check_sizes(info, spec: PolicySpec) -> None:
    got = (list(zip(info.obs_dims, info.act_dims)), info.action)
    want = ([(a.obs_dim, a.act_dim) for a in spec.agents], spec.action)
    if got != want:
        raise RuntimeError(f"{info.name} has agents (obs, act) {got[0]} ({got[1]}), the policy "
                           f"{want[0]} ({want[1]})")
