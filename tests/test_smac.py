"""The real-SMAC adapter against a stand-in for oxwhirl's `StarCraft2Env` (StarCraft II cannot run here).

The stand-in has the real class's constructor signature (copied, so a keyword the real class rejects is a
TypeError here too), its attributes (`episode_limit` from the map registry, `_seed` used at launch) and its
step semantics (time-outs terminated, marked with `info["episode_limit"]` only with
`continuing_episode=True`, `info["battle_won"]`, the assert on unavailable actions, a new game launched by
`reset()` until an episode has been counted). Its battle is a small deterministic duel in place of the game.
It is installed as an importable `smac` package (a generated shim in tmp_path re-exporting this module), so
the adapter imports it exactly as it imports oxwhirl's, in this process and in spawned env workers (which
import this module: torch and the trainer are imported inside the tests that use them, to keep that fast).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from training.envs import EnvConfig, EnvUnavailableError, make_single, make_vec_env
from training.envs.vector import SubprocVecEnv, WorkerTraceback

# --- the stand-in ------------------------------------------------------------------------------------
# Rows copied from oxwhirl/smac smac/env/starcraft2/maps/smac_maps.py (commit d6aab33f).
map_param_registry = {
    "3m": {"n_agents": 3, "n_enemies": 3, "limit": 60, "a_race": "T", "b_race": "T", "unit_type_bits": 0,
           "map_type": "marines"},
    "8m": {"n_agents": 8, "n_enemies": 8, "limit": 120, "a_race": "T", "b_race": "T", "unit_type_bits": 0,
           "map_type": "marines"},
    "2s3z": {"n_agents": 5, "n_enemies": 5, "limit": 120, "a_race": "P", "b_race": "P", "unit_type_bits": 2,
             "map_type": "stalkers_and_zealots"},
}


def get_smac_map_registry():
    return map_param_registry


def get_map_params(map_name):  # as smac.env.starcraft2.maps.get_map_params: a bare KeyError if unknown
    return get_smac_map_registry()[map_name]


HEALTH, SHOT = 45.0, 9.0  # every unit's health; damage of one attack


class StarCraft2Env:
    """Stand-in for smac.env.StarCraft2Env. Class-level `launches` records (seed, instance) per launch."""

    launches: list = []
    open_games = 0

    # The parameter list is copied verbatim from oxwhirl/smac smac/env/starcraft2/starcraft2.py,
    # StarCraft2Env.__init__, at commit d6aab33f76abc3849c50463a8592a84f59a5ef84.
    def __init__(
        self,
        map_name="8m",
        step_mul=8,
        move_amount=2,
        difficulty="7",
        game_version=None,
        seed=None,
        continuing_episode=False,
        obs_all_health=True,
        obs_own_health=True,
        obs_last_action=False,
        obs_pathing_grid=False,
        obs_terrain_height=False,
        obs_instead_of_state=False,
        obs_timestep_number=False,
        state_last_action=True,
        state_timestep_number=False,
        reward_sparse=False,
        reward_only_positive=True,
        reward_death_value=10,
        reward_win=200,
        reward_defeat=0,
        reward_negative_scale=0.5,
        reward_scale=True,
        reward_scale_rate=20,
        replay_dir="",
        replay_prefix="",
        window_size_x=1920,
        window_size_y=1200,
        heuristic_ai=False,
        heuristic_rest=False,
        debug=False,
    ):
        map_params = get_map_params(map_name)
        self.map_name = map_name
        self.n_agents = map_params["n_agents"]
        self.n_enemies = map_params["n_enemies"]
        self.episode_limit = map_params["limit"]
        self.continuing_episode = continuing_episode
        self._seed = seed
        self.obs_all_health, self.obs_own_health = obs_all_health, obs_own_health or obs_all_health
        self.obs_last_action, self.state_last_action = obs_last_action, state_last_action
        self.obs_timestep_number, self.state_timestep_number = obs_timestep_number, state_timestep_number
        self.obs_instead_of_state = obs_instead_of_state
        self.reward_death_value, self.reward_win = reward_death_value, reward_win
        self.reward_defeat = reward_defeat
        self.reward_scale, self.reward_scale_rate = reward_scale, reward_scale_rate
        self.n_actions_no_attack, self.n_actions_move = 6, 4
        self.n_actions = self.n_actions_no_attack + self.n_enemies
        self.shield_bits_ally = 1 if map_params["a_race"] == "P" else 0
        self.shield_bits_enemy = 1 if map_params["b_race"] == "P" else 0
        self.unit_type_bits = map_params["unit_type_bits"]
        self.max_reward = self.n_enemies * self.reward_death_value + self.reward_win
        self._episode_count = self._episode_steps = 0
        self._sc2_proc = None
        self.ally = np.full(self.n_agents, HEALTH)
        self.enemy = np.full(self.n_enemies, HEALTH)
        self.last_action = np.zeros((self.n_agents, self.n_actions))

    # -- the game (pysc2's run-config lookup and its failures, then a simulated battle) --
    def _launch(self):
        base = os.path.expanduser(os.environ.get("SC2PATH", "~/StarCraftII"))
        builds = [int(v[4:]) for v in os.listdir(os.path.join(base, "Versions")) if v.startswith("Base")]
        exe = os.path.join(base, "Versions", "Base%05d" % max(builds), "SC2_x64")
        if not os.path.exists(exe):
            raise RuntimeError("No SC2 binary found at: %s" % exe)  # pysc2's SC2LaunchError
        if not os.path.exists(os.path.join(base, "Maps", "SMAC_Maps", self.map_name + ".SC2Map")):
            raise ValueError("Map 'SMAC_Maps/%s.SC2Map' not found." % self.map_name)
        self._sc2_proc = np.random.default_rng(self._seed)  # the game's randomness, seeded at creation
        StarCraft2Env.launches.append((self._seed, self))
        StarCraft2Env.open_games += 1
        if os.environ.get("STANDIN_LOG"):
            with open(os.environ["STANDIN_LOG"], "a") as f:
                f.write(f"{self._seed}\n")

    def _restart(self):
        pass  # the real one kills all units; the map's trigger starts a fresh battle

    def reset(self):
        self._episode_steps = 0
        if self._episode_count == 0:
            self._launch()
        else:
            self._restart()
        self.ally[:], self.enemy[:] = HEALTH, HEALTH
        self.last_action = np.zeros((self.n_agents, self.n_actions))
        return self.get_obs(), self.get_state()

    def step(self, actions):
        actions_int = [int(a) for a in actions]
        self.last_action = np.eye(self.n_actions)[np.array(actions_int)]
        for a_id, action in enumerate(actions_int):
            avail_actions = self.get_avail_agent_actions(a_id)
            assert avail_actions[action] == 1, "Agent {} cannot perform action {}".format(a_id, action)
        self._episode_steps += 1
        enemy_before = self.enemy.copy()
        for a_id, action in enumerate(actions_int):
            if action >= self.n_actions_no_attack:  # attack enemy j; it fires back at its attacker
                j = action - self.n_actions_no_attack
                self.enemy[j] = max(0.0, self.enemy[j] - SHOT)
                self.ally[a_id] = max(0.0, self.ally[a_id] - self._sc2_proc.integers(3, 7))
        kills = int(((enemy_before > 0) & (self.enemy == 0)).sum())
        reward = float((enemy_before - self.enemy).sum()) + kills * self.reward_death_value
        terminated, info = False, {"battle_won": False}
        info["dead_allies"], info["dead_enemies"] = int((self.ally == 0).sum()), int((self.enemy == 0).sum())
        code = None if self.ally.any() and self.enemy.any() else (1 if self.ally.any() else -1)
        if code is not None:
            terminated = True
            if code == 1:
                info["battle_won"] = True
                reward += self.reward_win
            else:
                reward += self.reward_defeat
        elif self._episode_steps >= self.episode_limit:
            terminated = True
            if self.continuing_episode:
                info["episode_limit"] = True
        if terminated:
            self._episode_count += 1
        if self.reward_scale:
            reward /= self.max_reward / self.reward_scale_rate
        return reward, terminated, info

    # -- observations, state, actions (the real sizes; simplified contents) --
    def get_avail_agent_actions(self, agent_id):
        if self.ally[agent_id] > 0:
            return [0, 1, 1, 1, 1, 1] + [int(h > 0) for h in self.enemy]
        return [1] + [0] * (self.n_actions - 1)

    def get_avail_actions(self):
        return [self.get_avail_agent_actions(i) for i in range(self.n_agents)]

    def get_obs_agent(self, agent_id):
        obs = np.zeros(self.get_obs_size(), np.float32)
        if self.ally[agent_id] > 0:
            nf_en = 5 + self.unit_type_bits + self.shield_bits_enemy
            obs[:4] = 1.0
            obs[4 + nf_en * np.arange(self.n_enemies)] = self.enemy > 0
            obs[8 + nf_en * np.arange(self.n_enemies)] = self.enemy / HEALTH
            obs[-1 - self.unit_type_bits - self.shield_bits_ally] = self.ally[agent_id] / HEALTH
        return obs

    def get_obs(self):
        return [self.get_obs_agent(i) for i in range(self.n_agents)]

    def get_state(self):
        nf_al = 4 + self.shield_bits_ally + self.unit_type_bits
        nf_en = 3 + self.shield_bits_enemy + self.unit_type_bits
        ally = np.zeros((self.n_agents, nf_al), np.float32)
        enemy = np.zeros((self.n_enemies, nf_en), np.float32)
        ally[:, 0], enemy[:, 0] = self.ally / HEALTH, self.enemy / HEALTH
        return np.concatenate([ally.ravel(), enemy.ravel(), self.last_action.ravel()]).astype(np.float32)

    def get_obs_size(self):  # the real formulas, default flags
        own = self.unit_type_bits + 1 + self.shield_bits_ally
        enemy = self.n_enemies * (4 + self.unit_type_bits + 1 + self.shield_bits_enemy)
        ally = (self.n_agents - 1) * (4 + self.unit_type_bits + 1 + self.shield_bits_ally)
        return self.n_actions_move + enemy + ally + own

    def get_state_size(self):
        nf_al = 4 + self.shield_bits_ally + self.unit_type_bits
        nf_en = 3 + self.shield_bits_enemy + self.unit_type_bits
        return self.n_enemies * nf_en + self.n_agents * nf_al + self.n_agents * self.n_actions

    def get_total_actions(self):
        return self.n_actions

    def get_env_info(self):
        return {"state_shape": self.get_state_size(), "obs_shape": self.get_obs_size(),
                "n_actions": self.get_total_actions(), "n_agents": self.n_agents,
                "episode_limit": self.episode_limit, "agent_features": [], "enemy_features": []}

    def seed(self):
        return self._seed

    def close(self):
        if self._sc2_proc is not None:
            self._sc2_proc = None
            StarCraft2Env.open_games -= 1


# --- fixtures: the stand-in as the `smac` package, a fake StarCraft II install ------------------------
SHIM = {
    "smac/__init__.py": "",
    "smac/env/__init__.py": "from test_smac import StarCraft2Env\n",
    "smac/env/starcraft2/__init__.py": "",
    "smac/env/starcraft2/maps/__init__.py": "from test_smac import get_map_params\n",
    "smac/env/starcraft2/maps/smac_maps.py":
        "from test_smac import get_smac_map_registry, map_param_registry\n",
}


@pytest.fixture
def standin(tmp_path, monkeypatch):
    """`import smac.env` gives the stand-in here and in spawned workers (they inherit sys.path)."""
    shim = tmp_path / "shim"
    for rel, text in SHIM.items():
        (shim / rel).parent.mkdir(parents=True, exist_ok=True)
        (shim / rel).write_text(text)
    monkeypatch.syspath_prepend(str(shim))
    StarCraft2Env.launches, StarCraft2Env.open_games = [], 0
    yield shim
    for name in [m for m in sys.modules if m == "smac" or m.startswith("smac.")]:
        del sys.modules[name]


def fake_install(root: Path, versions=True, binary=True, maps=("3m", "8m")) -> Path:
    """A folder laid out like a Linux StarCraft II install (empty files)."""
    root.mkdir(parents=True)
    if versions:
        (root / "Versions" / "Base75689").mkdir(parents=True)
        if binary:
            (root / "Versions" / "Base75689" / "SC2_x64").touch()
    (root / "Maps" / "SMAC_Maps").mkdir(parents=True)
    for m in maps:
        (root / "Maps" / "SMAC_Maps" / f"{m}.SC2Map").touch()
    return root


@pytest.fixture
def sc2(standin, tmp_path, monkeypatch):
    root = fake_install(tmp_path / "StarCraftII")
    monkeypatch.setenv("SC2PATH", str(root))
    return root


SMAC_3M = EnvConfig(kind="smac", scenario="3m")  # the defaults: episode_limit 1000, 8 envs, 2 workers
STOP = 1  # StarCraft2Env's "stop" action: always available to a living unit


# --- tests -------------------------------------------------------------------------------------------
def test_standin_rejects_what_the_real_class_rejects():
    with pytest.raises(TypeError, match="episode_limit"):
        StarCraft2Env(map_name="3m", episode_limit=60)
    with pytest.raises(KeyError):
        StarCraft2Env(map_name="3mm")


def test_default_config_constructs_with_the_map_limit(sc2):
    """The default EnvConfig (episode_limit 1000 > the map's 60) builds, in this process and in workers;
    the shapes are those of the real 3m (obs 30, state 48, 9 actions)."""
    from training.envs.smac import SMACEnv
    env = SMACEnv(SMAC_3M)
    assert env.info.episode_limit == 60 and env.info.n_agents == 3
    assert env.info.obs_dims == (30,) * 3 and env.info.state_dim == 48 and env.info.act_dims == (9,) * 3
    assert env.env.continuing_episode and not StarCraft2Env.launches  # nothing launched before reset
    venv = make_vec_env(replace(SMAC_3M, n_envs=4))
    assert isinstance(venv, SubprocVecEnv) and len(venv.procs) == 2
    step = venv.reset(0)
    assert step.obs.shape == (4, 3, 30) and step.avail.shape == (4, 3, 9)
    venv.step(np.full((4, 3), STOP))
    venv.close()
    assert SMACEnv(replace(SMAC_3M, episode_limit=10)).info.episode_limit == 10
    assert SMACEnv(replace(SMAC_3M, episode_limit=0)).info.episode_limit == 60


@pytest.mark.parametrize("limit,expected", [(0, 60), (1000, 60), (12, 12)])
def test_time_out_is_a_truncation_and_a_won_battle_a_termination(sc2, limit, expected):
    venv = make_vec_env(replace(SMAC_3M, episode_limit=limit, n_envs=2), workers=0)
    step = venv.reset(0)
    for t in range(expected):  # env 0 waits; env 1 focus-fires (3 x 9 damage on 45 health: a win at step 6)
        target = 6 + int(np.flatnonzero(step.avail[1, 0, 6:])[0]) if step.avail[1, 0, 6:].any() else STOP
        step = venv.step(np.array([[STOP] * 3, [target] * 3]))
        if t == 5:
            assert step.done[1] and step.terminated[1] and step.ep_won[1] == 1 and step.ep_length[1] == 6
        elif t < expected - 1:
            assert not step.done[0]
    assert step.done[0] and not step.terminated[0]  # time-out: done & ~terminated -> bootstrapped
    assert step.ep_length[0] == expected and step.ep_won[0] == 0
    # final_state is the state the timed-out episode stopped in (everyone at full health, last actions
    # "stop"), step.state the next episode's first one (no last actions yet)
    ally, enemy, last = np.tile([1, 0, 0, 0], 3), np.tile([1, 0, 0], 3), np.tile(np.eye(9)[STOP], 3)
    np.testing.assert_array_equal(step.final_state[0], np.concatenate([ally, enemy, last]))
    np.testing.assert_array_equal(step.state[0], np.concatenate([ally, enemy, 0 * last]))
    venv.close()


class Recording:
    """A VecEnv that keeps every Step it passes on (what the trainer's rollout saw)."""

    def __init__(self, venv):
        self.venv, self.info, self.n_envs, self.steps = venv, venv.info, venv.n_envs, []

    def reset(self, seed):
        return self.venv.reset(seed)

    def step(self, actions):
        self.steps.append(self.venv.step(actions))
        return self.steps[-1]

    def close(self):
        self.venv.close()


def test_trainer_rollout_bootstraps_smac_time_outs(sc2):
    """`collect` (the trainer's rollout) adds gamma * V(final state) to the reward of each time-out step,
    and nothing elsewhere. With a limit of 4 no battle can end otherwise (a win needs 15 attacks of 9 on
    3 x 45 health, and no agent can die: 4 x at most 6 damage)."""
    import torch

    from training.actor import Actor
    from training.config import TrainConfig
    from training.mappo import Critic, Cursor, Policy, ValueNorm, collect
    from training.trainer import build_spec
    venv = Recording(make_vec_env(replace(SMAC_3M, episode_limit=4, n_envs=2), workers=0))
    g = torch.Generator().manual_seed(0)
    cfg = TrainConfig(env=SMAC_3M)
    policy = Policy.build(Actor.new_ps(build_spec(venv.info, cfg), g, -0.5), venv.info)
    critic, vnorm, gamma = Critic(venv.info.state_dim, 16), ValueNorm(), 0.9
    cur = Cursor(venv.reset(0), torch.zeros(3, 2, cfg.model.hidden), torch.ones(2, dtype=torch.bool))
    ro, _, episodes = collect(venv, policy, critic, vnorm, cur, 12, gamma, g)
    assert [len_ for _, len_, _ in episodes] == [4] * 6
    with torch.no_grad():
        for t, s in enumerate(venv.steps):
            assert list(s.done & ~s.terminated) == [t in (3, 7, 11)] * 2
            v_final = vnorm.denormalize(critic(torch.from_numpy(s.final_state)))
            expected = torch.from_numpy(s.reward) + gamma * v_final * torch.from_numpy(s.done)
            torch.testing.assert_close(ro.reward[t], expected)
    venv.close()


def test_seed_reaches_starcraft2env(sc2):
    """reset(seed) runs env i's game with seed + i (StarCraft2Env's `seed`, used when it launches);
    auto-resets restart the battle in the same game; a new seed relaunches (the old game closed)."""
    venv = make_vec_env(replace(SMAC_3M, episode_limit=3, n_envs=2), workers=0)
    venv.reset(7)
    assert [s for s, _ in StarCraft2Env.launches] == [7, 8]
    assert [e.env.seed() for e in venv.envs] == [7, 8]
    for _ in range(7):  # two time-outs each, auto-reset in the running games
        venv.step(np.full((2, 3), STOP))
    venv.reset(7)
    assert len(StarCraft2Env.launches) == 2 and StarCraft2Env.open_games == 2
    venv.reset(20)
    assert [s for s, _ in StarCraft2Env.launches] == [7, 8, 20, 21] and StarCraft2Env.open_games == 2
    venv.close()
    assert StarCraft2Env.open_games == 0


def test_reset_before_an_episode_ended_does_not_leak_a_game(sc2):
    """StarCraft2Env.reset launches a new game until it has counted an ended episode."""
    from training.envs.smac import SMACEnv
    env = SMACEnv(SMAC_3M, seed=3)
    env.reset(None)
    env.step(np.full(3, STOP))
    env.reset(None)
    assert len(StarCraft2Env.launches) == 2 and StarCraft2Env.open_games == 1
    env.close()


def test_unknown_map_lists_the_maps(standin):
    from training.envs.smac import SMACEnv
    with pytest.raises(ValueError, match=r"SMAC has no map '3mm'; its maps: 2s3z, 3m, 8m"):
        SMACEnv(replace(SMAC_3M, scenario="3mm"))
    with pytest.raises(ValueError, match="SMAC has no map"):
        make_vec_env(replace(SMAC_3M, scenario="3mm"))


def test_lorasa_train_unknown_map_is_one_line(sc2, tmp_path, capsys):
    """The CLI prints the unknown map as one `lorasa-train: error:` line (exit 2), not a traceback."""
    from training.cli import main
    status = main(["--env.kind", "smac", "--env.scenario", "3mm", "--env.n-envs", "1", "--env.workers", "0",
                   "--total-steps", "20", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert err.startswith("lorasa-train: error: SMAC has no map '3mm'; its maps: 2s3z, 3m, 8m")
    assert "\n" not in err and "Traceback" not in err


MISSING = {  # fake install variant -> what the error says
    "no_folder": "StarCraft II is not installed at",
    "no_versions": r"no StarCraft II version \(Versions/Base\*\)",
    "no_binary": "no StarCraft II binary at .*Base75689/SC2_x64",
    "no_map": "the SMAC map file .*SMAC_Maps/3m.SC2Map is missing",
}


def _broken_install(tmp_path: Path, case: str) -> Path:
    root = tmp_path / "sc2"
    if case != "no_folder":
        fake_install(root, versions=case != "no_versions", binary=case != "no_binary",
                     maps=() if case == "no_map" else ("3m",))
    return root


@pytest.mark.parametrize("case", sorted(MISSING))
def test_missing_game_is_env_unavailable_before_launch(standin, tmp_path, monkeypatch, case):
    from training.envs.smac import SMACEnv
    monkeypatch.setenv("SC2PATH", str(_broken_install(tmp_path, case)))
    with pytest.raises(EnvUnavailableError, match=MISSING[case] + ".*SC2PATH="):
        make_vec_env(SMAC_3M)
    env = SMACEnv(SMAC_3M)  # the constructor needs no game
    with pytest.raises(EnvUnavailableError, match=MISSING[case]):
        env.reset(0)
    assert not StarCraft2Env.launches


def test_missing_game_default_folder_names_sc2path(standin, tmp_path, monkeypatch):
    monkeypatch.delenv("SC2PATH", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(EnvUnavailableError, match=f"not installed at {tmp_path}/StarCraftII .SC2PATH is not"):
        make_vec_env(SMAC_3M)
    fake_install(tmp_path / "StarCraftII")
    make_vec_env(SMAC_3M, n_envs=1, workers=0).close()  # found at the default place


def test_env_worker_errors_keep_their_type_and_message(standin, tmp_path, monkeypatch):
    """Errors raised by reset / step inside env workers reach the parent as themselves."""
    monkeypatch.setenv("SC2PATH", str(_broken_install(tmp_path, "no_binary")))
    in_process = None
    try:
        make_single(SMAC_3M).reset(0)
    except EnvUnavailableError as e:
        in_process = str(e)
    venv = SubprocVecEnv(SMAC_3M, make_single, 2, 2)
    with pytest.raises(EnvUnavailableError) as err:
        venv.reset(0)
    assert in_process and str(err.value) == in_process
    assert isinstance(err.value.__cause__, WorkerTraceback)
    assert "env worker 0 failed to reset" in str(err.value.__cause__)

    fake_install(tmp_path / "ok", maps=("3m",))
    monkeypatch.setenv("SC2PATH", str(tmp_path / "ok"))
    venv = SubprocVecEnv(SMAC_3M, make_single, 2, 2)
    venv.reset(0)
    with pytest.raises(AssertionError, match="Agent 0 cannot perform action 0"):  # no-op while alive
        venv.step(np.zeros((2, 3), np.int64))
    assert not any(p.is_alive() for p in venv.procs)  # the parent closed every worker


def test_lorasa_train_on_smac_without_matplotlib(sc2, standin, tmp_path):
    """`lorasa-train --env.kind smac --env.scenario 3m` with the default env config (2 env workers) and
    matplotlib missing: the run finishes, --seed reaches every game, the plot is skipped with one note."""
    out, log = tmp_path / "run", tmp_path / "launches.txt"
    argv = ["--env.kind", "smac", "--env.scenario", "3m", "--env.n-envs", "2", "--seed", "5",
            "--total-steps", "40", "--switch-step", "20", "--ppo.rollout", "10", "--ppo.chunk", "10",
            "--ppo.epochs", "1", "--model.hidden", "16", "--ppo.critic-hidden", "16", "--eval-every", "0",
            "--eval-episodes", "0", "--final-eval-episodes", "1", "--out", str(out)]
    code = textwrap.dedent(f"""
        import sys
        sys.modules["matplotlib"] = None  # import matplotlib -> ImportError
        from training.cli import main
        sys.exit(main({argv!r}))
    """)
    tests_dir = str(Path(__file__).parent)
    path = os.pathsep.join([str(standin), tests_dir, os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "STANDIN_LOG": str(log)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    notes = [line for line in r.stderr.splitlines() if "matplotlib" in line]
    assert notes == ["note: matplotlib is not installed (pip install 'lorasa-serve[train]'), "
                     "learning_curve.png not drawn"]
    assert (out / "summary.json").exists() and (out / "backbone.safetensors").exists()
    assert not (out / "learning_curve.png").exists()
    seeds = sorted(int(s) for s in log.read_text().split())
    assert seeds[:2] == [5, 6]  # the training envs (eval envs use seed + 10000)
