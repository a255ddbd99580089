"""End-to-end training on tiny budgets with real environments: both LoRASA phases on MaMuJoCo and SMAX,
phase 2 from a phase-1 directory, resume, NPS; the outputs load in the Engine and run in lorasa-eval."""
from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lorasa_serve import Engine, PolicySpec, load_policy
from training.actor import Actor, param_counts
from training.config import LoraConfig, ModelConfig, PPOConfig, TrainConfig
from training.envs import EnvConfig, make_vec_env
from training.evaluate import main as eval_main
from training.mappo import Critic, Cursor, Policy, ValueNorm, collect, to_sequences
from training.trainer import Trainer, build_spec

TINY_PPO = PPOConfig(rollout=20, chunk=10, epochs=2, minibatches=2, critic_hidden=32)
TINY_MODEL = ModelConfig(hidden=16)


def tiny(out: Path, env: EnvConfig, **kw) -> TrainConfig:
    base = dict(env=env, model=TINY_MODEL, ppo=TINY_PPO, lora=LoraConfig(rank=2, alpha=4.0, lr=3e-3),
                total_steps=160, switch_step=80, out=str(out), eval_every=80, eval_episodes=2,
                save_every=80, tensorboard=False)
    base.update(kw)
    return TrainConfig(**base)


CHEETAH = EnvConfig(episode_limit=30, n_envs=2, workers=0)
SMAX_3M = EnvConfig(kind="smax", scenario="3m", episode_limit=0, n_envs=4, workers=0)


def backbone_bytes(policy_dir: Path) -> dict[str, bytes]:
    """Every backbone tensor's raw bytes (the file's JSON header order is not deterministic)."""
    return {k: v.numpy().tobytes() for k, v in load_file(str(policy_dir / "backbone.safetensors")).items()}


def _rows(out: Path) -> list[dict]:
    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _eval_json(policy_dir: Path, tmp: Path, *extra: str, episodes: int = 2) -> dict:
    path = tmp / f"eval_{policy_dir.name}.json"
    assert eval_main([str(policy_dir), "--episodes", str(episodes), "--json", str(path), *extra]) == 0
    return json.loads(path.read_text())


@pytest.mark.parametrize("env", [CHEETAH, SMAX_3M], ids=["mamujoco", "smax"])
def test_rollout_log_probs_recomputed_from_gru_chunks(env):
    """What PPO recomputes from chunked sequences (stored h at chunk starts, resets inside chunks)
    equals what the rollout sampled step by step."""
    venv = make_vec_env(replace(env, episode_limit=7) if env.kind == "mamujoco" else env)
    cfg = TrainConfig(env=env, model=TINY_MODEL)
    g = torch.Generator().manual_seed(0)
    policy = Policy.build(Actor.new_ps(build_spec(venv.info, cfg), g, -0.5), venv.info)
    critic = Critic(venv.info.state_dim, 16)
    E, N = venv.n_envs, venv.info.n_agents
    cur = Cursor(venv.reset(0), torch.zeros(N, E, 16), torch.ones(E, dtype=torch.bool))
    ro, _, _ = collect(venv, policy, critic, ValueNorm(), cur, 20, 0.99, g)
    assert ro.reset[1:].any()  # episodes restart inside the rollout
    L = 5
    with torch.no_grad():
        logp, _ = policy.evaluate(to_sequences(ro.obs, L, 2), to_sequences(ro.h, L, 2)[0],
                                  to_sequences(ro.reset, L, 1).unsqueeze(1).expand(-1, N, -1),
                                  to_sequences(ro.avail, L, 2), to_sequences(ro.actions, L, 2))
    torch.testing.assert_close(logp, to_sequences(ro.logp, L, 2), rtol=1e-4, atol=1e-4)
    venv.close()


def test_mamujoco_two_phases_then_resume(tmp_path):
    out = tmp_path / "run"
    summary = Trainer(tiny(out, CHEETAH)).train(progress=False)
    assert summary["env_steps"] == 160
    rows = _rows(out)
    assert [r["phase"] for r in rows] == ["ps"] * 2 + ["lora"] * 2
    assert (out / "learning_curve.png").stat().st_size > 1000
    assert rows[-1]["eval_return"] != ""

    # phase 2 kept the backbone byte for byte and trained the adapters
    p1 = out / "phase1"
    assert backbone_bytes(p1) == backbone_bytes(out)
    spec, _, adapters = load_policy(out)
    assert not load_policy(p1)[2] and set(adapters) == {"agent_0", "agent_1"}
    assert all(float(t[k].abs().max()) > 0 for t in adapters.values() for k in t if "lora_B" in k)
    a0, a1 = adapters["agent_0"], adapters["agent_1"]
    assert not torch.equal(a0["head.lora_B.weight"], a1["head.lora_B.weight"])

    res = _eval_json(out, tmp_path, "--compare-random")
    assert res["policy"]["episodes"] == 2 and np.isfinite(res["policy"]["mean_return"])
    assert res["random"]["episodes"] == 2 and res["param_counts"]["agents"] == 2
    assert Engine.from_dir(out, device="cpu").versions() == {"agent_0": 1, "agent_1": 1}

    before = load_file(str(out / "train_state" / "critic.safetensors"))
    Trainer(replace(tiny(out, CHEETAH), total_steps=200), resume=True).train(progress=False)
    rows2 = _rows(out)
    assert len(rows2) == 5 and rows2[-1]["env_steps"] == "200" and rows2[-1]["phase"] == "lora"
    assert backbone_bytes(p1) == backbone_bytes(out)
    after = load_file(str(out / "train_state" / "critic.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the critic kept training


def test_phase2_from_a_phase1_directory(tmp_path):
    ps_out, lora_out = tmp_path / "ps", tmp_path / "lora"
    Trainer(tiny(ps_out, CHEETAH, mode="ps", total_steps=80)).train(progress=False)
    assert not (ps_out / "adapters").exists()
    Trainer(tiny(lora_out, CHEETAH, mode="lorasa", init_from=str(ps_out), total_steps=120)).train(progress=False)
    rows = _rows(lora_out)
    assert [r["env_steps"] for r in rows] == ["120"] and rows[0]["phase"] == "lora"  # continues at 80
    assert backbone_bytes(ps_out) == backbone_bytes(lora_out)
    assert _eval_json(lora_out, tmp_path)["policy"]["episodes"] == 2


def test_smax_two_phases(tmp_path):
    out = tmp_path / "smax"
    Trainer(tiny(out, SMAX_3M, eval_episodes=4)).train(progress=False)
    assert [r["phase"] for r in _rows(out)] == ["ps", "lora"]  # 4 envs x 20 steps per update
    assert backbone_bytes(out / "phase1") == backbone_bytes(out)
    res = _eval_json(out, tmp_path, episodes=4)  # 4 envs: reuses the compiled SMAX functions
    assert res["policy"]["episodes"] == 4 and 0.0 <= res["policy"]["win_rate"] <= 1.0


def test_nps_trains_per_agent_networks(tmp_path):
    out = tmp_path / "nps"
    s = Trainer(tiny(out, CHEETAH, mode="nps", total_steps=40, eval_every=0)).train(progress=False)
    meta = json.loads((out / "train_state" / "state.json").read_text())
    assert s["trainable_params"] == param_counts(PolicySpec.from_dict(meta["spec"]))["nps_total"]
    assert meta["actor_kind"] == "nps" and not (out / "policy.json").exists()
    res = _eval_json(out, tmp_path)  # acts with the NPS training actor
    assert res["via"].startswith("the NPS training actor") and res["policy"]["episodes"] == 2
    assert res["param_counts"]["nps_total"] == s["trainable_params"]


def test_steps_are_rounded_to_whole_updates_and_recorded(tmp_path, capsys):
    """--total-steps / --switch-step that are not multiples of n_envs x rollout (2 x 20 = 40) are
    rounded up: said at the start, the bar ends at the rounded total, summary.json records both."""
    out = tmp_path / "run"
    s = Trainer(tiny(out, CHEETAH, total_steps=90, switch_step=50, eval_every=0, eval_episodes=0,
                     final_eval_episodes=0, save_every=0)).train(progress=True)
    assert (s["steps_per_update"], s["total_steps_rounded"], s["switch_step_rounded"]) == (40, 120, 80)
    assert s["env_steps"] == 120 and s["phase_switch_step"] == 80  # where it really ended and switched
    captured = capsys.readouterr()
    err = captured.out + captured.err  # tqdm.write: stdout; the bar: stderr
    assert "--total-steps 90 -> 120, --switch-step 50 -> 80 (rounded up to multiples of 40" in err
    assert "120/120" in err and "160/" not in err  # the bar ends at its total
    ps = Trainer(tiny(tmp_path / "ps", CHEETAH, mode="ps", total_steps=80, eval_every=0, eval_episodes=0,
                      final_eval_episodes=0, save_every=0)).train(progress=False)
    assert (ps["total_steps_rounded"], ps["switch_step_rounded"]) == (80, None)  # no switch in a PS run


@pytest.mark.slow
def test_eval_through_http_service_equals_in_process(tmp_path):
    """lorasa-eval --url against a real `bentoml serve` of a freshly trained policy gives the same
    deterministic episodes as acting through Engine.act in-process."""
    from benchmarks.servers import ServerProcess
    out = tmp_path / "run"
    Trainer(tiny(out, CHEETAH, total_steps=80, switch_step=40, eval_every=0, eval_episodes=0)).train(progress=False)
    local = _eval_json(out, tmp_path)
    with ServerProcess({"LORASA_POLICY": str(out), "LORASA_STATE_DIR": str(tmp_path / "state")},
                       tmp_path / "server.log") as server:
        path = tmp_path / "http.json"
        assert eval_main([str(out), "--episodes", "2", "--json", str(path), "--url", server.url]) == 0
    remote = json.loads(path.read_text())
    assert "HTTP" in remote["via"] and "in-process" in local["via"]
    np.testing.assert_allclose(remote["policy"]["returns"], local["policy"]["returns"], rtol=1e-4)
