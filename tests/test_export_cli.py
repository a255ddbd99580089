"""`lorasa-export` end to end: a real subprocess round trip, bad arguments, failed verification."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import require_extra
from test_export import _same_as_engine, make_policy

from exporters import cli
from lorasa_serve import Engine
from lorasa_serve.onnx_backend import OnnxEngine

require_extra("onnx", "onnx", "onnxruntime", "onnxscript")
EXE = Path(sys.executable).with_name("lorasa-export")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [str(EXE)] if EXE.exists() else [sys.executable, "-m", "exporters.cli"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=300, env=env)


def test_cli_round_trip_merge(tmp_path):
    """HalfCheetah 2x3 sizes: verified on random and on real MaMuJoCo observations."""
    require_extra("mujoco", "gymnasium_robotics", "mujoco")
    spec, _, _ = make_policy(tmp_path / "p", obs=(12, 12), act=(3, 3), hidden=16)
    out = tmp_path / "out"
    r = run_cli(str(tmp_path / "p"), "--merge", "--out", str(out), "--no-progress", "--steps", "20")
    assert r.returncode == 0, r.stderr
    assert "max abs diff" in r.stdout and "real HalfCheetah 2x3 observations" in r.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    arts = {(a["agent"], a["kind"]): a for a in manifest["artifacts"]}
    assert set(arts) == {(a, k) for a in spec.agent_ids for k in ("safetensors", "onnx")}
    assert all(a["error"] is None and a["max_diff"] <= 1e-5 for a in arts.values())
    assert arts[("agent_1", "onnx")]["files"] == ["onnx/agent_1.onnx"]
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(".*"))
    for agent in spec.agent_ids:  # a merged dir is a plain policy the runtime serves unchanged
        merged = Engine.from_dir(out / "merged" / agent, device="cpu")
        assert merged.agent_ids == [agent] and merged.adapter(agent) is None
    _same_as_engine(OnnxEngine.from_dir(out), Engine.from_dir(tmp_path / "p", device="cpu"))


def test_readme_pair_of_export_commands_is_additive(tmp_path):
    """README "Exporting": its first two commands, as written, into the same --out (a tiny policy
    instead of the shipped one, random observations): the second (agent_0's graph again) keeps
    agent_1's graph and both merged directories, and the manifest lists all four."""
    import re
    import shlex
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"## Exporting\n.*?```bash\n(.*?)```", readme, re.S).group(1)
    first, second = [shlex.split(line.split("#")[0]) for line in block.strip().splitlines()[:2]]
    assert first[1:] == ["policies/halfcheetah_2x3", "--merge", "--out", "export/"], first
    assert "--format" in second and second[second.index("--out") + 1] == "export/", second
    make_policy(tmp_path / "p", obs=(7, 5), act=(3, 2), hidden=16)
    out = tmp_path / "export"

    def run(cmd):
        args = [str(tmp_path / "p") if a == "policies/halfcheetah_2x3" else str(out) if a == "export/" else a
                for a in cmd[1:]]
        assert cli.main([*args, "--no-progress"]) == 0

    run(first)
    graph_1 = (out / "onnx" / "agent_1.onnx").read_bytes()
    run(second)
    assert (out / "onnx" / "agent_1.onnx").read_bytes() == graph_1
    assert {p.name for p in (out / "merged").iterdir()} == {"agent_0", "agent_1"}
    listed = {(a["agent"], a["kind"]) for a in json.loads((out / "manifest.json").read_text())["artifacts"]}
    assert listed == {(a, k) for a in ("agent_0", "agent_1") for k in ("safetensors", "onnx")}
    _same_as_engine(OnnxEngine.from_dir(out), Engine.from_dir(tmp_path / "p", device="cpu"))


def test_cli_bad_arguments_one_line_nothing_written(tmp_path):
    make_policy(tmp_path / "p")
    out = tmp_path / "out"
    r = run_cli(str(tmp_path / "p"), "--merge", "--agents", "agent_0,nobody", "--out", str(out))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["lorasa-export: error: unknown agent(s) ['nobody']; "
                                             "the policy has ['agent_0', 'agent_1', 'agent_2']"]
    assert not out.exists()
    for args in (["--format", "safetensors"], ["--format", "tflite", "--merge"], ["--opset", "11"],
                 ["--steps", "5"], ["--agents", "agent_0"], ["--tol", "-1"]):
        assert cli.main([str(tmp_path / "p"), "--out", str(out), "--no-progress", *args]) == 2
        assert not out.exists()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "policy.json").write_text("{not json")
    assert cli.main([str(tmp_path / "broken"), "--out", str(out)]) == 2


def _swapped_gates(gx, gh, h):
    """A wrong GRU (update and reset gates swapped), the kind of bug an exporter can introduce."""
    xr, xz, xn = gx.chunk(3, dim=-1)
    hr, hz, hn = gh.chunk(3, dim=-1)
    z, r = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
    return torch.lerp(torch.tanh(xn + r * hn), h, z)


def test_failed_verification_exits_nonzero_and_keeps_only_valid_files(tmp_path, monkeypatch, capsys):
    make_policy(tmp_path / "p", obs=(5, 7), act=(2, 3), hidden=16)
    out = tmp_path / "out"
    (out / "onnx").mkdir(parents=True)
    (out / "onnx" / "agent_0.onnx").write_bytes(b"stale graph from an earlier export")
    monkeypatch.setattr("exporters.modules.gru_cell", _swapped_gates)  # ONNX side only
    code = cli.main([str(tmp_path / "p"), "--merge", "--out", str(out), "--no-progress"])
    assert code == 1
    err = capsys.readouterr().err
    assert "FAILED agent_0 onnx" in err and "FAILED agent_1 onnx" in err
    assert "differs from the engine by" in err and "tolerance 1e-05" in err
    assert not (out / "onnx" / "agent_0.onnx").exists() and not (out / "onnx" / "agent_1.onnx").exists()
    assert not list(out.rglob("*.tmp"))
    for agent in ("agent_0", "agent_1"):  # the merged safetensors were verified and stay
        assert Engine.from_dir(out / "merged" / agent, device="cpu").agent_ids == [agent]
    manifest = json.loads((out / "manifest.json").read_text())
    failed = [a for a in manifest["artifacts"] if a["error"]]
    assert [(a["agent"], a["kind"]) for a in failed] == [("agent_0", "onnx"), ("agent_1", "onnx")]
    assert all(a["max_diff"] > 1e-3 for a in failed)
