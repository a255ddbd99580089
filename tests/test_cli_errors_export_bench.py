"""`lorasa-export` and `lorasa-bench` user errors (the training CLIs: test_cli_errors.py): one line on
stderr naming the fix, exit status 2, nothing written. One case per message."""
from __future__ import annotations

import pytest
from conftest import make_policy, require_extra

from benchmarks import engine as bench_cli
from exporters import cli as export_cli

require_extra("onnx", "onnx", "onnxruntime", "onnxscript")


@pytest.fixture
def policy(tmp_path):
    make_policy(tmp_path / "p")
    return tmp_path / "p"


def _one_error_line(capsys, prog: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"{prog}: error: ")
    return err[0]


# (extra args, a fragment of the one line); the policy dir and --out are added by the test
EXPORT_CASES = [
    (["--merge", "--agents", "agent_0,nobody"], "unknown agent(s) ['nobody']; the policy has"),
    (["--agents", "agent_0"], "--agents selects per-agent exports and needs --merge"),
    (["--format", "safetensors"], "--format safetensors needs --merge"),
    (["--format", "tflite", "--merge"], "unknown format(s) ['tflite']; choose from"),
    (["--opset", "11"], "--opset 11 is too old: need >= 18"),
    (["--steps", "5"], "verification needs steps >= 20"),
    (["--envs", "0"], "verification needs steps >= 20, envs >= 1"),
    (["--tol", "-1"], "tolerances >= 0"),
    (["--opset", "x"], "argument --opset: invalid int value: 'x'; see lorasa-export --help"),
    (["--format", ","], "argument --format: expected a comma-separated list"),
    (["--lora-impl", "fast"], "argument --lora-impl: invalid choice: 'fast'"),
    (["--bogus"], "unrecognized arguments: --bogus; see lorasa-export --help"),
]


@pytest.mark.parametrize("args,message", EXPORT_CASES, ids=[" ".join(c[0]) for c in EXPORT_CASES])
def test_export_user_error(policy, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert export_cli.main([str(policy), "--out", str(out), "--no-progress", *args]) == 2
    assert message in _one_error_line(capsys, "lorasa-export")
    assert not out.exists()


def test_export_missing_out(policy, capsys):
    assert export_cli.main([str(policy)]) == 2
    assert "the following arguments are required: --out" in _one_error_line(capsys, "lorasa-export")


def test_export_out_is_the_policy(policy, capsys):
    assert export_cli.main([str(policy), "--out", str(policy)]) == 2
    assert "--out must differ from the policy directory" in _one_error_line(capsys, "lorasa-export")


def test_export_out_is_a_file(policy, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert export_cli.main([str(policy), "--out", str(tmp_path / "f")]) == 2
    assert "is a file: pass a directory" in _one_error_line(capsys, "lorasa-export")
    assert (tmp_path / "f").read_text() == "x"


def test_export_out_not_creatable(policy, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" / "sub"
    assert export_cli.main([str(policy), "--out", str(out), "--no-progress"]) == 2
    assert "cannot create --out" in _one_error_line(capsys, "lorasa-export")


def test_export_not_a_policy_dir(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert export_cli.main([str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    assert "policy.json: missing: not a policy directory" in _one_error_line(capsys, "lorasa-export")
    assert not (tmp_path / "out").exists()


def test_export_corrupt_policy(tmp_path, capsys):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "policy.json").write_text("{not json")
    assert export_cli.main([str(tmp_path / "broken"), "--out", str(tmp_path / "out")]) == 2
    assert "policy.json" in _one_error_line(capsys, "lorasa-export")
    assert not (tmp_path / "out").exists()


BENCH_CASES = [
    (["--agents", "x"], "--agents 'x': pass a comma list of positive integers"),
    (["--agents", "0,2"], "--agents '0,2': pass a comma list of positive integers"),
    (["--rows", "N,abc"], "--rows abc: use N, a multiple like 16N, or a row count like 4096"),
    (["--methods", "ps,warp"], "--methods must include ps and choose from"),
    (["--methods", "engine-lora"], "--methods must include ps"),
    (["--min-time", "0"], "--min-time 0.0: pass a positive number of seconds"),
    (["--threads", "0"], "--threads 0: pass 1 or more"),
    (["--device", "tpu"], "--device 'tpu': use cpu, cuda, cuda:N or auto"),
    (["--min-time", "abc"], "argument --min-time: invalid float value: 'abc'"),
    (["--bogus"], "unrecognized arguments: --bogus; see lorasa-bench --help"),
]


@pytest.mark.parametrize("args,message", BENCH_CASES, ids=[" ".join(c[0]) for c in BENCH_CASES])
def test_bench_user_error(tmp_path, capsys, args, message):
    out = tmp_path / "bench.json"
    assert bench_cli.main([*args, "--out", str(out)]) == 2
    assert message in _one_error_line(capsys, "lorasa-bench")
    assert not out.exists()


def test_bench_out_in_a_missing_dir(tmp_path, capsys):
    assert bench_cli.main(["--out", str(tmp_path / "no" / "bench.json")]) == 2
    assert "pass a file path in an existing directory" in _one_error_line(capsys, "lorasa-bench")


def test_bench_cuda_missing(tmp_path, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the error path needs a machine without it")
    assert bench_cli.main(["--device", "cuda", "--out", str(tmp_path / "b.json")]) == 2
    assert "CUDA is not available here; use --device cpu" in _one_error_line(capsys, "lorasa-bench")


def test_bench_writes_no_file_unless_asked():
    """lorasa-bench prints its table; JSON goes to a file only with --out (issue 23: no bench.json in
    the cwd by default)."""
    _, out, _ = bench_cli.parse_args(["--quick"])
    assert out is None
    _, out, _ = bench_cli.parse_args(["--quick", "--out", "b.json"])
    assert str(out) == "b.json"
