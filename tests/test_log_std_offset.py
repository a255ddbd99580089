"""Per-agent Gaussian log-std (issue 21): adapters carry `log_std_offset` [act_max], the agent's log-std
is the backbone's `log_std` plus it. Checked against a hand-written Normal log-density per row, through
every path that reports log-probs or log-stds: Engine (all modes, hot swap), merged export, per-agent
and multi-agent ONNX graphs and OnnxEngine, and the training actor (SePS+LoRA groups included)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from reference import zero_padding
from conftest import make_policy, on_device, require_extra

from lorasa_serve import Engine, PolicySpec, load_policy
from lorasa_serve.errors import KeyMismatchError, NonFiniteError, ShapeMismatchError, SpecError
from lorasa_serve.adapter_layout import LOG_STD_OFFSET, adapter_shapes
from lorasa_serve.spec import AgentSpec, LoraSpec

HETERO = dict(obs=(12, 8, 10), act=(3, 2, 3), hidden=16)


def own_log_std(backbone, adapter):
    return backbone["log_std"].double() + adapter[LOG_STD_OFFSET].double()


def normal_log_prob(mean, log_std, action, act_dim):
    """sum over the agent's first act_dim dims of log N(action; mean, exp(log_std)), float64."""
    lp = 0.0
    for j in range(act_dim):
        var = math.exp(2 * float(log_std[j]))
        lp += -0.5 * (float(action[j]) - float(mean[j])) ** 2 / var - float(log_std[j]) - 0.5 * math.log(2 * math.pi)
    return lp


@pytest.fixture
def offset_policy(tmp_path):
    d = tmp_path / "p"
    spec, backbone, ads = make_policy(d, log_std_offset=True, b_std=0.3, **HETERO)
    return d, spec, backbone, ads


def test_format_round_trip(offset_policy, tmp_path):
    d, spec, backbone, ads = offset_policy
    raw = json.loads((d / "policy.json").read_text())
    assert raw["lora"]["log_std_offset"] is True
    spec2, _, ads2 = load_policy(d)
    assert spec2.lora.log_std_offset and adapter_shapes(spec2)[LOG_STD_OFFSET] == (spec.act_max,)
    for a in spec.agent_ids:
        torch.testing.assert_close(ads2[a][LOG_STD_OFFSET], ads[a][LOG_STD_OFFSET])
    # offsets really differ per agent (else the per-row checks below could pass with agent 0's)
    offs = [ads[a][LOG_STD_OFFSET] for a in spec.agent_ids]
    assert (offs[0] - offs[1]).abs().max() > 0.05
    # a policy without offsets writes exactly the old keys and loads as before
    make_policy(tmp_path / "old")
    assert "log_std_offset" not in json.loads((tmp_path / "old" / "policy.json").read_text())["lora"]


def test_offset_needs_gaussian():
    with pytest.raises(SpecError, match="Gaussian"):
        PolicySpec(agents=(AgentSpec("a", 3, 2),), action="categorical", lora=LoraSpec(log_std_offset=True))


@pytest.mark.parametrize("mode", ["lora", "merged", "auto"])
def test_engine_log_probs_use_each_agents_log_std(offset_policy, device, mode):
    d, spec, backbone, ads = offset_policy
    eng = Engine.from_dir(d, device=device, mode=mode)
    g = torch.Generator().manual_seed(3)
    ids = [spec.agent_ids[i] for i in torch.randint(3, (40,), generator=g).tolist()]
    obs = zero_padding(spec, ids, torch.randn(40, spec.obs_max, generator=g)).to(device)
    out = eng.act(ids, obs, deterministic=False, generator=torch.Generator().manual_seed(1))
    out.actions, out.log_probs = out.actions.cpu(), out.log_probs.cpu()
    mean = eng.forward(ids, obs)[0].cpu()
    for i, a in enumerate(ids):
        ls = own_log_std(backbone, ads[a])
        want = normal_log_prob(mean[i], ls, out.actions[i], spec.agent(a).act_dim)
        assert abs(float(out.log_probs[i]) - want) < 1e-4, (i, a)
        assert torch.all(out.actions[i, spec.agent(a).act_dim:] == 0)
    # the sampled noise has each agent's own scale: many rows of one agent, std of (action - mean)
    big = ["agent_1"] * 4000
    o = zero_padding(spec, big, torch.randn(4000, spec.obs_max, generator=g)).to(device)
    out = eng.act(big, o, deterministic=False, generator=torch.Generator().manual_seed(2))
    m, _ = eng.forward(big, o)
    std = (out.actions - m)[:, :2].std(0).double().cpu()
    torch.testing.assert_close(std.log(), own_log_std(backbone, ads["agent_1"])[:2], atol=0.05, rtol=0)
    for a in spec.agent_ids:
        torch.testing.assert_close(eng.log_std(a).double().cpu(), own_log_std(backbone, ads[a]))


def test_hot_swap_validates_and_publishes_the_offset(offset_policy, device):
    d, spec, backbone, ads = offset_policy
    eng = Engine.from_dir(d, device=device)
    new = {k: v.clone() for k, v in ads["agent_2"].items()}
    new[LOG_STD_OFFSET] = torch.tensor([0.5, -0.5, 0.25])
    before = eng.log_std("agent_0").clone()
    assert eng.set_adapter("agent_2", new) == 2
    torch.testing.assert_close(eng.log_std("agent_2").cpu(), backbone["log_std"] + new[LOG_STD_OFFSET])
    torch.testing.assert_close(eng.log_std("agent_0"), before)  # other agents untouched
    for bad, err in [(torch.zeros(2), ShapeMismatchError), (torch.tensor([0.0, float("nan"), 0.0]), NonFiniteError)]:
        with pytest.raises(err):
            eng.set_adapter("agent_2", {**new, LOG_STD_OFFSET: bad})
    without = {k: v for k, v in new.items() if k != LOG_STD_OFFSET}
    with pytest.raises(KeyMismatchError):
        eng.set_adapter("agent_2", without)
    assert eng.versions()["agent_2"] == 2  # refused swaps changed nothing
    # a new agent gets its own row
    agent = AgentSpec("agent_3", 9, 2)
    extra = {k: v.clone() for k, v in ads["agent_0"].items()}
    extra[LOG_STD_OFFSET] = torch.tensor([-1.0, 1.0, 0.0])
    eng.set_adapter("agent_3", extra, agent)
    torch.testing.assert_close(eng.log_std("agent_3").cpu(), backbone["log_std"] + extra[LOG_STD_OFFSET])
    zeros = torch.zeros(2, spec.obs_max, device=device)
    out = eng.act(["agent_3", "agent_2"], zeros)
    mean, _ = eng.forward(["agent_3", "agent_2"], zeros)
    ls3 = backbone["log_std"].double() + extra[LOG_STD_OFFSET].double()
    assert abs(float(out.log_probs[0]) - normal_log_prob(mean[0].cpu(), ls3, out.actions[0].cpu(), 2)) < 1e-4


def test_policy_without_offsets_in_an_offset_spec_is_refused(tmp_path):
    """A spec that says adapters carry offsets rejects adapter files without one (no silent zero)."""
    d = tmp_path / "p"
    spec, backbone, ads = make_policy(d, **HETERO)
    from lorasa_serve.artifacts import adapter_bytes, parse_adapter
    from dataclasses import replace
    with_off = replace(spec, lora=replace(spec.lora, log_std_offset=True))
    with pytest.raises(KeyMismatchError):
        parse_adapter(adapter_bytes(spec, "agent_0", ads["agent_0"]), with_off, "upload")


def test_merged_export_carries_the_agents_log_std(offset_policy, tmp_path):
    from exporters.merged import write_merged
    d, spec, backbone, ads = offset_policy
    eng = Engine.from_dir(d, device="cpu")
    for a in spec.agent_ids:
        one = write_merged(eng, a, tmp_path / f"m_{a}")
        _, bb, none = load_policy(tmp_path / f"m_{a}")
        assert not none and not one.lora.log_std_offset
        act = spec.agent(a).act_dim
        torch.testing.assert_close(bb["log_std"].double(), own_log_std(backbone, ads[a])[:act])


def test_onnx_graphs_and_onnx_engine(offset_policy, tmp_path):
    require_extra("onnx", "onnx", "onnxruntime", "onnxscript")
    import onnxruntime as ort
    from exporters import ExportConfig, export_policy
    from lorasa_serve.onnx_backend import OnnxEngine
    d, spec, backbone, ads = offset_policy
    out = tmp_path / "x"
    report = export_policy(ExportConfig(d, out, merge=True, formats=("onnx",), progress=False, envs=2,
                                        steps=20))
    assert report.ok, report.table()
    manifest = json.loads((out / "manifest.json").read_text())
    assert np.asarray(manifest["log_std"]).shape == (3, spec.act_max)
    g = torch.Generator().manual_seed(0)
    for a in spec.agent_ids:  # per-agent graphs output the agent's own log-std
        ag = spec.agent(a)
        sess = ort.InferenceSession(str(out / "onnx" / f"{a}.onnx"), providers=["CPUExecutionProvider"])
        feeds = {"obs": torch.randn(2, ag.obs_dim, generator=g).numpy(),
                 "state": np.zeros((2, spec.hidden), np.float32), "reset": np.ones(2, bool)}
        ls = sess.run(["log_std"], feeds)[0]
        np.testing.assert_allclose(ls, np.tile(own_log_std(backbone, ads[a])[:ag.act_dim].numpy(), (2, 1)),
                                   atol=1e-6)
    ids = ["agent_2", "agent_0", "agent_1", "agent_2"]
    obs = torch.randn(4, spec.obs_max, generator=g)
    for a, o in zip(ids, obs):
        o[spec.agent(a).obs_dim:] = 0
    ref = Engine.from_dir(d, device="cpu").act(ids, obs, deterministic=False,
                                               generator=torch.Generator().manual_seed(5))
    per_agent = OnnxEngine.from_dir(out)  # rows grouped over the merged per-agent graphs
    assert not per_agent.multi_agent
    multi = tmp_path / "multi"
    report = export_policy(ExportConfig(d, multi, progress=False, envs=2, steps=20))
    assert report.ok, report.table()
    oe = OnnxEngine.from_dir(multi)
    assert oe.multi_agent  # the multi-agent graph: per-row gather of the log-std
    sess = ort.InferenceSession(str(multi / "onnx" / "multi_agent.onnx"), providers=["CPUExecutionProvider"])
    idx = oe.agent_index(ids)
    ls = sess.run(["log_std"], {"agent_index": idx, "obs": obs.numpy(), "state": np.zeros((4, spec.hidden), np.float32),
                                "reset": np.ones(4, bool)})[0]
    for i, a in enumerate(ids):
        act = spec.agent(a).act_dim
        np.testing.assert_allclose(ls[i, :act], own_log_std(backbone, ads[a])[:act].numpy(), atol=1e-6)
    for backend in (per_agent, oe):
        got = backend.act(ids, obs.numpy(), deterministic=False, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(got.log_probs, ref.log_probs, atol=1e-4, rtol=0)
        torch.testing.assert_close(got.actions, ref.actions, atol=1e-4, rtol=0)


def test_training_actor_gives_each_agent_its_own_offset():
    """SePS base (agents 0 and 2 share a group): offsets are per agent, never gathered by group."""
    from training.actor import Actor
    spec = PolicySpec(agents=tuple(AgentSpec(f"a{i}", 5, 2) for i in range(3)), hidden=8,
                      lora=LoraSpec(rank=2, alpha=2.0, log_std_offset=True))
    g = torch.Generator().manual_seed(0)
    base = Actor.new_seps(spec, g, -0.5, (0, 1, 0))
    lora = Actor.lora_from_base(base, g, spec)
    off = lora.trainable[LOG_STD_OFFSET]
    assert off.shape == (3, 1, 2) and torch.all(off == 0)
    with torch.no_grad():
        off.copy_(torch.tensor([[[0.1, 0.2]], [[0.3, 0.4]], [[0.5, 0.6]]]))
    shared = base.trainable["log_std"]  # [G, 1, A]
    want = shared[torch.tensor([0, 1, 0])] + off
    torch.testing.assert_close(lora.log_std(), want)
    with torch.no_grad():  # the acting cache sees the in-place change (version bump)
        torch.testing.assert_close(lora.log_std(), want)
    exported = lora.adapters()
    for i, a in enumerate(spec.agent_ids):
        torch.testing.assert_close(exported[a][LOG_STD_OFFSET], off[i, 0])
    back = Actor.lora_from_adapters(spec, {**lora.frozen}, exported, lora.groups)
    torch.testing.assert_close(back.trainable[LOG_STD_OFFSET], off)
    # gradients reach every agent's own row and nothing frozen
    loss = (lora._log_std() * torch.arange(1.0, 4.0).view(3, 1, 1)).sum()
    loss.backward()
    torch.testing.assert_close(off.grad, torch.arange(1.0, 4.0).view(3, 1, 1).expand(3, 1, 2))
    assert "log_std" in lora.frozen and not lora.frozen["log_std"].requires_grad
    assert lora.group_rows()[LOG_STD_OFFSET].tolist() == [0, 1, 2]


@pytest.mark.parametrize("init", ["peft", "reference"])
def test_lora_init_starts_at_zero_delta(init):
    from training.actor import Actor
    spec = PolicySpec(agents=(AgentSpec("a", 5, 2), AgentSpec("b", 5, 2)), hidden=8, lora=LoraSpec(rank=2))
    base = Actor.new_ps(spec, torch.Generator().manual_seed(0), -0.5)
    lora = Actor.lora_from_base(base, torch.Generator().manual_seed(1), spec, init)
    a, b = lora.trainable["mlp.1.lora_a"], lora.trainable["mlp.1.lora_b"]  # [N, in, r], [N, r, out]
    assert torch.all(a @ b == 0)
    zero, rand = (b, a) if init == "peft" else (a, b)
    assert torch.all(zero == 0) and rand.abs().max() > 0
    if init == "reference":  # kaiming-uniform(a=sqrt(5)) over B [out, r]: bound 1/sqrt(r)
        assert rand.abs().max() <= 1 / math.sqrt(2) + 1e-7


@pytest.fixture(scope="module")
def offset_server(tmp_path_factory):
    """A real `bentoml serve` on an offset policy (mode lora: no merge cache in the way)."""
    require_extra("serve", "bentoml")
    from benchmarks.servers import ServerProcess
    root = tmp_path_factory.mktemp("offset_server")
    spec, backbone, ads = make_policy(root / "p", log_std_offset=True, b_std=0.3, **HETERO)
    env = {"LORASA_POLICY": str(root / "p"), "LORASA_STATE_DIR": str(root / "state"), "LORASA_MODE": "lora"}
    with ServerProcess(env, root / "server.log") as srv:
        srv.spec, srv.backbone, srv.ads = spec, backbone, ads
        srv.engine = Engine.from_dir(root / "p", device="cpu", mode="lora")
        yield srv


@pytest.mark.slow
@pytest.mark.parametrize("route", ["v1", "v2"])
def test_http_log_probs_of_sampled_actions_use_each_agents_log_std(offset_server, route):
    """/v1 and /v2 sample with each agent's own log-std: every row's log_prob is the hand-written Normal
    log-density of its action under the Engine's mean and that agent's log_std + offset."""
    import requests
    from lorasa_serve.client import PolicyClient
    srv, spec = offset_server, offset_server.spec
    g = torch.Generator().manual_seed(11)
    ids = [spec.agent_ids[i] for i in torch.randint(3, (24,), generator=g).tolist()]
    obs = zero_padding(spec, ids, torch.randn(24, spec.obs_max, generator=g)).numpy()
    if route == "v1":
        rows = [{"agent_id": a, "obs": obs[i, :spec.agent(a).obs_dim].tolist()} for i, a in enumerate(ids)]
        r = requests.post(srv.url + "/v1/act", json={"rows": rows, "deterministic": False}, timeout=30)
        assert r.status_code == 200, r.text
        body = r.json()
        actions = [np.asarray(a, np.float64) for a in body["actions"]]
        log_probs = body["log_probs"]
    else:
        with PolicyClient(srv.url) as client:
            res = client.act(ids, obs, deterministic=False, seed=5)
        actions, log_probs = [np.asarray(a, np.float64) for a in res.actions], res.log_probs
    mean, _ = srv.engine.forward(ids, torch.from_numpy(obs))
    for i, a in enumerate(ids):
        ls = own_log_std(srv.backbone, srv.ads[a])
        want = normal_log_prob(mean[i], ls, actions[i], spec.agent(a).act_dim)
        assert abs(float(log_probs[i]) - want) < 1e-3, (route, i, a)
