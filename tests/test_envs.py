"""Environment adapters: real MaMuJoCo / SMAX instances (no mocks), vector envs against serial ones."""
from __future__ import annotations

import numpy as np
import pytest

from training.envs import EnvConfig, EnvUnavailableError, make_vec_env
from training.envs.vector import SerialVecEnv
from training.envs import make_single


def _random_gauss(info, E, rng):
    return rng.uniform(-1, 1, (E, info.n_agents, info.act_max)).astype(np.float32)


def test_mamujoco_heterogeneous_humanoid_padding():
    v = make_vec_env(EnvConfig(scenario="Humanoid", agent_conf="9|8", episode_limit=20), n_envs=2, workers=0)
    info = v.info
    assert info.obs_dims == (242, 170) and info.act_dims == (9, 8) and info.state_dim == 348
    step = v.reset(0)
    assert step.obs.shape == (2, 2, 242) and step.avail.shape == (2, 2, 9)
    assert np.all(step.obs[:, 1, 170:] == 0) and np.any(step.obs[:, 1, :170] != 0)
    assert info.dim_mask().tolist()[1] == [True] * 8 + [False]
    v.close()


def test_auto_reset_bookkeeping_on_truncation():
    """episode_limit 7: every 7th step ends the episode as a truncation, returns are reward sums."""
    v = make_vec_env(EnvConfig(episode_limit=7), n_envs=3, workers=0)
    rng = np.random.default_rng(0)
    step, total = v.reset(1), np.zeros(3)
    for t in range(1, 15):
        prev_state = step.state
        step = v.step(_random_gauss(v.info, 3, rng))
        total += step.reward
        if t % 7:
            assert not step.done.any()
            assert np.array_equal(step.final_state, step.state)
        else:
            assert step.done.all() and not step.terminated.any()
            np.testing.assert_allclose(step.ep_return, total, rtol=1e-5)
            assert (step.ep_length == 7).all()
            assert not np.allclose(step.final_state, step.state)  # obs/state already of the new episode
            total[:] = 0
        del prev_state
    v.close()


def test_subprocess_vector_env_matches_serial():
    """Same seeds and actions: 2 worker processes give exactly the serial env's numbers."""
    cfg = EnvConfig(episode_limit=5)
    serial = SerialVecEnv(cfg, make_single, 3)
    sub = make_vec_env(cfg, n_envs=3, workers=2)
    rng = np.random.default_rng(3)
    a, b = serial.reset(11), sub.reset(11)
    for _ in range(12):
        for k in ("obs", "state", "reward", "done", "final_state", "ep_return"):
            np.testing.assert_array_equal(getattr(a, k), getattr(b, k), err_msg=k)
        act = _random_gauss(serial.info, 3, rng)
        a, b = serial.step(act), sub.step(act)
    sub.close()
    serial.close()


def test_smax_vector_env_episodes_and_wins():
    """jit(vmap) SMAX: shapes, masks, auto-reset; wins agree with jaxmarl's own convention (final team
    reward >= 1 when the battle is won) and returns are the sums of the step rewards."""
    v = make_vec_env(EnvConfig(kind="smax", scenario="3m", episode_limit=0), n_envs=4)
    info = v.info
    assert info.action == "categorical" and info.n_agents == 3 and info.act_dims == (8, 8, 8)
    rng = np.random.default_rng(0)
    step, total, ended = v.reset(0), np.zeros(4), 0
    for _ in range(info.episode_limit + 5):
        assert step.avail.any(-1).all()
        u = rng.random(step.avail.shape) * step.avail
        step = v.step(u.argmax(-1))
        total += step.reward
        for e in np.flatnonzero(step.done):
            assert step.ep_return[e] == pytest.approx(total[e], rel=1e-5)
            assert step.ep_won[e] == float(step.reward[e] >= 1.0)
            total[e], ended = 0.0, ended + 1
    assert ended >= 4
    v.close()


def test_smac_adapter_is_optional():
    """oxwhirl's SMAC needs StarCraft II; without it the adapter fails with the install hint."""
    try:
        import smac.env  # noqa: F401
    except ImportError:
        with pytest.raises(EnvUnavailableError, match="StarCraft II"):
            make_vec_env(EnvConfig(kind="smac", scenario="3m"), n_envs=1, workers=0)
        return
    from training.envs.smac import SMACEnv
    info = SMACEnv(EnvConfig(kind="smac", scenario="3m", episode_limit=0)).info  # no game launched
    assert info.n_agents == 3 and info.action == "categorical"


def test_bad_env_configs_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown env kind"):
        make_vec_env(EnvConfig(kind="gym"), n_envs=1, workers=0)
    with pytest.raises(ValueError, match="SMAX has no map"):
        make_vec_env(EnvConfig(kind="smax", scenario="no_such_map"), n_envs=1)
    with pytest.raises(ValueError, match="MaMuJoCo cannot build"):
        make_vec_env(EnvConfig(scenario="HalfCheetah", agent_conf="7x9"), n_envs=1, workers=0)


def test_every_mamujoco_preset_builds():
    from training.config import PRESETS
    sizes = {"halfcheetah_2x3": 2, "walker2d_2x3": 2, "ant_4x2": 4, "humanoid_9_8": 2,
             "halfcheetah_2x3_reference": 2, "humanoid_9_8_reference": 2}
    obs = {"humanoid_9_8": 242, "humanoid_9_8_reference": 244}  # the reference's full observability: k=3
    for name, cfg in PRESETS.items():
        if cfg.env.kind != "mamujoco":
            assert cfg.env.kind == "smax" and cfg.env.scenario in ("3s5z", "3s5z_vs_3s6z")
            continue
        env = make_single(cfg.env)
        assert env.info.n_agents == sizes[name], name
        tr = env.reset(0)
        assert tr.obs.shape == (env.info.n_agents, env.info.obs_max)
        assert env.info.obs_max == obs.get(name, env.info.obs_max), name
        env.close()


def test_a_failing_env_worker_reports_its_error():
    from training.envs.vector import SubprocVecEnv
    with pytest.raises(ValueError, match="no single-env adapter") as err:  # its own type and message
        SubprocVecEnv(EnvConfig(kind="smax", scenario="3m"), make_single, n_envs=2, workers=1)
    assert "env worker 0 failed to start" in str(err.value.__cause__)
