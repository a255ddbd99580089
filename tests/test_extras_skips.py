"""`require_extra` skips name the extra; with CI set, a skip for a missing extra (or an
importorskip) fails the run (tests/conftest.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent
SAMPLE = '''
import pytest
from conftest import require_extra

def test_needs_a_missing_extra():
    require_extra("imaginary", "no_such_module_xyz")

def test_importorskip():
    pytest.importorskip("no_such_module_abc")

def test_other_skip():
    pytest.skip("not about extras")

def test_present_extra():
    require_extra("core", "numpy", "torch")
'''
MODULE_SKIP = '''
from conftest import require_extra
require_extra("imaginary", "no_such_module_xyz")

def test_never_runs():
    raise AssertionError
'''


def _run(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess:
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    (tmp_path / "test_module.py").write_text(MODULE_SKIP)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-rs", "-q", "-p",
                           "no:cacheprovider", "--continue-on-collection-errors",
                           "-c", str(tmp_path / "pytest.ini"), str(tmp_path)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)


def test_skips_name_the_extra_without_ci(tmp_path):
    r = _run(tmp_path, None)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 passed, 4 skipped" in r.stdout
    assert "missing extra 'imaginary': no_such_module_xyz not installed (pip install " \
           "'lorasa-serve[imaginary]')" in r.stdout


def test_ci_fails_skips_for_missing_extras(tmp_path):
    r = _run(tmp_path, "true")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "2 failed, 1 passed, 1 skipped, 1 error" in r.stdout  # the unrelated skip stays a skip
    assert "CI installs every extra, but this was skipped" in r.stdout
