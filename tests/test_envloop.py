"""The env-loop adapter (lorasa_serve.envloop.TeamPolicy) against a hand-written loop over Engine.act:
a real PettingZoo ParallelEnv (MaMuJoCo HalfCheetah 2x3, the shipped policy), several envs at once, a
masked Categorical ParallelEnv built on pettingzoo's own base class, the same loop over an exported
`OnnxEngine` and over an Engine on every device present, the README's example as written, and its
errors. The HTTP backend (PolicyClient) is checked in test_service.py on the shared server."""
from __future__ import annotations

from pathlib import Path

import re

import numpy as np
import pytest
import torch
from conftest import make_policy, require_extra

from lorasa_serve import Engine, InputError
from lorasa_serve.envloop import TeamPolicy

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "policies" / "halfcheetah_2x3"
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def hand_loop(engine, env_obs: list[dict], state, reset, spaces):
    """The ~15 lines a user writes without the adapter: pad in policy order, keep state, clip."""
    spec, ids = engine.spec, engine.spec.agent_ids
    obs = np.zeros((len(env_obs) * len(ids), spec.obs_max), np.float32)
    for e, d in enumerate(env_obs):
        for n, a in enumerate(ids):
            obs[e * len(ids) + n, :spec.agent(a).obs_dim] = d[a]
    out = engine.act(ids * len(env_obs), obs, state, np.repeat(reset, len(ids)))
    acts = out.actions.numpy()
    res = [{a: np.clip(acts[e * len(ids) + n, :spec.agent(a).act_dim], spaces[a].low, spaces[a].high)
            for n, a in enumerate(ids)} for e in range(len(env_obs))]
    return res, out.state


def test_real_pettingzoo_env_matches_the_hand_loop():
    require_extra("mujoco", "gymnasium_robotics", "mujoco")
    from gymnasium_robotics import mamujoco_v1
    envs = [mamujoco_v1.parallel_env("HalfCheetah", "2x3", agent_obsk=1) for _ in range(2)]
    eng = Engine.from_dir(SHIPPED, device="cpu")
    spaces = {a: envs[0].action_space(a) for a in envs[0].possible_agents}
    team = TeamPolicy(eng, envs[0], n_envs=2)
    obs = [env.reset(seed=s)[0] for s, env in enumerate(envs)]
    state, reset = None, np.ones(2, bool)
    clipped = 0
    for t in range(30):
        if t == 12:  # env 1 starts a new episode: its state is zeroed, env 0's kept
            obs[1] = envs[1].reset(seed=7)[0]
            team.reset(1)
            reset = np.array([False, True])
        got = team.act(obs)
        want, state = hand_loop(eng, obs, state, reset, spaces)
        reset = np.zeros(2, bool)
        for e in range(2):
            assert set(got[e]) == set(envs[e].possible_agents)
            for a in got[e]:
                np.testing.assert_allclose(got[e][a], want[e][a], atol=1e-6)
                assert got[e][a].dtype == np.float32 and envs[e].action_space(a).contains(got[e][a])
        clipped += sum(int((np.abs(g[a]) >= 1).any()) for g in got for a in g)  # at the box's edge
        obs = [env.step(g)[0] for env, g in zip(envs, got)]
    assert clipped > 0  # the clip was exercised (the hand loop clips too: equal values above)
    # one env alone, dict in / dict out, gives env 0's actions of a fresh 2-env run
    single, pair = TeamPolicy(eng, envs[0]), TeamPolicy(eng, envs[0], n_envs=2)
    o = [env.reset(seed=3)[0] for env in envs]
    a1, a2 = single.act(o[0]), pair.act(o)
    for a in a1:
        np.testing.assert_array_equal(a1[a], a2[0][a])


class MaskedEnv:
    """A two-agent ParallelEnv (pettingzoo's base class) with masked discrete actions and agents of
    different observation sizes; observations are PettingZoo's {"observation", "action_mask"} dicts."""

    def __new__(cls):
        require_extra("mujoco", "gymnasium", "pettingzoo")  # gymnasium-robotics brings both
        from gymnasium import spaces
        from pettingzoo import ParallelEnv

        class _Env(ParallelEnv):
            metadata = {"name": "masked_v0"}
            possible_agents = ["agent_0", "agent_1"]

            def __init__(self):
                self.rng = np.random.default_rng(0)
                self.dims = {"agent_0": (6, 4), "agent_1": (3, 2)}

            def observation_space(self, a):
                o, n = self.dims[a]
                return spaces.Dict({"observation": spaces.Box(-5, 5, (o,)), "action_mask": spaces.MultiBinary(n)})

            def action_space(self, a):
                return spaces.Discrete(self.dims[a][1])

            def _obs(self):
                out = {}
                for a, (o, n) in self.dims.items():
                    mask = (self.rng.random(n) < 0.5).astype(np.int8)
                    mask[self.rng.integers(n)] = 1
                    out[a] = {"observation": self.rng.standard_normal(o).astype(np.float32), "action_mask": mask}
                return out

            def reset(self, seed=None, options=None):
                self.agents = list(self.possible_agents)
                return self._obs(), {a: {} for a in self.agents}

            def step(self, actions):
                return self._obs(), {a: 0.0 for a in self.agents}, {a: False for a in self.agents}, \
                    {a: False for a in self.agents}, {a: {} for a in self.agents}
        return _Env()


@pytest.mark.parametrize("device", DEVICES)
def test_masked_categorical_parallel_env(tmp_path, device):
    spec, _, _ = make_policy(tmp_path / "p", obs=(6, 3), act=(4, 2), action="categorical", b_std=1.0)
    eng = Engine.from_dir(tmp_path / "p", device=device)
    env = MaskedEnv()
    obs, _ = env.reset()
    team, state = TeamPolicy(eng, env), None
    for t in range(20):
        got = team.act(obs)
        rows = np.zeros((2, spec.obs_max), np.float32)
        avail = np.zeros((2, spec.act_max), bool)
        for n, a in enumerate(spec.agent_ids):
            rows[n, :len(obs[a]["observation"])] = obs[a]["observation"]
            avail[n, :len(obs[a]["action_mask"])] = obs[a]["action_mask"] > 0
        out = eng.act(spec.agent_ids, rows, state, np.array([t == 0] * 2), avail)
        state = out.state
        for n, a in enumerate(spec.agent_ids):
            assert got[a] == int(out.actions[n].cpu()) and isinstance(got[a], int)
            assert obs[a]["action_mask"][got[a]] == 1  # a masked action is never chosen
        obs = env.step(got)[0]


def test_onnx_engine_in_the_loop_equals_the_engine(tmp_path):
    """TeamPolicy over an exported OnnxEngine (its outputs are torch tensors, state included) acts
    like TeamPolicy over the Engine, step for step, on the masked recurrent Categorical env."""
    require_extra("onnx", "onnx", "onnxruntime", "onnxscript")
    from exporters import ExportConfig, export_policy
    from lorasa_serve.onnx_backend import OnnxEngine
    make_policy(tmp_path / "p", obs=(6, 3), act=(4, 2), action="categorical", b_std=0.3)
    report = export_policy(ExportConfig(tmp_path / "p", tmp_path / "out", progress=False))
    assert report.ok, report.table()
    env = MaskedEnv()
    onnx_team = TeamPolicy(OnnxEngine.from_dir(tmp_path / "out"), env)
    engine_team = TeamPolicy(Engine.from_dir(tmp_path / "p", device="cpu"), env)
    obs, _ = env.reset()
    for t in range(20):
        if t == 9:
            onnx_team.reset(), engine_team.reset()
        got, want = onnx_team.act(obs), engine_team.act(obs)
        assert got == want, t
        np.testing.assert_allclose(onnx_team._state, engine_team._state, atol=1e-5)
        obs = env.step(got)[0]
    assert np.abs(engine_team._state).sum() > 0  # the state was carried (not zeros every step)


def test_readme_env_loop_runs_as_written(monkeypatch):
    """README.md's "Environment loops (PettingZoo / gymnasium)" block, executed as written."""
    require_extra("mujoco", "gymnasium_robotics", "mujoco")
    text = (REPO / "README.md").read_text()
    block = re.search(r"### Environment loops \(PettingZoo / gymnasium\)\n.*?```python\n(.*?)```", text,
                      re.S).group(1)
    monkeypatch.chdir(REPO)  # it names the shipped policy by its path in the repository
    scope: dict = {}
    exec(compile(block, "README.md env loop", "exec"), scope)
    assert scope["steps"] > 0 and set(scope["actions"]) == {"agent_0", "agent_1"}


def test_sampled_actions_are_seeded_and_agents_may_drop_out():
    require_extra("mujoco", "gymnasium_robotics", "mujoco")
    from gymnasium_robotics import mamujoco_v1
    env = mamujoco_v1.parallel_env("HalfCheetah", "2x3", agent_obsk=1)
    eng = Engine.from_dir(SHIPPED, device="cpu")
    obs, _ = env.reset(seed=0)
    runs = []
    for _ in range(2):
        team = TeamPolicy(eng, env, deterministic=False, generator=torch.Generator().manual_seed(5))
        runs.append([team.act(obs), team.act({"agent_1": obs["agent_1"]})])
    for a in obs:
        np.testing.assert_array_equal(runs[0][0][a], runs[1][0][a])
    assert set(runs[0][1]) == {"agent_1"}
    np.testing.assert_array_equal(runs[0][1]["agent_1"], runs[1][1]["agent_1"])


def test_errors_are_typed(tmp_path):
    make_policy(tmp_path / "p", obs=(6, 3), act=(2, 2))
    eng = Engine.from_dir(tmp_path / "p", device="cpu")
    with pytest.raises(InputError, match="agent_map"):
        TeamPolicy(eng, agent_map={"walker": "nobody"})
    team = TeamPolicy(eng)
    with pytest.raises(InputError, match="expects 3"):
        team.act({"agent_0": np.zeros(6), "agent_1": np.zeros(4)})
    with pytest.raises(InputError, match="not one of"):
        team.act({"agent_7": np.zeros(6)})
    with pytest.raises(InputError, match="2 envs"):
        TeamPolicy(eng, n_envs=2).act([{"agent_0": np.zeros(6)}])
