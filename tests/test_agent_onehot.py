"""Agent one-hot ("PS+ID", issue 21): a policy trained with it records `agent_onehot` in policy.json and
every runtime appends the agent's one-hot itself, so clients send the plain observation. Checked against
the float64 per-row oracle (tests/reference.py builds the input [obs padded | e_agent] by hand): Engine in
every mode, a merged single-agent export, per-agent and multi-agent ONNX graphs, and training."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_policy, on_device, require_extra
from reference import forward_loop, zero_padding

from lorasa_serve import Engine, PolicySpec, load_policy
from lorasa_serve.errors import SpecError
from lorasa_serve.spec import AgentSpec

HETERO = dict(obs=(12, 8, 10), act=(3, 2, 3), hidden=16)


@pytest.fixture
def onehot_policy(tmp_path):
    d = tmp_path / "p"
    spec, backbone, ads = make_policy(d, agent_onehot=3, **HETERO)
    return d, spec, backbone, ads


def test_spec_shapes_and_file(onehot_policy, tmp_path):
    d, spec, _, _ = onehot_policy
    assert spec.input_width == 12 + 3
    assert spec.backbone_shapes()["mlp.0.weight"] == (16, 15) and spec.backbone_shapes()["ln_in.weight"] == (15,)
    raw = json.loads((d / "policy.json").read_text())
    assert raw["agent_onehot"] == 3 and all("onehot_index" not in a for a in raw["agents"])
    make_policy(tmp_path / "plain")
    assert "agent_onehot" not in json.loads((tmp_path / "plain" / "policy.json").read_text())
    with pytest.raises(SpecError, match="one-hot"):
        PolicySpec(agents=(AgentSpec("a", 3, 1), AgentSpec("b", 3, 1, onehot_index=0)), agent_onehot=2)
    with pytest.raises(SpecError, match="agent_onehot is 0"):
        PolicySpec(agents=(AgentSpec("a", 3, 1, onehot_index=0),))


@pytest.mark.parametrize("mode", ["lora", "merged", "auto"])
def test_engine_appends_the_one_hot(onehot_policy, device, mode):
    d, spec, backbone, ads = onehot_policy
    eng = Engine.from_dir(d, device=device, mode=mode)
    g = torch.Generator().manual_seed(0)
    ids = [spec.agent_ids[i] for i in torch.randint(3, (33,), generator=g).tolist()]
    obs = zero_padding(spec, ids, torch.randn(33, spec.obs_max, generator=g))
    h = torch.randn(33, spec.hidden, generator=g) * 0.5
    head, h_next = eng.forward(ids, *on_device(device, obs, h))
    ref_head, ref_h = forward_loop(spec, backbone, ads, ids, obs, h)
    torch.testing.assert_close(head.cpu().double(), ref_head, atol=1e-5, rtol=0)
    torch.testing.assert_close(h_next.cpu().double(), ref_h, atol=1e-5, rtol=0)
    # the one-hot matters: the same row as another agent's id differs even with identical adapters
    same = {a: ads["agent_0"] for a in spec.agent_ids}
    eng2 = Engine(spec, backbone, same, device=device, mode=mode)
    o = torch.randn(1, spec.obs_max).repeat(2, 1)
    o[:, 8:] = 0  # inside every agent's obs_dim
    out, _ = eng2.forward(["agent_0", "agent_1"], o.to(device))
    assert (out[0, :2] - out[1, :2]).abs().max() > 1e-3


def test_a_new_agent_needs_a_free_column(onehot_policy):
    d, spec, backbone, ads = onehot_policy
    eng = Engine.from_dir(d, device="cpu")
    with pytest.raises(SpecError, match="one-hot"):
        eng.set_adapter("agent_9", ads["agent_0"], AgentSpec("agent_9", 5, 2))


def test_merged_export_keeps_the_agents_column(onehot_policy, tmp_path):
    from exporters.merged import write_merged
    d, spec, backbone, ads = onehot_policy
    eng = Engine.from_dir(d, device="cpu")
    obs = torch.randn(4, spec.obs_max)
    obs[:, 8:] = 0
    for a in spec.agent_ids:
        one = write_merged(eng, a, tmp_path / f"m_{a}")
        assert one.agent_onehot == 3 and one.agents[0].onehot_index == spec.agent_ids.index(a)
        single = Engine.from_dir(tmp_path / f"m_{a}", device="cpu")
        act = spec.agent(a).act_dim
        want, _ = eng.forward([a] * 4, obs)
        got, _ = single.forward([a] * 4, obs[:, :single.spec.obs_max])
        torch.testing.assert_close(got[:, :act], want[:, :act], atol=1e-5, rtol=0)


def test_onnx_graphs(onehot_policy, tmp_path):
    require_extra("onnx", "onnx", "onnxruntime", "onnxscript")
    from exporters import ExportConfig, export_policy
    from lorasa_serve.onnx_backend import OnnxEngine
    d, spec, backbone, ads = onehot_policy
    for merge in (False, True):
        out = tmp_path / f"x{merge}"
        report = export_policy(ExportConfig(d, out, merge=merge, formats=("onnx",), progress=False, envs=2,
                                            steps=20))
        assert report.ok, report.table()  # verified against the Engine over recurrent rollouts
        oe = OnnxEngine.from_dir(out)
        assert oe.multi_agent != merge
        ids = ["agent_2", "agent_0", "agent_1"]
        obs = np.random.default_rng(0).standard_normal((3, spec.obs_max)).astype(np.float32)
        for i, a in enumerate(ids):
            obs[i, spec.agent(a).obs_dim:] = 0
        head, _ = oe.forward(ids, obs)
        ref, _ = forward_loop(spec, backbone, ads, ids, torch.from_numpy(obs))
        for i, a in enumerate(ids):
            k = spec.agent(a).act_dim
            np.testing.assert_allclose(head[i, :k].numpy(), ref[i, :k].numpy(), atol=1e-5)


def test_training_with_one_hot_serves_the_same_policy(tmp_path):
    """A short PS run with --model.agent-onehot: the policy dir records it, and the Engine on it gives
    the training actor's deterministic actions on the same observations."""
    require_extra("mujoco", "gymnasium_robotics", "mujoco")
    from training.cli import parse_config
    from training.mappo import grouped
    from training.trainer import Trainer, load_run_policy
    out = tmp_path / "run"
    cfg, _ = parse_config(["--preset", "halfcheetah_2x3", "--mode", "ps", "--model.agent-onehot",
                           "--total-steps", "1600", "--env.n-envs", "2", "--ppo.rollout", "100",
                           "--eval-episodes", "0", "--final-eval-episodes", "0", "--no-tensorboard",
                           "--out", str(out)])
    Trainer(cfg).train(progress=False)
    spec, _, _ = load_policy(out)
    assert spec.agent_onehot == 2
    policy, _ = load_run_policy(out)
    eng = Engine.from_dir(out, device="cpu")
    obs = np.random.default_rng(1).standard_normal((3, 2, spec.obs_max)).astype(np.float32)  # [E, N, D]
    for n, a in enumerate(spec.agents):
        obs[:, n, a.obs_dim:] = 0
    with torch.no_grad():
        o = grouped(obs)  # [N, E, D]
        acts, _, _ = policy.act(o, torch.zeros(2, 3, spec.hidden), torch.ones(2, 3, dtype=torch.bool),
                                torch.ones(2, 3, spec.act_max, dtype=torch.bool), True, None)
    ids = [a for _ in range(3) for a in spec.agent_ids]
    got = eng.act(ids, obs.reshape(6, -1), None, None).actions.reshape(3, 2, -1).transpose(0, 1)
    torch.testing.assert_close(got, acts, atol=1e-5, rtol=0)
