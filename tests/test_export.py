"""Exporters vs the per-row float64 oracle (tests/reference.py): merged weights, per-agent and
multi-agent ONNX graphs over recurrent rollouts, and the OnnxEngine backend vs the Engine."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_policy as _make_policy
from conftest import require_extra
from reference import forward_loop, merged_linears, zero_padding

from exporters import ExportConfig, export_policy, onnx_engine_from_policy
from exporters.merged import merged_policy, write_merged
from exporters.observations import env_rollout, real_env_config
from lorasa_serve import ArtifactError, Engine, InputError, UnknownAgentError, save_policy
from lorasa_serve.onnx_backend import OnnxEngine, OnnxRuntimeMissingError, select_providers

require_extra("onnx", "onnx", "onnxruntime", "onnxscript")
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

HETERO = dict(obs=(242, 170), act=(9, 8), hidden=16)  # MaMuJoCo Humanoid 9|8 sizes
TOL = 1e-5
STEPS = 20
HEAD_SCALE = 0.1  # conftest's heads have gain 1 (outputs ~4); MAPPO initialises them at 0.01


def make_policy(directory, **kw):
    """conftest's policy with the head (and its adapters) scaled to a realistic output size.

    At gain 1 two correct fp32 implementations already differ by ~1e-5 (the Engine's own merged and
    unmerged modes by up to 8e-6, see exporters/verify.py), so a 1e-5 check would test rounding."""
    spec, backbone, ads = _make_policy(directory, **kw)
    backbone["head.weight"] = backbone["head.weight"] * HEAD_SCALE
    for ad in ads.values():
        if "head.lora_B.weight" in ad:
            ad["head.lora_B.weight"] = ad["head.lora_B.weight"] * HEAD_SCALE
    spec = save_policy(directory, spec, backbone, ads)
    return spec, backbone, ads


def export(policy, out, **kw) -> None:
    report = export_policy(ExportConfig(policy, out, progress=False, envs=3, steps=STEPS, **kw))
    assert report.ok, report.table()


def onnx_rollout(path, spec, backbone, ads, ids, multi: bool, seed=0):
    """Teacher-forced rollout: every step, onnxruntime vs the oracle from the same (ONNX) state.

    Returns the largest difference of heads and states; checks actions and masks exactly."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    g = torch.Generator().manual_seed(seed)
    B = len(ids)
    obs_dims = torch.tensor([spec.agent(a).obs_dim for a in ids])
    act_dims = torch.tensor([spec.agent(a).act_dim for a in ids])
    width = spec.act_max if multi else int(act_dims[0])
    cols = spec.obs_max if multi else int(obs_dims[0])
    h = torch.zeros(B, spec.hidden)
    worst = 0.0
    for t in range(STEPS):
        obs = torch.randn(B, cols, generator=g) * (torch.arange(cols) < obs_dims[:, None])
        reset = (torch.rand(B, generator=g) < 0.2) | (t == 0)
        avail = torch.rand(B, width, generator=g) < 0.6
        avail[torch.arange(B), (torch.rand(B, generator=g) * act_dims).long()] = True
        feeds = {"obs": obs.numpy()}
        if multi:  # columns past a row's obs_dim hold garbage: the graph must ignore them
            feeds["obs"] = (obs + 123.0 * (torch.arange(cols) >= obs_dims[:, None])).numpy()
            feeds["agent_index"] = np.array([spec.agent_ids.index(a) for a in ids])
        if spec.recurrent:
            feeds.update(state=h.numpy(), reset=reset.numpy())
        if spec.action == "categorical":
            feeds["avail"] = avail.numpy()
        out = dict(zip(names, sess.run(None, feeds)))
        ref_head, ref_h = forward_loop(spec, backbone, ads, ids, _pad(obs, spec.obs_max),
                                       h if spec.recurrent else None, reset)
        dim_mask = torch.arange(width) < act_dims[:, None]
        ref = ref_head[:, :width]
        if spec.action == "gaussian":
            want = torch.where(dim_mask, ref, torch.zeros_like(ref))
            worst = max(worst, _maxdiff(out["mean"], want), _maxdiff(out["action"], want))
            log_std = backbone["log_std"][:width] * dim_mask
            assert np.array_equal(out["log_std"], log_std.numpy())
        else:
            valid = (dim_mask & avail).numpy()
            logits = out["logits"]
            assert (logits[~valid] == np.finfo(np.float32).min).all()  # masked exactly
            worst = max(worst, _maxdiff(np.where(valid, logits, 0), torch.where(torch.from_numpy(valid), ref, 0)))
            chosen = out["action"]
            assert valid[np.arange(B), chosen].all()  # never an unavailable action
            best = ref.masked_fill(~torch.from_numpy(valid), -np.inf).max(1).values
            assert (best - ref[torch.arange(B), torch.from_numpy(chosen)] <= TOL).all()
        if spec.recurrent:
            worst = max(worst, _maxdiff(out["state_out"], ref_h))
            h = torch.from_numpy(out["state_out"])
    return worst


def _pad(x, width):
    return torch.nn.functional.pad(x, (0, width - x.shape[1]))


def _maxdiff(a, b) -> float:
    return float((torch.as_tensor(np.asarray(a)).double() - torch.as_tensor(b).double()).abs().max())


# --- merged safetensors ------------------------------------------------------------------------
@pytest.mark.parametrize("action", ["gaussian", "categorical"])
def test_merged_equals_unmerged(tmp_path, action):
    spec, backbone, ads = make_policy(tmp_path / "p", action=action, **HETERO)
    eng = Engine.from_dir(tmp_path / "p", device="cpu", mode="lora")
    for agent in spec.agents:
        one, tensors = merged_policy(eng, agent.agent_id)
        by_hand = merged_linears(spec, backbone, ads[agent.agent_id])
        for name, (w, _) in by_hand.items():
            w = w[:agent.act_dim] if name == "head" else w
            torch.testing.assert_close(tensors[f"{name}.weight"].double(), w, atol=1e-6, rtol=0)
        d = tmp_path / "merged" / agent.agent_id
        write_merged(eng, agent.agent_id, d)
        assert not (d / "adapters").exists()
        merged = Engine.from_dir(d, device="cpu")
        assert merged.spec.obs_max == spec.obs_max and merged.spec.act_max == agent.act_dim
        assert (merged.spec.obs_width is None) == (agent.obs_dim == spec.obs_max)
        g = torch.Generator().manual_seed(1)
        ids = [agent.agent_id] * 9
        obs = torch.randn(9, agent.obs_dim, generator=g)
        h, reset = torch.randn(9, spec.hidden, generator=g), torch.rand(9, generator=g) < 0.3
        head_m, h_m = merged.forward(ids, obs, h, reset)
        head_u, h_u = eng.forward(ids, obs, h, reset, mode="lora")
        torch.testing.assert_close(head_m, head_u[:, :agent.act_dim], atol=TOL, rtol=0)
        torch.testing.assert_close(h_m, h_u, atol=TOL, rtol=0)
        ref_head, _ = forward_loop(spec, backbone, ads, ids, _pad(obs, spec.obs_max), h, reset)
        torch.testing.assert_close(head_m.double(), ref_head[:, :agent.act_dim], atol=TOL, rtol=0)


def test_merged_spec_without_obs_width_is_version1_json(tmp_path):
    spec, _, _ = make_policy(tmp_path / "p")
    assert "obs_width" not in json.loads((tmp_path / "p" / "policy.json").read_text())


# --- per-agent ONNX --------------------------------------------------------------------------------
@pytest.mark.parametrize("action,recurrent", [("gaussian", True), ("gaussian", False),
                                              ("categorical", True), ("categorical", False)])
def test_per_agent_onnx_matches_oracle(tmp_path, action, recurrent):
    spec, backbone, ads = make_policy(tmp_path / "p", action=action, recurrent=recurrent, **HETERO)
    export(tmp_path / "p", tmp_path / "out", merge=True, formats=("onnx",), agents=("agent_1",))
    path = tmp_path / "out" / "onnx" / "agent_1.onnx"
    model = onnx.load(str(path))
    ops = {n.op_type for n in model.graph.node}
    assert "GRU" not in ops and (not recurrent or {"Sigmoid", "Tanh"} <= ops)
    ins = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert ins["obs"] == ["batch", 170]  # the agent's true size; padded inside the graph
    assert ("state" in ins) == recurrent and ("avail" in ins) == (action == "categorical")
    assert not (tmp_path / "out" / "onnx" / "agent_0.onnx").exists()
    assert onnx_rollout(path, spec, backbone, ads, ["agent_1"] * 5, multi=False) <= TOL


# --- multi-agent ONNX ------------------------------------------------------------------------------
@pytest.mark.parametrize("impl,action", [("dense", "categorical"), ("gather", "gaussian")])
def test_multi_agent_onnx_matches_oracle_and_engine(tmp_path, impl, action):
    spec, backbone, ads = make_policy(tmp_path / "p", action=action, obs=(242, 170, 242),
                                      act=(9, 8, 9), hidden=16, layers=("mlp.0", "gru.h", "head"))
    export(tmp_path / "p", tmp_path / "out", lora_impl=impl)
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "out/onnx/multi_agent.onnx")).metadata_props}
    assert meta["lorasa.lora_impl"] == impl
    ids = [spec.agent_ids[i] for i in [2, 0, 1, 1, 0, 2, 2, 1]]  # a shuffled mixed batch
    assert onnx_rollout(tmp_path / "out/onnx/multi_agent.onnx", spec, backbone, ads, ids, multi=True) <= TOL
    # served through OnnxEngine: same actions, log-probs and states as the Engine
    oe, eng = OnnxEngine.from_dir(tmp_path / "out"), Engine.from_dir(tmp_path / "p", device="cpu")
    _same_as_engine(oe, eng)
    _same_as_engine(oe, eng, B=1)  # the batch dimension is dynamic down to one row


def _same_as_engine(oe: OnnxEngine, eng: Engine, B: int = 40):
    spec = eng.spec
    g = torch.Generator().manual_seed(3)
    ids = [spec.agent_ids[i] for i in torch.randint(len(spec.agents), (B,), generator=g)]
    obs = zero_padding(spec, ids, torch.randn(B, spec.obs_max, generator=g))
    h, reset = torch.randn(B, spec.hidden, generator=g), torch.rand(B, generator=g) < 0.3
    if not spec.recurrent:
        h = reset = None
    avail = None
    if spec.action == "categorical":
        avail = torch.rand(B, spec.act_max, generator=g) < 0.6
        avail[:, 1] = True
    for det in (True, False):
        a = oe.act(ids, obs, h, reset, avail, deterministic=det, generator=torch.Generator().manual_seed(7))
        b = eng.act(ids, obs, h, reset, avail, deterministic=det, generator=torch.Generator().manual_seed(7))
        if spec.action == "categorical":
            assert torch.equal(a.actions, b.actions)
        else:
            torch.testing.assert_close(a.actions, b.actions, atol=TOL, rtol=0)
        torch.testing.assert_close(a.log_probs, b.log_probs, atol=1e-4, rtol=0)
        if spec.recurrent:
            torch.testing.assert_close(a.state, b.state, atol=TOL, rtol=0)
        else:
            assert a.state is None and b.state is None


# --- OnnxEngine over per-agent graphs, errors, providers ----------------------------------------------
@pytest.fixture(scope="module")
def merged_export(tmp_path_factory):
    d = tmp_path_factory.mktemp("merged_export")
    make_policy(d / "p", action="categorical", obs=(7, 5), act=(4, 3), hidden=16)
    export(d / "p", d / "out", merge=True)
    return d


def test_onnx_engine_groups_rows_over_per_agent_graphs(merged_export):
    oe = OnnxEngine.from_dir(merged_export / "out")
    assert not oe.multi_agent
    _same_as_engine(oe, Engine.from_dir(merged_export / "p", device="cpu"))
    _same_as_engine(oe, Engine.from_dir(merged_export / "p", device="cpu"), B=1)


def test_onnx_engine_from_policy_plain_backbone(tmp_path):
    """The one-call constructor (for lorasa-bench), on a policy without adapters (PS checkpoint)."""
    _make_policy(tmp_path / "p", adapters=False, obs=(5, 7), act=(2, 3), hidden=16, recurrent=False)
    oe = onnx_engine_from_policy(tmp_path / "p")
    assert oe.multi_agent and not oe.spec.recurrent
    _same_as_engine(oe, Engine.from_dir(tmp_path / "p", device="cpu"))


def test_onnx_engine_serves_what_the_manifest_verified(merged_export, tmp_path):
    import shutil
    out = tmp_path / "out"
    shutil.copytree(merged_export / "out", out)
    # a file an older export left behind is not listed as verified: ignored
    shutil.copy(out / "onnx" / "agent_0.onnx", out / "onnx" / "multi_agent.onnx")
    assert not OnnxEngine.from_dir(out).multi_agent
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["artifacts"] = [a for a in manifest["artifacts"] if a["agent"] != "agent_1"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"no verified ONNX graph for agents \['agent_1'\]"):
        OnnxEngine.from_dir(out)
    shutil.copy(merged_export / "out" / "manifest.json", out / "manifest.json")
    spec = json.loads((out / "policy.json").read_text())
    spec["backbone_fingerprint"] = "0" * 64  # graphs from another backbone than policy.json names
    (out / "policy.json").write_text(json.dumps(spec))
    with pytest.raises(ArtifactError, match="exported from backbone"):
        OnnxEngine.from_dir(out)
    with pytest.raises(ArtifactError, match="not an export directory"):
        OnnxEngine.from_dir(merged_export / "p")


def test_onnx_engine_bad_input_is_typed(merged_export):
    oe = OnnxEngine.from_dir(merged_export / "out")
    obs, h = np.zeros((2, 7), np.float32), np.zeros((2, 16), np.float32)
    with pytest.raises(UnknownAgentError):
        oe.act(["agent_0", "nobody"], obs, h)
    with pytest.raises(InputError, match="row 0: obs has 8 values, more than the policy's obs_max 7"):
        oe.act(["agent_0", "agent_1"], np.zeros((2, 8), np.float32), h)
    with pytest.raises(InputError, match="NaN"):
        oe.act(["agent_0", "agent_1"], np.full((2, 7), np.nan, np.float32), h)
    with pytest.raises(InputError, match="no available action"):
        oe.act(["agent_0", "agent_1"], obs, h, avail=np.array([[1, 0, 0, 0], [0, 0, 0, 1]]))  # agent_1 has 3
    with pytest.raises(InputError, match="row 0: state has 3 values, expected the policy's hidden size 16"):
        oe.act(["agent_0", "agent_1"], obs, np.zeros((2, 3), np.float32))


def test_onnx_engine_needs_onnxruntime(merged_export, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(OnnxRuntimeMissingError, match="pip install"):
        OnnxEngine.from_dir(merged_export / "out")


def test_provider_selection(caplog):
    assert select_providers("cpu") == ["CPUExecutionProvider"]
    with caplog.at_level("INFO", logger="lorasa_serve.onnx"):
        auto = select_providers("auto")
    assert auto[-1] == "CPUExecutionProvider"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert auto == ["CPUExecutionProvider"] and "using CPUExecutionProvider" in caplog.text
    with pytest.raises(ValueError, match="not available"):
        select_providers(["NoSuchExecutionProvider"])


def test_env_json_chooses_real_observations(tmp_path):
    spec, _, _ = make_policy(tmp_path / "p", obs=(12, 12), act=(3, 3))
    cfg, note = real_env_config(tmp_path / "p", spec)
    assert cfg["scenario"] == "HalfCheetah" and "no env.json" in note
    (tmp_path / "p" / "env.json").write_text(json.dumps({"kind": "gridworld", "scenario": "x"}))
    cfg, note = real_env_config(tmp_path / "p", spec)
    assert cfg is None and "no known environment" in note
    (tmp_path / "p" / "env.json").write_text(json.dumps(
        {"kind": "mamujoco", "scenario": "Walker2d", "agent_conf": "2x3", "agent_obsk": 1}))
    cfg, note = real_env_config(tmp_path / "p", spec)
    assert cfg["scenario"] == "Walker2d" and "env.json" in note
    (tmp_path / "p" / "env.json").write_text(json.dumps({"env": {"kind": "mamujoco", "scenario": "Ant",
                                                                 "agent_conf": "4x2"}, "seed": 1}))
    cfg, _ = real_env_config(tmp_path / "p", spec)  # training's layout: the env block nested
    assert (cfg["scenario"], cfg["agent_conf"], cfg["agent_obsk"]) == ("Ant", "4x2", 1)


def test_real_smax_observations_and_action_masks(tmp_path):
    """A Categorical policy with SMAX 2s3z sizes is verified on real observations and the game's own
    available-action masks, through episode ends (auto-reset) inside the rollout."""
    require_extra("smax", "jaxmarl", "jax")
    env = {"kind": "smax", "scenario": "2s3z", "episode_limit": 8}
    spec, _, _ = make_policy(tmp_path / "p", action="categorical", obs=(127,) * 5, act=(10,) * 5,
                             hidden=16, recurrent=True)
    (tmp_path / "p" / "env.json").write_text(json.dumps({"env": env, "trained_by": "test"}))
    roll = env_rollout(env, Engine.from_dir(tmp_path / "p", device="cpu"), STEPS, 2, 0.0, 0)
    assert roll.source == "smax 2s3z" and roll.reset[1:].any()  # episodes of 8 steps ended
    masks = np.stack([roll.avail[a] for a in spec.agent_ids])
    assert masks.any(-1).all() and not masks.all()  # real masks: some actions unavailable
    report = export_policy(ExportConfig(tmp_path / "p", tmp_path / "out", progress=False, envs=2,
                                        steps=STEPS))
    assert report.ok and "real smax 2s3z observations" in report.notes[0], report.notes


def test_exports_into_one_out_are_additive_and_other_policies_refused(tmp_path):
    """A second export into the same --out keeps what the first wrote (listed in the manifest), a
    merged directory gets the usual permissions (not mkdtemp's 0700), and an --out holding another
    policy's export is refused before anything is written."""
    import os
    from exporters import ExportError
    make_policy(tmp_path / "p", **HETERO)
    out = tmp_path / "out"

    def run(agents, policy=tmp_path / "p"):
        rep = export_policy(ExportConfig(policy, out, merge=True, agents=agents, formats=("safetensors",),
                                         progress=False, envs=2, steps=STEPS))
        assert rep.ok, rep.table()

    run(("agent_0", "agent_1"))
    run(("agent_0",))
    listed = {(a["agent"], a["kind"]) for a in json.loads((out / "manifest.json").read_text())["artifacts"]}
    assert listed == {("agent_0", "safetensors"), ("agent_1", "safetensors")}
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "merged" / "agent_1").stat().st_mode & 0o777 == 0o777 & ~umask
    make_policy(tmp_path / "other", seed=5, **HETERO)
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(ExportError, match="another policy"):
        run(("agent_0",), tmp_path / "other")
    assert sorted(p.name for p in out.rglob("*")) == before
