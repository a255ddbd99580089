"""Acting in PettingZoo-style environment loops: per-agent observation dicts in, action dicts out.

    from lorasa_serve import Engine
    from lorasa_serve.envloop import TeamPolicy

    env = mamujoco_v1.parallel_env("HalfCheetah", "2x3")                 # a PettingZoo ParallelEnv
    team = TeamPolicy(Engine.from_dir("policies/halfcheetah_2x3"), env)  # or OnnxEngine, PolicyClient
    obs, _ = env.reset(seed=0)
    team.reset()                                                          # episode start: zero GRU state
    while env.agents:
        obs, rew, term, trunc, _ = env.step(team.act(obs))

`TeamPolicy` does what each user otherwise writes by hand: it orders the rows in the policy's agent
order, zero-pads each agent's observation to obs_max (`lorasa_serve.pad_obs`, the one padding helper),
keeps the recurrent state per (env, agent), zeroes it at episode starts, splits the actions back into a
dict at each agent's true size, clips Gaussian actions to each agent's `Box` (the backends return
unclipped means / samples) and turns PettingZoo action masks (`{"observation": ..., "action_mask": ...}`
observations, or `action_masks=`) into Categorical masks.
`n_envs > 1` acts for several envs in one batch: pass a list of observation dicts.

Any backend with the `ActBackend` act signature works: `Engine`, `OnnxEngine`, or `PolicyClient` (HTTP;
stateless: the state travels with each request). Env agent names map to policy agent ids by `agent_map`
(default: the same names). Agents missing from an env's dict this step (PettingZoo removes finished
agents) get no row and keep their state.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import InputError
from .protocol import pad_obs
from .spec import PolicySpec

ObsDict = Mapping[str, Any]  # env agent name -> observation array, or {"observation", "action_mask"}


@dataclass(frozen=True)
class _Agent:
    name: str  # the env's name for it
    agent_id: str  # the policy's id
    index: int  # position in the policy's agents
    obs_dim: int
    act_dim: int
    low: np.ndarray | None  # [act_dim] Gaussian action box, None: no clipping
    high: np.ndarray | None


class TeamPolicy:
    def __init__(self, backend, env=None, *, n_envs: int = 1, agent_map: Mapping[str, str] | None = None,
                 action_spaces: Mapping[str, Any] | None = None, deterministic: bool = True,
                 generator=None, spec: PolicySpec | None = None):
        """backend: Engine | OnnxEngine | PolicyClient. env: a PettingZoo ParallelEnv (its
        `possible_agents` and `action_space(name)` give names and boxes), or pass `action_spaces`
        {name: space} (and `agent_map`) instead. spec: the policy spec (default: `backend.spec`, or
        `PolicyClient.policy_spec()`). generator: torch.Generator for sampled actions (Engine, OnnxEngine)."""
        self.backend, self.n_envs = backend, int(n_envs)
        self.deterministic, self.generator = deterministic, generator
        self.spec = spec or _spec_of(backend)
        if self.n_envs < 1:
            raise InputError(f"n_envs must be >= 1, not {n_envs}")
        names = list(env.possible_agents) if env is not None else list(agent_map or action_spaces or
                                                                        self.spec.agent_ids)
        spaces = {n: env.action_space(n) for n in names} if env is not None else dict(action_spaces or {})
        self.agents = [self._agent(n, (agent_map or {}).get(n, n), spaces.get(n)) for n in names]
        self._by_name = {a.name: a for a in self.agents}
        H = self.spec.hidden
        self._state = np.zeros((self.n_envs, len(self.agents), H), np.float32) if self.spec.recurrent else None
        self._start = np.ones((self.n_envs, len(self.agents)), bool)  # next step is an episode start
        self._col = {a.name: i for i, a in enumerate(self.agents)}
        from .client import PolicyClient  # torch-free; its act takes no generator
        self._kwargs = {"deterministic": deterministic} if isinstance(backend, PolicyClient) else \
            {"deterministic": deterministic, "generator": generator}

    def _agent(self, name: str, agent_id: str, space) -> _Agent:
        ids = self.spec.agent_ids
        if agent_id not in ids:
            raise InputError(f"env agent {name!r} maps to {agent_id!r}, which the policy does not have "
                             f"(its agents: {ids}); pass agent_map={{env name: policy id}}")
        a = self.spec.agent(agent_id)
        low = high = None
        if self.spec.action == "gaussian" and space is not None and hasattr(space, "low"):
            low = np.asarray(space.low, np.float32).reshape(-1)
            high = np.asarray(space.high, np.float32).reshape(-1)
            if low.shape != (a.act_dim,):
                raise InputError(f"env agent {name!r}: action box of {low.shape[0]} dims, but policy agent "
                                 f"{agent_id!r} has {a.act_dim}")
        return _Agent(name, agent_id, ids.index(agent_id), a.obs_dim, a.act_dim, low, high)

    # --- episodes -------------------------------------------------------------------------------
    def reset(self, env_index: int | None = None) -> None:
        """Episode start in env `env_index` (None: every env): the next step acts from a zero state."""
        if env_index is None:
            self._start[:] = True
        else:
            self._start[env_index] = True

    # --- acting ---------------------------------------------------------------------------------
    def act(self, obs: ObsDict | Sequence[ObsDict], action_masks: ObsDict | Sequence[ObsDict] | None = None
            ) -> dict[str, Any] | list[dict[str, Any]]:
        """obs: one env's {name: observation} (n_envs = 1) or a list of n_envs of them -> the same
        shape of {name: action} (Gaussian float32 [act_dim], clipped to the agent's box; Categorical int)."""
        single = isinstance(obs, Mapping)
        envs = [obs] if single else list(obs)
        masks = [action_masks] if single else (list(action_masks) if action_masks is not None else None)
        if len(envs) != self.n_envs or (masks is not None and len(masks) != self.n_envs):
            raise InputError(f"expected observations (and masks) of {self.n_envs} envs, got {len(envs)}")
        rows = [(e, self._by_name[n] if n in self._by_name else self._unknown(n))
                for e, d in enumerate(envs) for n in d]
        if not rows:
            return {} if single else [{} for _ in envs]
        out = self._forward(rows, envs, masks)
        result: list[dict[str, Any]] = [{} for _ in envs]
        for (e, a), action in zip(rows, out):
            result[e][a.name] = action
        return result[0] if single else result

    def _forward(self, rows: list[tuple[int, _Agent]], envs: list[ObsDict], masks) -> list[Any]:
        spec, B = self.spec, len(rows)
        per_row = []  # [B] each row's observation [obs_dim]
        avail = np.zeros((B, spec.act_max), bool) if spec.action == "categorical" else None
        for r, (e, a) in enumerate(rows):
            o, m = _split(envs[e][a.name], None if masks is None else (masks[e] or {}).get(a.name))
            per_row.append(_vector(o, a.obs_dim, f"env {e} agent {a.name!r} observation"))
            if avail is not None:
                avail[r, :a.act_dim] = True if m is None else _vector(m, a.act_dim, f"env {e} agent {a.name!r} mask") > 0
        obs = pad_obs(per_row, spec.obs_max)  # [B, obs_max]
        env_i = np.array([e for e, _ in rows])
        col = np.array([self._col[a.name] for _, a in rows])
        state = None if self._state is None else self._state[env_i, col]
        reset = self._start[env_i, col]
        res = self.backend.act(np.array([a.index for _, a in rows], np.int64), obs, state, reset, avail,
                               **self._kwargs)
        if self._state is not None:
            self._state[env_i, col] = _numpy(res.state)
        self._start[env_i, col] = False
        actions = _numpy(res.actions)
        return [self._action(a, actions[r]) for r, (_, a) in enumerate(rows)]

    def _action(self, a: _Agent, row: np.ndarray):
        if self.spec.action == "categorical":
            return int(row)
        x = np.asarray(row[:a.act_dim], np.float32)
        return x if a.low is None else np.clip(x, a.low, a.high)

    def _unknown(self, name: str):
        raise InputError(f"observation for env agent {name!r}, which is not one of {list(self._by_name)}")


def _spec_of(backend) -> PolicySpec:
    spec = getattr(backend, "spec", None)
    if isinstance(spec, PolicySpec):
        return spec
    if hasattr(backend, "policy_spec"):
        return backend.policy_spec()
    raise InputError(f"{type(backend).__name__} has no policy spec: pass spec=")


def _numpy(x) -> np.ndarray:
    """A backend's output as a numpy array: torch tensors (Engine on any device, OnnxEngine) are
    detached and copied to the host; PolicyClient's arrays pass as they are."""
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def _split(o, mask):
    """PettingZoo's masked observation {"observation", "action_mask"} -> (observation, mask)."""
    if isinstance(o, Mapping):
        if "observation" not in o:
            raise InputError(f"a dict observation needs an 'observation' key, got {sorted(o)}")
        return o["observation"], mask if mask is not None else o.get("action_mask")
    return o, mask


def _vector(x, n: int, what: str) -> np.ndarray:
    v = np.asarray(x, np.float32).reshape(-1)
    if v.shape != (n,):
        raise InputError(f"{what} has {v.shape[0]} values, the policy expects {n}")
    return v
