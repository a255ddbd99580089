"""`bentoml build` (into a temp BENTOML_HOME) produces a Bento with what the Redis backend needs: the
`redis` client in its requirements and the services/state package in its sources, importable from there.
Package locking (pip-compile against PyPI, which would resolve torch) is switched off for the test only:
the test's bentofile is the repo's with `lock_packages: false` added."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.launch import REPO

pytestmark = pytest.mark.slow


def test_bento_includes_the_redis_backend(tmp_path):
    text = (REPO / "bentofile.yaml").read_text()
    assert "\npython:\n" in text
    (tmp_path / "bentofile.yaml").write_text(text.replace("\npython:\n", "\npython:\n  lock_packages: false\n"))
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "home"), "BENTOML_DO_NOT_TRACK": "True"}
    bentoml = Path(sys.executable).parent / "bentoml"
    subprocess.run([str(bentoml), "build", "-f", str(tmp_path / "bentofile.yaml"), "."], cwd=REPO, env=env,
                   check=True, capture_output=True, text=True, timeout=300)
    (bento,) = (tmp_path / "home" / "bentos" / "lorasa_policy").glob("*/bento.yaml")
    root = bento.parent
    reqs = (root / "env" / "python" / "requirements.txt").read_text().splitlines()
    assert any(r.replace(" ", "").startswith("redis>=") for r in reqs), reqs
    src = root / "src"
    for module in ("base", "local", "redis"):
        assert (src / "services" / "state" / f"{module}.py").is_file()
    probe = ("import services.state.redis as r, services.service; "
             "print(r.__file__); print(r.redis.__version__)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=src, env=env, check=True, capture_output=True,
                         text=True, timeout=120).stdout.splitlines()
    assert out[0].startswith(str(src)), out  # the Bento's own copy, not the repo's
