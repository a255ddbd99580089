"""Observation rollouts that exports are verified on: random, and real MaMuJoCo when the policy fits.

A `Rollout` is per-agent observations [T, E, obs_dim] for E environments over T steps plus the
reset mask [T, E] (episode starts, plus random extra resets so the state reset path is exercised).
Real observations come from stepping `gymnasium_robotics.mamujoco_v1` with the Engine's own
deterministic actions (the policy really drives the environment). Which environment: the
policy directory's `env.json` (written by training: {"kind": "mamujoco", "scenario", "agent_conf",
"agent_obsk"}); without one, HalfCheetah 2x3 when the policy's agent sizes equal its sizes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from lorasa_serve import Engine
from lorasa_serve.spec import PolicySpec

ENV_FILE = "env.json"
DEFAULT_ENV = {"kind": "mamujoco", "scenario": "HalfCheetah", "agent_conf": "2x3", "agent_obsk": 1}


@dataclass
class Rollout:
    source: str  # "random" or e.g. "HalfCheetah 2x3"
    obs: dict[str, np.ndarray]  # agent id -> [T, E, obs_dim] float32
    reset: np.ndarray  # [T, E] bool; step 0 is all True

    @property
    def steps(self) -> int:
        return self.reset.shape[0]

    @property
    def envs(self) -> int:
        return self.reset.shape[1]


def random_rollout(spec: PolicySpec, steps: int, envs: int, reset_prob: float, seed: int) -> Rollout:
    rng = np.random.default_rng(seed)
    obs = {a.agent_id: rng.standard_normal((steps, envs, a.obs_dim)).astype(np.float32)
           for a in spec.agents}
    return Rollout("random", obs, _resets(rng, np.zeros((steps, envs), bool), reset_prob))


def _resets(rng: np.random.Generator, starts: np.ndarray, prob: float) -> np.ndarray:
    reset = starts | (rng.random(starts.shape) < prob)
    reset[0] = True
    return reset


def real_env_config(policy_dir: Path, spec: PolicySpec) -> tuple[dict | None, str]:
    """-> (MaMuJoCo config or None, a note saying why). Never raises for a missing/odd env.json."""
    f = Path(policy_dir) / ENV_FILE
    if f.is_file():
        try:
            cfg = json.loads(f.read_text())
            cfg = cfg.get("env", cfg) if isinstance(cfg, dict) else {}
        except (OSError, json.JSONDecodeError) as e:
            return None, f"{ENV_FILE} unreadable ({e}); random observations only"
        if cfg.get("kind") != "mamujoco":
            return None, f"{ENV_FILE} names kind {cfg.get('kind')!r}; only MaMuJoCo is stepped here, " \
                         "random observations only"
        return {**DEFAULT_ENV, **cfg}, f"environment from {ENV_FILE}"
    dims = [(a.obs_dim, a.act_dim) for a in spec.agents]
    if spec.action == "gaussian" and dims == [(12, 3), (12, 3)]:
        return dict(DEFAULT_ENV), f"no {ENV_FILE}; the agent sizes match HalfCheetah 2x3"
    return None, f"no {ENV_FILE} and sizes match no default environment: random observations only"


def mamujoco_rollout(cfg: dict, engine: Engine, steps: int, envs: int, reset_prob: float,
                     seed: int) -> Rollout:
    """Step `envs` MaMuJoCo environments for `steps` with the engine's deterministic actions."""
    try:
        from gymnasium_robotics import mamujoco_v1
    except ImportError as e:
        raise RuntimeError(f"MaMuJoCo needs the 'mujoco' extra: {e}") from None
    spec = engine.spec
    ids, N = spec.agent_ids, len(spec.agents)
    made = [mamujoco_v1.parallel_env(cfg["scenario"], cfg["agent_conf"],
                                     agent_obsk=int(cfg["agent_obsk"])) for _ in range(envs)]
    try:
        names = list(made[0].possible_agents)
        _check_sizes(made[0], names, spec)
        cur = [env.reset(seed=seed + e)[0] for e, env in enumerate(made)]
        obs = {a: np.zeros((steps, envs, spec.agent(a).obs_dim), np.float32) for a in ids}
        starts = np.zeros((steps, envs), bool)
        starts[0] = True
        state = None
        for t in range(steps):
            for name, a in zip(names, ids):
                obs[a][t] = np.stack([cur[e][name] for e in range(envs)])
            out = engine.act(ids * envs, _rows(obs, spec, t), state, np.repeat(starts[t], N))
            state = out.state
            acts = out.actions.numpy().reshape(envs, N, -1)  # env-major rows
            for e, env in enumerate(made):
                nxt, _, term, trunc, _ = env.step(
                    {n: acts[e, i, :spec.agent(a).act_dim] for i, (n, a) in enumerate(zip(names, ids))})
                if any(term.values()) or any(trunc.values()):
                    nxt = env.reset(seed=seed + 1000 + t * envs + e)[0]
                    if t + 1 < steps:
                        starts[t + 1, e] = True
                cur[e] = nxt
    finally:
        for env in made:
            env.close()
    return Rollout(f"{cfg['scenario']} {cfg['agent_conf']}", obs,
                   _resets(np.random.default_rng(seed), starts, reset_prob))


def _rows(obs: dict[str, np.ndarray], spec: PolicySpec, t: int) -> np.ndarray:
    """Step t as env-major rows [E*N, obs_max], zero-padded per agent."""
    envs, N = next(iter(obs.values())).shape[1], len(spec.agents)
    rows = np.zeros((envs, N, spec.obs_max), np.float32)
    for i, a in enumerate(spec.agent_ids):
        rows[:, i, :spec.agent(a).obs_dim] = obs[a][t]
    return rows.reshape(envs * N, spec.obs_max)


def _check_sizes(env, names: list[str], spec: PolicySpec) -> None:
    got = [(env.observation_space(n).shape[0], env.action_space(n).shape[0]) for n in names]
    want = [(a.obs_dim, a.act_dim) for a in spec.agents]
    if got != want:
        raise RuntimeError(f"environment agents have (obs, act) sizes {got}, the policy {want}")

