"""benchmarks/gpu_check.py, what of it runs without a GPU: the no-CUDA exit, usage errors, the step
timeout, the onnxruntime decisions, the test-report reading and the parity computation on the CPU."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_extra

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parent.parent


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", *args], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT), **env}, timeout=120)


def test_without_cuda_it_says_so_in_one_line_and_writes_nothing(tmp_path):
    res = _cli(str(tmp_path / "results"), CUDA_VISIBLE_DEVICES="")  # no GPU visible, on any machine
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("gpu_check: error: no CUDA here")
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("args,message", [
    ([], "required: results"),
    (["{file}"], "is a file: pass a folder"),
    (["{dir}", "--onnx"], "unrecognized arguments: --onnx"),  # no abbreviations
])
def test_usage_errors_are_one_line(tmp_path, capsys, args, message):
    (tmp_path / "f").write_text("x")
    argv = [a.format(file=tmp_path / "f", dir=tmp_path / "d") for a in args]
    assert gpu_check.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_a_step_past_its_timeout_is_killed_with_its_children(tmp_path):
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    status, secs = gpu_check.run_step("slow", [sys.executable, "-c", code], tmp_path, timeout=2)
    assert status == "timeout" and secs < 30
    assert "killed after 2 s" in (tmp_path / "slow.log").read_text()
    assert gpu_check.run_step("ok", [sys.executable, "-c", "print(1)"], tmp_path, 30)[0] == "passed"
    assert gpu_check.run_step("bad", [sys.executable, "-c", "raise SystemExit(3)"], tmp_path, 30)[0] == "failed"


@pytest.mark.parametrize("installed,providers,status,fragment", [
    ({"onnxruntime": "1.2", "onnxruntime-gpu": "1.2"}, ["CUDAExecutionProvider"], "failed", "both onnxruntime"),
    ({"onnxruntime": "1.2"}, ["CPUExecutionProvider"], "skipped", "pip install onnxruntime-gpu"),
    ({}, [], "skipped", "no onnxruntime installed"),
    ({"onnxruntime-gpu": "1.2"}, ["CPUExecutionProvider"], "failed", "no CUDAExecutionProvider"),
])
def test_the_onnx_step_needs_onnxruntime_gpu_alone(tmp_path, installed, providers, status, fragment):
    step = gpu_check.onnx_step(tmp_path, 10, {"installed": installed, "providers": providers})
    assert step.status == status and fragment in step.detail
    assert not (tmp_path / "onnx.log").exists()  # decided before anything runs


def test_junit_counts(tmp_path):
    xml = tmp_path / "t.xml"
    xml.write_text('<testsuites><testsuite tests="7" failures="1" errors="0" skipped="2"/></testsuites>')
    assert gpu_check.junit_counts(xml) == "7 tests: 1 failed, 0 errors, 2 skipped"
    assert gpu_check.junit_counts(tmp_path / "missing.xml").startswith("no test report")


def test_parity_on_the_cpu_compares_what_it_claims(tmp_path):
    """The ONNX step's computation, with the CPU standing in for CUDA: the Engine against itself is
    exact, OnnxEngine within float32 noise."""
    require_extra("onnx", "onnx", "onnxruntime", "onnxscript")
    res = gpu_check.parity(gpu_check.POLICY, "cpu", ["CPUExecutionProvider"], steps=3, envs=2)
    assert res["providers"] == ["CPUExecutionProvider"] and res["rows"] == 4 and res["steps"] == 3
    assert res["max_diff"]["engine"] == 0.0 and res["max_diff"]["onnx"] < 1e-4
