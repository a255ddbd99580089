"""Every CLI on a broken input file, made with real file-system objects: a FIFO (must never hang), a
device (a symlink to /dev/zero: must never be read whole), a dangling symlink, and a flipped byte (a
digest, a fingerprint or a CRC must catch it). Each is one line on stderr naming the file, exit status
2, nothing written. Plus the ONNX backend's graphs and manifest, read through the same checks."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from conftest import make_policy, require_extra

from lorasa_serve.errors import CorruptFileError, DigestMismatchError, LorasaError

FAULTS = ("fifo", "device", "dangling", "flip")
CHEETAH_ENV = {"kind": "mamujoco", "scenario": "HalfCheetah", "agent_conf": "2x3", "agent_obsk": 1,
               "episode_limit": 20}
ADAPTER = "adapters/agent_0.safetensors"


def fault(path, how: str, flip_at: int = -5) -> str:
    """Break `path` in place; -> a fragment of the error expected to name what is wrong."""
    if how == "flip":
        data = bytearray(path.read_bytes())
        data[flip_at] ^= 0x01
        path.write_bytes(bytes(data))
        return path.name
    path.unlink()
    if how == "fifo":
        os.mkfifo(path)
        return "a FIFO"
    if how == "device":
        os.symlink("/dev/zero", path)
        return "a character device"
    os.symlink(path.parent / "gone", path)
    return "a dangling symlink"


def run(main, argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def one_error_line(capsys, prog: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{prog}: error: "), err
    return err[0]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """A `lorasa-export --merge` of a HalfCheetah 2x3 policy (its source has env.json; the export has none)."""
    require_extra("onnx", "onnx", "onnxruntime", "onnxscript")
    from exporters import ExportConfig, export_policy
    root = tmp_path_factory.mktemp("export")
    cheetah(root / "p")
    report = export_policy(ExportConfig(root / "p", root / "out", merge=True, formats=("safetensors", "onnx"),
                                        steps=20, envs=2, progress=False))
    assert report.ok
    return root / "out"


def cheetah(d):
    make_policy(d, obs=(12, 12), act=(3, 3), hidden=16)
    (d / "env.json").write_text(json.dumps({"env": CHEETAH_ENV}))
    return d


# --- inputs: (prog, which file is broken, flip offset) -----------------------------------------------
def _export(tmp_path):
    from exporters.cli import main
    p = cheetah(tmp_path / "p")
    return main, p / ADAPTER, [str(p), "--out", str(tmp_path / "out"), "--no-progress"], tmp_path / "out"


def _eval_policy(tmp_path):
    from training.evaluate import main
    p = cheetah(tmp_path / "p")
    return main, p / ADAPTER, [str(p), "--episodes", "1"], None


def _eval_export(tmp_path, export_dir, rel):
    from training.evaluate import main
    d = shutil.copytree(export_dir, tmp_path / "export")
    return main, d / rel, [str(d), "--episodes", "1"], None


def _model_store(tmp_path):
    require_extra("serve", "bentoml")
    from services.model_store import main
    p = cheetah(tmp_path / "p")
    return main, p / ADAPTER, ["save", str(p), "--name", "lorasa-faults"], None


def _import_reference(tmp_path):
    from test_reference_import import agents_flag, reference_state_dict
    from training.reference_import import main
    torch.save(reference_state_dict(), tmp_path / "actor.pt")
    return main, tmp_path / "actor.pt", [str(tmp_path / "actor.pt"), "--agents", agents_flag(),
                                         "--out", str(tmp_path / "imported")], tmp_path / "imported"


INPUTS = {"lorasa-export": _export, "lorasa-eval": _eval_policy,
          "lorasa-eval export manifest": lambda t, e: _eval_export(t, e, "manifest.json"),
          "lorasa-eval export backbone": lambda t, e: _eval_export(t, e, "merged/agent_0/backbone.safetensors"),
          "services.model_store": _model_store, "lorasa-import-reference": _import_reference}
FLIP_AT = {"lorasa-eval export manifest": 0, "lorasa-import-reference": 1000}  # JSON's "{"; a tensor's data


@pytest.mark.parametrize("how", FAULTS)
@pytest.mark.parametrize("case", list(INPUTS))
def test_every_cli_on_a_broken_input_is_one_line_and_exit_2(tmp_path, capsys, no_hang, case, how, request):
    make = INPUTS[case]
    args = (tmp_path, request.getfixturevalue("export_dir")) if "export" in case and case != "lorasa-export" \
        else (tmp_path,)
    main, broken, argv, out = make(*args)
    expect = fault(broken, how, FLIP_AT.get(case, -5))
    capsys.readouterr()
    assert run(main, argv) == 2
    line = one_error_line(capsys, case.split()[0])
    assert broken.name in line and expect in line, line
    if how == "flip":  # caught by what guards that file
        assert any(w in line for w in ("sha256", "fingerprint", "CRC-32", "not JSON")), line
    assert out is None or not out.exists()


@pytest.mark.parametrize("how", ("fifo", "device", "dangling"))
@pytest.mark.parametrize("prog", ("lorasa-bench", "lorasa-eval"))
def test_an_output_file_that_is_not_a_regular_file_is_refused_first(tmp_path, capsys, no_hang, prog, how):
    target = tmp_path / "results.json"
    target.write_text("{}")
    expect = fault(target, how)
    if prog == "lorasa-bench":
        from benchmarks.engine import main
        argv = ["--quick", "--methods", "ps", "--out", str(target)]
    else:
        from training.evaluate import main
        argv = [str(cheetah(tmp_path / "p")), "--episodes", "1", "--json", str(target)]
    assert run(main, argv) == 2
    line = one_error_line(capsys, prog)
    assert target.name in line and expect in line, line
    assert os.path.lexists(target) and not target.is_file()  # left as it was: never replaced


@pytest.mark.parametrize("how", FAULTS)
@pytest.mark.parametrize("rel", ["manifest.json", "onnx/agent_0.onnx"])
def test_onnx_graphs_and_manifest_go_through_the_file_checks(tmp_path, export_dir, no_hang, rel, how):
    from lorasa_serve.onnx_backend import OnnxEngine
    d = shutil.copytree(export_dir, tmp_path / "export")
    assert OnnxEngine.from_dir(d).agent_ids == ["agent_0", "agent_1"]  # per-agent graphs (a --merge export)
    expect = fault(d / rel, how, 0 if rel == "manifest.json" else len((d / rel).read_bytes()) // 2)
    with pytest.raises(LorasaError) as e:
        OnnxEngine.from_dir(d)
    if how != "flip":
        assert expect in str(e.value) and rel.split("/")[-1] in str(e.value)
    elif rel == "manifest.json":
        assert isinstance(e.value, CorruptFileError) and "not JSON" in str(e.value), e.value
    else:  # the sha256 the export recorded for the graph
        assert isinstance(e.value, DigestMismatchError) and "recorded in manifest.json" in str(e.value), e.value


def test_a_deeply_nested_onnx_manifest_is_a_typed_error(tmp_path, export_dir):
    from lorasa_serve.onnx_backend import OnnxEngine
    d = shutil.copytree(export_dir, tmp_path / "export")
    (d / "manifest.json").write_bytes(b"[" * 100_000)
    with pytest.raises(CorruptFileError, match="manifest.json: not JSON"):
        OnnxEngine.from_dir(d)
