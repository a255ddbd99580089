"""Policy directory round trip and every bad-file case -> the right typed error, naming the file."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from conftest import make_policy
from safetensors.torch import save as st_save
from safetensors.torch import save_file

from lorasa_serve import (CorruptFileError, Engine, FingerprintMismatchError, FormatVersionError,
                          KeyMismatchError, NonFiniteError, PolicySpec, RankAlphaMismatchError,
                          ShapeMismatchError, load_policy)
from lorasa_serve.artifacts import adapter_bytes, fingerprint, parse_adapter


def test_round_trip(tiny_policy, tmp_path):
    d, spec, backbone, ads = tiny_policy
    spec2, backbone2, ads2 = load_policy(d)
    assert spec2 == spec and spec.backbone_fingerprint == fingerprint(backbone)
    assert json.loads((d / "policy.json").read_text())["format_version"] == 1
    for k in backbone:
        assert torch.equal(backbone[k], backbone2[k])
    for a in ads:
        for k in ads[a]:
            assert torch.equal(ads[a][k], ads2[a][k])
    # engine.save writes an equivalent directory
    eng = Engine.from_dir(d, device="cpu")
    eng.save(tmp_path / "copy")
    spec3, _, ads3 = load_policy(tmp_path / "copy")
    assert spec3 == spec and set(ads3) == set(ads)
    assert not list(d.rglob("*.pt")) and not list(d.rglob("*.pkl"))


def adapter_file(d, agent="agent_0"):
    return d / "adapters" / f"{agent}.safetensors"


def rewrite_adapter(d, spec, ads, agent="agent_0", tensors=None, **meta_over):
    meta = {"format_version": "1", "agent_id": agent, "rank": str(spec.lora.rank),
            "alpha": str(spec.lora.alpha), "backbone_fingerprint": spec.backbone_fingerprint}
    meta.update(meta_over)
    save_file(tensors if tensors is not None else ads[agent], str(adapter_file(d, agent)), metadata=meta)


def expect(err, match, d):
    with pytest.raises(err, match=match) as info:
        load_policy(d)
    assert str(d) in str(info.value)  # the message names the file
    return info.value


def test_missing_and_extra_keys(tiny_policy):
    d, spec, _, ads = tiny_policy
    t = dict(ads["agent_0"])
    t.pop("mlp.1.lora_A.weight")
    rewrite_adapter(d, spec, ads, tensors=t)
    expect(KeyMismatchError, "missing tensors \\['mlp.1.lora_A.weight'\\]", d)
    t = dict(ads["agent_0"], **{"extra.lora_A.weight": torch.zeros(4, 6)})
    rewrite_adapter(d, spec, ads, tensors=t)
    expect(KeyMismatchError, "unexpected tensors \\['extra.lora_A.weight'\\]", d)


def test_wrong_shape_and_dtype(tiny_policy):
    d, spec, _, ads = tiny_policy
    rewrite_adapter(d, spec, ads, tensors=dict(ads["agent_0"], **{"post.lora_B.weight": torch.zeros(16, 5)}))
    expect(ShapeMismatchError, "post.lora_B.weight.*shape \\[16, 5\\]", d)
    rewrite_adapter(d, spec, ads, tensors=dict(ads["agent_0"], **{"post.lora_B.weight":
                                                                  torch.zeros(16, 4, dtype=torch.int32)}))
    expect(ShapeMismatchError, "dtype", d)


def test_rank_alpha_mismatch(tiny_policy):
    d, spec, _, ads = tiny_policy
    rewrite_adapter(d, spec, ads, rank="8")
    expect(RankAlphaMismatchError, "rank=8", d)
    rewrite_adapter(d, spec, ads, alpha="16.0")
    expect(RankAlphaMismatchError, "alpha=16.0", d)


def test_adapter_from_another_backbone(tiny_policy, tmp_path):
    d, spec, _, ads = tiny_policy
    other_spec, _, other_ads = make_policy(tmp_path / "other", seed=7)
    (adapter_file(d)).write_bytes(adapter_bytes(other_spec, "agent_0", other_ads["agent_0"]))
    expect(FingerprintMismatchError, "trained against backbone", d)


def test_nan_and_inf(tiny_policy):
    d, spec, _, ads = tiny_policy
    for bad in (float("nan"), float("inf")):
        t = {k: v.clone() for k, v in ads["agent_0"].items()}
        t["gru.h.lora_A.weight"][0, 0] = bad
        rewrite_adapter(d, spec, ads, tensors=t)
        expect(NonFiniteError, "gru.h.lora_A.weight", d)


def test_truncated_and_not_safetensors(tiny_policy):
    d, spec, _, ads = tiny_policy
    f = adapter_file(d)
    data = f.read_bytes()
    f.write_bytes(data[:-10])
    expect(CorruptFileError, "truncated", d)
    f.write_bytes(b"this is not a safetensors file at all")
    expect(CorruptFileError, "safetensors", d)
    f.write_bytes(b"")
    expect(CorruptFileError, "truncated", d)
    (d / "backbone.safetensors").write_bytes(b"\x00" * 3)
    expect(CorruptFileError, "backbone.safetensors", d)


def test_hostile_header_declares_huge_tensor(tiny_policy):
    """A header claiming a 10^12-element tensor must fail before anything is allocated."""
    d, spec, _, ads = tiny_policy
    header = json.dumps({"mlp.0.lora_A.weight": {"dtype": "F32", "shape": [1000000, 1000000],
                                                 "data_offsets": [0, 4 * 10 ** 12]}}).encode()
    adapter_file(d).write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 64)
    expect(CorruptFileError, "does not match", d)


def test_unknown_format_version(tiny_policy):
    d, spec, _, ads = tiny_policy
    rewrite_adapter(d, spec, ads, format_version="99")
    expect(FormatVersionError, "format_version '99'", d)
    rewrite_adapter(d, spec, ads)
    text = json.loads((d / "policy.json").read_text())
    text["format_version"] = 2
    (d / "policy.json").write_text(json.dumps(text))
    expect(FormatVersionError, "policy.json", d)


def test_backbone_problems(tiny_policy):
    d, spec, backbone, _ = tiny_policy
    t = dict(backbone)
    t["head.weight"] = t["head.weight"] * 2
    save_file(t, str(d / "backbone.safetensors"), metadata={"format_version": "1"})
    expect(FingerprintMismatchError, "backbone.safetensors", d)
    t = dict(backbone)
    t.pop("post.bias")
    save_file(t, str(d / "backbone.safetensors"), metadata={"format_version": "1"})
    expect(KeyMismatchError, "post.bias", d)


def test_adapter_for_unlisted_agent_and_missing_adapter(tiny_policy):
    d, spec, _, ads = tiny_policy
    adapter_file(d, "agent_2").rename(adapter_file(d, "ghost"))
    expect(KeyMismatchError, "ghost", d)
    adapter_file(d, "ghost").unlink()
    expect(KeyMismatchError, "agent_2", d)


def test_policy_json_problems(tiny_policy):
    d, spec, _, _ = tiny_policy
    (d / "policy.json").write_text("{not json")
    expect(CorruptFileError, "not valid JSON", d)
    (d / "policy.json").unlink()
    expect(CorruptFileError, "not a policy directory", d)


def test_parse_adapter_bytes_checks_agent(tiny_policy):
    d, spec, _, ads = tiny_policy
    data = adapter_bytes(spec, "agent_1", ads["agent_1"])
    assert parse_adapter(data, spec, "upload")[0] == "agent_1"
    with pytest.raises(KeyMismatchError, match="for agent 'agent_1', not 'agent_0'"):
        parse_adapter(data, spec, "upload", "agent_0")
    assert PolicySpec.from_json(spec.to_json()) == spec
    st_save({"x": torch.zeros(1)})  # sanity: the library itself is importable here


def test_written_files_are_not_private(tmp_path):
    """mkstemp makes 0600 files; a shipped or served policy must be readable by other users."""
    import os
    from conftest import make_policy
    make_policy(tmp_path / "p")
    for f in (tmp_path / "p").rglob("*"):
        if f.is_file():
            assert os.stat(f).st_mode & 0o044 == 0o044 & ~os.umask(os.umask(0)), f
