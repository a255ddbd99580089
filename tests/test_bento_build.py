"""`bentoml build` (into a temp BENTOML_HOME) of both bentofiles: each Bento holds exactly the service
(services/, the runtime library, the default policy) and nothing that is not serving (benchmarks, tests,
training, exporters); its requirements pin the tested torch (the CPU build from PyTorch's CPU index, or
the CUDA build for the GPU variant) and carry no CUDA packages for a CPU service; the service imports
from the Bento's own sources. Package locking (pip-compile, which needs PyPI and PyTorch's index) is
switched off for the test only: the test's bentofile is the repo's with `lock_packages: false` added."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.servers import REPO

pytestmark = pytest.mark.slow
SERVING_DIRS = {"services", "lorasa_serve", "policies"}  # and bentofile.yaml itself


def build(tmp_path: Path, bentofile: str) -> Path:
    text = (REPO / bentofile).read_text()
    assert "\npython:\n" in text
    (tmp_path / "bentofile.yaml").write_text(text.replace("\npython:\n", "\npython:\n  lock_packages: false\n"))
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "home"), "BENTOML_DO_NOT_TRACK": "True"}
    bentoml = Path(sys.executable).parent / "bentoml"
    subprocess.run([str(bentoml), "build", "-f", str(tmp_path / "bentofile.yaml"), "."], cwd=REPO, env=env,
                   check=True, capture_output=True, text=True, timeout=300)
    (bento,) = (tmp_path / "home" / "bentos" / "lorasa_policy").glob("*/bento.yaml")
    return bento.parent


def requirements(root: Path) -> list[str]:
    lines = (root / "env" / "python" / "requirements.txt").read_text().splitlines()
    return [ln.replace(" ", "") for ln in lines if ln.strip() and not ln.startswith("#")]


@pytest.mark.parametrize("bentofile,torch_pin", [("bentofile.yaml", "torch==2.13.0+cpu"),
                                                 ("bentofile.gpu.yaml", "torch==2.13.0")])
def test_the_bento_is_exactly_the_service(tmp_path, bentofile, torch_pin):
    root = build(tmp_path, bentofile)
    reqs = requirements(root)
    assert torch_pin in reqs, reqs
    assert any(r.startswith("redis>=") for r in reqs), reqs  # the Redis backend's client
    assert not [r for r in reqs if r.lower().startswith(("nvidia-", "cuda-", "triton"))], reqs
    if bentofile == "bentofile.yaml":
        assert "--extra-index-url" + "https://download.pytorch.org/whl/cpu" in reqs, reqs
    import torch
    assert torch.__version__.split("+")[0] == torch_pin.split("==")[1].split("+")[0], \
        f"the Bento pins {torch_pin}, the tests ran with torch {torch.__version__}"

    src = root / "src"
    assert {p.name for p in src.iterdir()} == SERVING_DIRS | {"bentofile.yaml"}
    shipped = {p.relative_to(src).as_posix() for p in (src / "services").rglob("*.py")}
    in_repo = {p.relative_to(REPO).as_posix() for p in (REPO / "services").rglob("*.py")}
    assert shipped == in_repo  # services/ holds only the service: all of it ships, nothing else
    assert not [p for p in src.rglob("*") if p.name in ("benchmarks", "tests", "training", "exporters")]
    assert {p.name for p in (src / "policies").iterdir()} == {"halfcheetah_2x3"}

    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "home"), "BENTOML_DO_NOT_TRACK": "True"}
    probe = ("import services.state.redis_backend as r, services.service, lorasa_serve; "
             "print(r.__file__); print(lorasa_serve.__file__); print(r.redis.__version__)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=src, env=env, check=True, capture_output=True,
                         text=True, timeout=120).stdout.splitlines()
    assert out[0].startswith(str(src)) and out[1].startswith(str(src)), out  # the Bento's copies
