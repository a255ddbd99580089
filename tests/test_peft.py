"""PEFT in both directions, with the real `peft` package on the shipped `ActorModule`:
the module equals the float64 reference loop and the Engine; `lorasa-export --peft` loads with
`PeftModel.from_pretrained` and `set_peft_model_state_dict` and gives the Engine's outputs; an adapter
trained with PEFT loads into the Engine (directory, file, bytes + config) with PEFT's outputs; and every
PEFT adapter we cannot represent is refused with a typed error naming the problem."""
from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pytest
import torch
from conftest import make_policy, require_extra
from reference import forward_loop

from lorasa_serve import Engine, peft_format
from lorasa_serve.errors import (CorruptFileError, FingerprintMismatchError, KeyMismatchError, NonFiniteError,
                                 PeftFormatError, RankAlphaMismatchError, ShapeMismatchError)
from lorasa_serve.torch_module import ActorModule

require_extra("dev", "peft")
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from exporters.cli import main as export_main  # noqa: E402

TOL = 1e-5


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():  # PEFT: "could not find a config file in lorasa-backbone:..."
        warnings.simplefilter("ignore", UserWarning)
        yield


@pytest.fixture
def hetero(tmp_path):
    """Humanoid 9|8-like (obs 24 / 17, act 5 / 4), recurrent, per-agent log-std offsets."""
    d = tmp_path / "policy"
    spec, backbone, ads = make_policy(d, obs=(24, 17), act=(5, 4), log_std_offset=True, b_std=0.3)
    return d, Engine.from_dir(d, device="cpu", mode="lora"), backbone, ads


def batch(spec, agent, n, seed):
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(n, spec.obs_max, generator=g)
    obs[:, spec.agent(agent).obs_dim:] = 0.0
    state = torch.randn(n, spec.hidden, generator=g) if spec.recurrent else None
    return obs, state, torch.arange(n) % 3 == 0


def engine_head(eng, agent, obs, state, reset, avail=None):
    """The Engine's Gaussian mean (zero past act_dim) / masked logits, its log-std and next state."""
    n = len(obs)
    if eng.spec.action == "gaussian":
        out = eng.act([agent] * n, obs, state, reset)
        return out.actions, eng.log_std(agent), out.state
    head, h = eng.forward([agent] * n, obs, state, reset)
    valid = torch.arange(eng.spec.act_max) < eng.spec.agent(agent).act_dim
    if avail is not None:
        valid = valid & avail
    return head.masked_fill(~valid, torch.finfo(head.dtype).min), None, h


def assert_same(out, eng, agent, obs, state, reset, avail=None):
    head, log_std, h = engine_head(eng, agent, obs, state, reset, avail)
    torch.testing.assert_close(out.head, head, atol=TOL, rtol=0)
    if log_std is not None:
        torch.testing.assert_close(out.log_std, log_std, atol=TOL, rtol=0)
    if h is not None:
        torch.testing.assert_close(out.state, h, atol=TOL, rtol=0)


# --- the module ------------------------------------------------------------------------------------
def test_names_map_both_ways_and_no_layernorm_nests_under_a_linear(hetero):
    d, eng, backbone, _ = hetero
    m = ActorModule.from_dir(d)
    linears = {n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)}
    assert linears == set(eng.spec.linear_names())  # mlp.0 .. mlp.2, gru.x, gru.h, post, head
    norms = {n for n, mod in m.named_modules() if isinstance(mod, torch.nn.LayerNorm)}
    assert not any(n.startswith(lin + ".") for n in norms for lin in linears)
    assert set(m.state_dict()) == {peft_format.module_key(k) for k in backbone} | {peft_format.OFFSET_KEY}
    assert peft_format.module_key("mlp.1.ln.bias") == "mlp_ln.1.bias"
    assert peft_format.module_key("gru.ln.weight") == "gru_ln.weight"
    for k, v in m.backbone().items():
        assert peft_format.module_key(k) in m.state_dict() and torch.equal(v, backbone[k]), k
    assert set(m.backbone()) == set(backbone)


@pytest.mark.parametrize("kind", ["gaussian_gru", "categorical_tanh", "feedforward", "agent_onehot"])
def test_module_equals_reference_loop_and_engine(tmp_path, kind):
    kw = {"gaussian_gru": {}, "categorical_tanh": {"action": "categorical", "activation": "tanh"},
          "feedforward": {"recurrent": False}, "agent_onehot": {"agent_onehot": 2}}[kind]
    spec, backbone, _ = make_policy(tmp_path / "p", obs=(9, 6), act=(4, 3), adapters=False, **kw)
    eng = Engine.from_dir(tmp_path / "p", device="cpu")
    for agent in spec.agent_ids:
        m = ActorModule(spec, backbone, agent)
        obs, state, reset = batch(spec, agent, 7, 1)
        avail = (torch.rand(7, spec.act_max, generator=torch.Generator().manual_seed(2)) > 0.3) | \
            (torch.arange(spec.act_max) == 0) if spec.action == "categorical" else None
        with torch.no_grad():
            out = m(obs, state, reset, avail)
        assert_same(out, eng, agent, obs, state, reset, avail)
        ref_head, ref_h = forward_loop(spec, backbone, {}, [agent] * 7, obs, state, reset)
        valid = (torch.arange(spec.act_max) < spec.agent(agent).act_dim).expand(7, -1)
        if avail is not None:  # masked logits sit at float32's minimum, the rest is the reference's
            valid = valid & avail
            assert bool((out.head[~valid] == torch.finfo(torch.float32).min).all())
        torch.testing.assert_close(out.head[valid].double(), ref_head[valid], atol=TOL, rtol=0)
        if ref_h is not None:
            torch.testing.assert_close(out.state.double(), ref_h, atol=TOL, rtol=0)
        with torch.no_grad():  # obs given at the agent's own width (no padding) answers the same
            short = m(obs[:, :spec.agent(agent).obs_dim], state, reset, avail)
        torch.testing.assert_close(short.head, out.head, atol=0, rtol=0)


# --- ours -> PEFT -------------------------------------------------------------------------------------
def export_peft(d, out, *args):
    assert export_main([str(d), "--out", str(out), "--peft", "--no-progress", *args]) == 0
    return out / "peft"


def test_exported_adapter_loads_with_peft_from_pretrained(hetero, tmp_path):
    d, eng, _, ads = hetero
    root = export_peft(d, tmp_path / "out")
    for agent in eng.agent_ids:
        cfg = json.loads((root / agent / "adapter_config.json").read_text())
        assert (cfg["r"], cfg["lora_alpha"], cfg["bias"]) == (4, 8.0, "none")
        assert sorted(cfg["target_modules"]) == sorted(eng.spec.linear_names())
        model = PeftModel.from_pretrained(ActorModule.from_dir(d, agent), root / agent)
        obs, state, reset = batch(eng.spec, agent, 6, 3)
        with torch.no_grad():
            out = model(obs, state, reset)
        assert_same(out, eng, agent, obs, state, reset)
        with torch.no_grad():  # the adapter really acts: the bare module differs
            bare = ActorModule.from_dir(d, agent)(obs, state, reset)
        assert (bare.head - out.head).abs().max() > 1e-2
        assert (bare.log_std - out.log_std).abs().max() > 1e-2  # the log-std offset came along


def test_exported_file_loads_with_set_peft_model_state_dict(hetero, tmp_path):
    d, eng, _, _ = hetero
    root = export_peft(d, tmp_path / "out", "--agents", "agent_1")
    assert sorted(p.name for p in root.iterdir()) == ["agent_1"]
    cfg = LoraConfig.from_pretrained(str(root / "agent_1"))
    model = get_peft_model(ActorModule.from_dir(d, "agent_1"), cfg)
    res = set_peft_model_state_dict(model, load_file(root / "agent_1" / "adapter_model.safetensors"))
    assert not res.unexpected_keys  # every tensor found its module (the issue: none did)
    obs, state, reset = batch(eng.spec, "agent_1", 5, 4)
    with torch.no_grad():
        assert_same(model(obs, state, reset), eng, "agent_1", obs, state, reset)


# --- PEFT -> ours -------------------------------------------------------------------------------------
def train_with_peft(d, agent, steps=5, **config):
    """A few Adam steps of PEFT LoRA (and the log-std offset) on the shipped module -> PeftModel."""
    spec = Engine.from_dir(d, device="cpu").spec
    cfg = {"r": spec.lora.rank, "lora_alpha": spec.lora.alpha, "target_modules": spec.linear_names(),
           "modules_to_save": ["std"] if spec.lora.log_std_offset else None, **config}
    model = get_peft_model(ActorModule.from_dir(d, agent), LoraConfig(**cfg))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    obs, state, reset = batch(spec, agent, 16, 5)
    target = torch.randn(16, spec.act_max, generator=torch.Generator().manual_seed(6))
    for _ in range(steps):
        out = model(obs, state, reset)
        loss = ((out.head - target) ** 2).mean() + (out.log_std ** 2).mean() if out.log_std is not None \
            else ((out.head - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_peft_trained_adapter_serves_from_the_engine(hetero, tmp_path):
    d, eng, _, _ = hetero
    model = train_with_peft(d, "agent_1")
    model.save_pretrained(tmp_path / "trained")
    obs, state, reset = batch(eng.spec, "agent_1", 8, 7)
    with torch.no_grad():
        want = model(obs, state, reset)
    v = eng.load_adapter(tmp_path / "trained", "agent_1")  # the directory PEFT wrote
    assert v == 2 and eng.adapter("agent_1")["post.lora_B.weight"].abs().max() > 0  # really trained
    assert eng.adapter("agent_1")["log_std_offset"].abs().max() > 0
    assert_same(want, eng, "agent_1", obs, state, reset)
    other = eng.act(["agent_0"], *[None if x is None else x[:1] for x in batch(eng.spec, "agent_0", 1, 8)])
    # the same adapter from the file alone (config read beside it) and from bytes + config
    assert eng.load_adapter(tmp_path / "trained" / "adapter_model.safetensors", "agent_1") == 3
    data = (tmp_path / "trained" / "adapter_model.safetensors").read_bytes()
    cfg = (tmp_path / "trained" / "adapter_config.json").read_bytes()
    assert eng.load_adapter(data, "agent_1", peft_config=cfg) == 4
    assert_same(want, eng, "agent_1", obs, state, reset)
    again = eng.act(["agent_0"], *[None if x is None else x[:1] for x in batch(eng.spec, "agent_0", 1, 8)])
    torch.testing.assert_close(again.actions, other.actions, atol=0, rtol=0)  # only agent_1 changed
    # converted to our layout, it round-trips through our own format and back to PEFT unchanged
    ours, tensors = peft_format.canonical_bytes(data, eng.spec, "x", "agent_1", cfg)
    assert all(torch.equal(tensors[k], v.cpu()) for k, v in eng.adapter("agent_1").items())
    assert peft_format.parse_any(ours, eng.spec, "x")[0] == "agent_1"


def test_categorical_policy_both_ways(tmp_path):
    make_policy(tmp_path / "p", obs=(7, 5), act=(4, 3), action="categorical")
    d, eng = tmp_path / "p", Engine.from_dir(tmp_path / "p", device="cpu", mode="lora")
    root = export_peft(d, tmp_path / "out")
    assert json.loads((root / "agent_1" / "adapter_config.json").read_text())["modules_to_save"] is None
    obs, state, reset = batch(eng.spec, "agent_1", 6, 9)
    with torch.no_grad():
        out = PeftModel.from_pretrained(ActorModule.from_dir(d, "agent_1"), root / "agent_1")(obs, state, reset)
    assert_same(out, eng, "agent_1", obs, state, reset)
    model = train_with_peft(d, "agent_1")
    model.save_pretrained(tmp_path / "trained")
    eng.load_adapter(tmp_path / "trained", "agent_1")
    with torch.no_grad():
        assert_same(model(obs, state, reset), eng, "agent_1", obs, state, reset)


# --- refusals -------------------------------------------------------------------------------------------
def saved(d, tmp_path, name, agent="agent_0", **config):
    train_with_peft(d, agent, steps=1, **config).save_pretrained(tmp_path / name)
    return tmp_path / name


def edit_config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


def test_unrepresentable_peft_adapters_are_refused_naming_the_problem(hetero, tmp_path):
    d, eng, _, _ = hetero
    good = saved(d, tmp_path, "good")
    data = (good / "adapter_model.safetensors").read_bytes()
    v0 = eng.versions()
    cases = [
        (saved(d, tmp_path, "r2", r=2), RankAlphaMismatchError, "rank=2"),
        (saved(d, tmp_path, "a16", lora_alpha=16.0), RankAlphaMismatchError, "alpha=16.0"),
        (saved(d, tmp_path, "dora", use_dora=True), PeftFormatError, "use_dora"),
        (saved(d, tmp_path, "rslora", use_rslora=True), PeftFormatError, "use_rslora"),
        (saved(d, tmp_path, "no_offset", modules_to_save=None), KeyMismatchError, "std.offset"),
        (saved(d, tmp_path, "three", target_modules=["mlp.0", "post", "head"]), KeyMismatchError,
         "missing tensors"),
        (edit_config(saved(d, tmp_path, "unknown"), target_modules=["mlp.0", "decoder"]), PeftFormatError,
         "unknown target module 'decoder'"),
        (edit_config(saved(d, tmp_path, "other"), base_model_name_or_path="lorasa-backbone:" + "0" * 64),
         FingerprintMismatchError, "base_model_name_or_path"),
        (edit_config(saved(d, tmp_path, "hub"), base_model_name_or_path="gpt2"), FingerprintMismatchError,
         "'gpt2'"),
    ]
    bias = tmp_path / "bias"
    bias.mkdir()
    (bias / "adapter_config.json").write_bytes((good / "adapter_config.json").read_bytes())
    t = load_file(good / "adapter_model.safetensors")
    save_file({**t, "base_model.model.post.lora_B.bias": torch.zeros(eng.spec.hidden)},
              bias / "adapter_model.safetensors", metadata={"format": "pt"})
    nan = tmp_path / "nan"
    nan.mkdir()
    (nan / "adapter_config.json").write_bytes((good / "adapter_config.json").read_bytes())
    save_file({**t, "base_model.model.head.lora_B.weight": torch.full_like(t["base_model.model.head.lora_B.weight"],
                                                                            float("nan"))},
              nan / "adapter_model.safetensors", metadata={"format": "pt"})
    wide = tmp_path / "wide"
    wide.mkdir()
    (wide / "adapter_config.json").write_bytes((good / "adapter_config.json").read_bytes())
    save_file({**t, "base_model.model.mlp.0.lora_A.weight": torch.zeros(4, 99)}, wide / "adapter_model.safetensors")
    cases += [(bias, PeftFormatError, "lora_B.bias"), (nan, NonFiniteError, "NaN"),
              (wide, ShapeMismatchError, "mlp.0.lora_A.weight")]
    for path, err, words in cases:
        with pytest.raises(err, match=re.escape(words)):
            eng.load_adapter(path, "agent_0")
    with pytest.raises(PeftFormatError, match="adapter_config.json"):  # no config: alpha is unknown
        eng.load_adapter(data, "agent_0")
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes(data)
    with pytest.raises(PeftFormatError, match="lora_alpha"):
        eng.load_adapter(lone, "agent_0")
    with pytest.raises(KeyMismatchError, match="pass agent_id"):  # PEFT's files name no agent
        eng.load_adapter(good)
    assert eng.versions() == v0  # nothing was swapped


def test_unsupported_lora_options_and_pickled_files_are_refused(hetero, tmp_path):
    """What README promises to refuse, made by the real `peft`: per-module ranks / alphas
    (rank_pattern, alpha_pattern), a config for transposed weights (fan_in_fan_out: GPT-2's Conv1D;
    PEFT itself resets it for nn.Linear, so the config says what such an adapter carries), layer
    replication, and pickled `.bin` files (save_pretrained(safe_serialization=False))."""
    d, eng, _, _ = hetero
    v0 = eng.versions()
    cases = [
        (saved(d, tmp_path, "rank_pattern", rank_pattern={"post": 2}), "LoraConfig rank_pattern={'post': 2} is "
                                                                        "not supported (only rank_pattern={})"),
        (saved(d, tmp_path, "alpha_pattern", alpha_pattern={"head": 16.0}), "LoraConfig alpha_pattern="),
        (edit_config(saved(d, tmp_path, "fan_in"), fan_in_fan_out=True),
         "LoraConfig fan_in_fan_out=True is not supported (only fan_in_fan_out=False)"),
        (edit_config(saved(d, tmp_path, "replication"), layer_replication=[[0, 2]]),
         "LoraConfig layer_replication=[[0, 2]] is not supported (only layer_replication=None)"),
    ]
    for path, words in cases:
        with pytest.raises(PeftFormatError, match=re.escape(words)):
            eng.load_adapter(path, "agent_0")
    pickled = tmp_path / "pickled"
    train_with_peft(d, "agent_0", steps=1).save_pretrained(pickled, safe_serialization=False)
    assert (pickled / "adapter_model.bin").is_file() and not (pickled / "adapter_model.safetensors").exists()
    with pytest.raises(CorruptFileError, match=re.escape("a .bin one is pickled: re-save with "
                                                         "save_pretrained(safe_serialization=True)")):
        eng.load_adapter(pickled, "agent_0")
    with pytest.raises(CorruptFileError):  # the .bin file itself is never unpickled: not safetensors
        eng.load_adapter(pickled / "adapter_model.bin", "agent_0")
    assert eng.versions() == v0  # nothing was swapped


def test_peft_export_of_another_policy_into_the_same_out_is_refused(hetero, tmp_path, capsys):
    """As the main export pipeline: an --out holding another policy's PEFT export (or another policy's
    lorasa-export manifest) is refused, one line, exit 2, before anything is written."""
    d, _, _, _ = hetero
    out = tmp_path / "out"
    export_peft(d, out)
    other = tmp_path / "other"
    make_policy(other, obs=(24, 17), act=(5, 4), log_std_offset=True, b_std=0.3, seed=5)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for args in ([], ["--agents", "agent_1"]):
        assert export_main([str(other), "--out", str(out), "--peft", "--no-progress", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "holds an export of another policy" in err, err
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    export_peft(d, out, "--agents", "agent_0")  # the same policy again: additive, as before
    main_out = tmp_path / "main"
    assert export_main([str(d), "--out", str(main_out), "--merge", "--format", "safetensors", "--no-progress"]) == 0
    assert export_main([str(other), "--out", str(main_out), "--peft", "--no-progress"]) == 2
    assert "another policy" in capsys.readouterr().err and not (main_out / "peft").exists()
    export_peft(d, main_out)  # the policy the manifest names: fine


def test_export_cli_usage_errors_are_one_line(hetero, tmp_path, capsys):
    d, _, _, _ = hetero
    for args, words in ((["--merge"], "--peft writes PEFT adapter directories"),
                        (["--agents", "nope"], "unknown agent"),
                        (["--format", "onnx"], "--peft writes")):
        assert export_main([str(d), "--out", str(tmp_path / "o"), "--peft", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err
    plain = tmp_path / "plain"
    make_policy(plain, adapters=False)
    assert export_main([str(plain), "--out", str(tmp_path / "o2"), "--peft"]) == 2
    assert "no adapter" in capsys.readouterr().err
    assert not (tmp_path / "o2" / "peft").exists() or not any((tmp_path / "o2" / "peft").iterdir())


def test_export_is_additive_and_leaves_other_exports_alone(hetero, tmp_path):
    d, eng, _, _ = hetero
    out = tmp_path / "out"
    (out / "onnx").mkdir(parents=True)
    (out / "onnx" / "keep.onnx").write_bytes(b"x")
    export_peft(d, out, "--agents", "agent_0")
    export_peft(d, out, "--agents", "agent_1")
    assert sorted(p.name for p in (out / "peft").iterdir()) == ["agent_0", "agent_1"]
    assert (out / "onnx" / "keep.onnx").read_bytes() == b"x"
    assert oct((out / "peft" / "agent_0").stat().st_mode & 0o777) != oct(0o700)
    np.testing.assert_array_equal(  # what lands on disk is exactly the engine's adapter
        load_file(out / "peft" / "agent_0" / "adapter_model.safetensors")["base_model.model.gru.x.lora_A.weight"],
        eng.adapter("agent_0")["gru.x.lora_A.weight"].numpy())


def test_hostile_peft_bytes_and_configs_raise_only_artifact_errors(hetero, tmp_path):
    """Truncated or bit-flipped PEFT files and malformed configs: a typed ArtifactError, never a crash."""
    from lorasa_serve.errors import ArtifactError, CorruptFileError, NotRegularFileError
    d, eng, _, _ = hetero
    good = saved(d, tmp_path, "good")
    data, cfg = (good / "adapter_model.safetensors").read_bytes(), (good / "adapter_config.json").read_bytes()
    rng = np.random.default_rng(0)
    for k in range(60):
        bad = bytearray(data)
        if k % 2:
            bad = bad[:int(rng.integers(0, len(data)))]
        else:
            for i in rng.integers(0, min(len(data), 600), 4):  # mostly inside the JSON header
                bad[i] = int(rng.integers(0, 256))
        try:
            eng.load_adapter(bytes(bad), "agent_0", peft_config=cfg)
        except ArtifactError:
            pass
    for config, words in ((b"not json", "not valid JSON"), (b"[1]", "JSON object"),
                          (json.dumps({**json.loads(cfg), "r": "4"}).encode(), "integer 'r'"),
                          (json.dumps({**json.loads(cfg), "lora_alpha": None}).encode(), "numeric 'lora_alpha'"),
                          (json.dumps({**json.loads(cfg), "peft_type": "IA3"}).encode(), "not LORA")):
        with pytest.raises(ArtifactError, match=re.escape(words)):
            eng.load_adapter(data, "agent_0", peft_config=config)
    with pytest.raises(NotRegularFileError, match="missing"):
        eng.load_adapter(tmp_path / "missing_dir", "agent_0")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorruptFileError, match="adapter_model.safetensors"):
        eng.load_adapter(tmp_path / "empty", "agent_0")
