"""SMAX (jaxmarl `HeuristicEnemySMAX`) as a vector env: E games in one `jit(vmap(...))` call.

Speed (BENCHMARKS.md, "Training throughput"): everything per step stays inside one jitted function, including splitting the RNG
key and the auto-reset, so Python does one call and one device->host copy per step for all E envs.
"""
from __future__ import annotations

import os
import warnings
from functools import partial

import numpy as np

from .base import EnvConfig, EnvInfo, EnvUnavailableError, Step, UnknownTaskError


def _import_smax():
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import jax
            import jax.numpy as jnp
            from jaxmarl import make
            from jaxmarl.environments.smax import map_name_to_scenario
    except ImportError as e:
        raise EnvUnavailableError(f"SMAX needs jaxmarl and jax (pip install -e '.[smax]'): {e}") from None
    return jax, jnp, make, map_name_to_scenario


_COMPILED: dict[tuple, tuple] = {}  # (map, limit) -> (env, jitted step); jitted reset per n_envs


def _compiled(cfg: EnvConfig, n_envs: int):
    """One env object and jitted functions per task, shared by every SmaxVecEnv of this process (so a
    training env and an evaluation env of the same shape compile once)."""
    jax, jnp, make, map_name_to_scenario = _import_smax()
    key = (cfg.scenario, cfg.episode_limit)
    if key not in _COMPILED:
        try:
            scenario = map_name_to_scenario(cfg.scenario)
        except (KeyError, ValueError):
            raise UnknownTaskError(f"SMAX has no map {cfg.scenario!r}; pass one jaxmarl ships "
                                   "(e.g. --env.scenario 3s5z)") from None
        kw = {"max_steps": cfg.episode_limit} if cfg.episode_limit > 0 else {}
        env = make("HeuristicEnemySMAX", scenario=scenario, **kw)
        _COMPILED[key] = (env, jax.jit(partial(_step_all, jax, jnp, env)), {})
    env, step, resets = _COMPILED[key]
    if n_envs not in resets:
        resets[n_envs] = jax.jit(partial(_reset_all, jax, jnp, env, n_envs))
    return jax, env, resets[n_envs], step


class SmaxVecEnv:
    def __init__(self, cfg: EnvConfig, n_envs: int):
        jax, env, self._reset, self._step = _compiled(cfg, n_envs)
        self.env, self.n_envs, self._jax = env, n_envs, jax
        agents = list(env.agents)
        obs0, _ = env.reset(jax.random.PRNGKey(0))
        n_act = int(env.action_spaces[agents[0]].n)
        self.info = EnvInfo(cfg.name, tuple(agents), (int(obs0[agents[0]].shape[0]),) * len(agents),
                            (n_act,) * len(agents), int(obs0["world_state"].shape[0]), "categorical",
                            int(env.max_steps))
        self._key = self._states = None
        self._ret = np.zeros(n_envs)
        self._len = np.zeros(n_envs, np.int64)

    def reset(self, seed: int) -> Step:
        key, self._states, packed = self._reset(self._jax.random.PRNGKey(seed))
        self._key = key
        self._ret[:] = 0
        self._len[:] = 0
        obs, state, avail = (np.array(x) for x in packed)  # writable host copies
        z = np.zeros(self.n_envs)
        return Step(obs, state, avail, z.astype(np.float32), z.astype(bool), z.astype(bool), state,
                    z, z.astype(np.int64), np.full(self.n_envs, np.nan, np.float32))

    def step(self, actions: np.ndarray) -> Step:
        """actions [E, N] int."""
        self._key, self._states, out = self._step(self._key, self._states,
                                                  np.asarray(actions, np.int32))
        obs, state, avail, reward, done, terminated, final_state, won = (np.array(x) for x in out)
        self._ret += reward
        self._len += 1
        ep_ret, ep_len = np.where(done, self._ret, 0.0), np.where(done, self._len, 0)
        self._ret[done], self._len[done] = 0.0, 0
        return Step(obs, state, avail, reward.astype(np.float32), done, terminated, final_state,
                    ep_ret, ep_len, np.where(done, won, np.nan).astype(np.float32))

    def close(self) -> None:
        pass


def _pack(jnp, env, obs: dict, st):
    """-> obs [N, obs], world state [S], avail [N, A] for one env (vmapped by the callers)."""
    o = jnp.stack([obs[a] for a in env.agents])
    av = env.get_avail_actions(st)
    return o, obs["world_state"], jnp.stack([av[a] for a in env.agents]).astype(bool)


def _reset_all(jax, jnp, env, n_envs, key):
    key, sub = jax.random.split(key)
    obs, st = jax.vmap(env.reset)(jax.random.split(sub, n_envs))
    st = jax.tree.map(lambda x: jnp.array(x, dtype=x.dtype), st)  # not weak-typed: step compiles once
    return key, st, jax.vmap(partial(_pack, jnp, env))(obs, st)


def _step_one(jax, jnp, env, key, st, actions):
    """One env: step without auto-reset, read the outcome, then reset in place where done."""
    k_step, k_reset = jax.random.split(key)
    obs, st1, rew, dones, _ = env.step_env(k_step, st, {a: actions[i] for i, a in enumerate(env.agents)})
    alive = st1.state.unit_alive
    allies_alive = jnp.any(alive[:env.num_allies])
    enemies_dead = jnp.all(~alive[env.num_allies:])
    won = (enemies_dead & allies_alive).astype(jnp.float32)
    done = dones["__all__"]
    terminated = done & (enemies_dead | ~allies_alive)  # else: the time limit (truncation)
    reward = jnp.mean(jnp.stack([rew[a] for a in env.agents]))
    packed1 = _pack(jnp, env, obs, st1)
    obs_r, st_r = env.reset(k_reset)
    packed_r = _pack(jnp, env, obs_r, st_r)
    st_next = jax.tree.map(lambda r, s: jnp.where(done, r, s), st_r, st1)
    o, s, av = (jnp.where(done, r, x) for r, x in zip(packed_r, packed1))
    return st_next, (o, s, av, reward, done, terminated, packed1[1], won)


def _step_all(jax, jnp, env, key, states, actions):
    key, sub = jax.random.split(key)
    keys = jax.random.split(sub, actions.shape[0])
    states, out = jax.vmap(partial(_step_one, jax, jnp, env))(keys, states, actions)
    return key, states, out
