"""Shared fixtures: tiny policies built in Python (no downloads, a few KB each), and
`require_extra`: tests that need an optional extra skip naming it; under CI (env var CI set, as
`.ci/run` does; CI installs every extra) such a skip fails the run instead."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from lorasa_serve import AgentSpec, LoraSpec, PolicySpec, init_adapter, init_backbone, save_policy  # noqa: E402

MISSING_EXTRA = "missing extra"  # in every skip reason require_extra gives

# The devices the engine's oracle tests run on: the CPU, and CUDA where this torch and machine have it.
# Where there is none the cuda cases are not generated at all (no skip: CI fails some skips). The cuda
# cases compare with the CPU oracle (float64, per row) at the same tolerance; `pytest -k cuda` runs
# only them (benchmarks/gpu_check.py).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Each device in DEVICES in turn (the test id names it): build the Engine on it, move inputs
    there with `on_device`, compare outputs `.cpu()` with the CPU oracle."""
    return request.param


def on_device(device, *xs):
    """Tensors moved to `device` (None as it is): an engine's inputs as a caller on that device has
    them, so CUDA cases take the device path (values checked on the GPU, read back once)."""
    return [x.to(device) if isinstance(x, torch.Tensor) else x for x in xs]


def require_extra(extra: str, *modules: str) -> None:
    """Skip the calling test (or, at module level, the whole module) unless every module of the
    extra imports; the reason names the extra and the pip command."""
    missing = [m for m in modules if _missing(m)]
    if missing:
        pytest.skip(f"{MISSING_EXTRA} '{extra}': {', '.join(missing)} not installed "
                    f"(pip install 'lorasa-serve[{extra}]')", allow_module_level=True)


KSERVE_CLIENT = Path(sys.prefix) / "kserve-client"  # `make install`: tests/kserve-client.txt


def kserve_client():
    """The real `kserve` package, from the folder `make install` puts beside the venv's site-packages
    (kserve's pins would downgrade protobuf, psutil and pandas there: tests/kserve-client.txt). The
    folder goes last on sys.path, so the venv's own packages always win."""
    if str(KSERVE_CLIENT) not in sys.path and KSERVE_CLIENT.is_dir():
        sys.path.append(str(KSERVE_CLIENT))
    if _missing("kserve"):
        pytest.skip(f"{MISSING_EXTRA} 'dev': the kserve client is not in {KSERVE_CLIENT} (make install runs "
                    f"pip install --no-deps --target {KSERVE_CLIENT} -r tests/kserve-client.txt)",
                    allow_module_level=True)
    import kserve
    return kserve


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):  # a parent package is missing, or a broken install
        return True


def _skipped_for_missing_extra(report) -> str | None:
    """The reason, if `report` is a skip because an extra (or an importorskip module) is missing."""
    if not report.skipped or not isinstance(report.longrepr, tuple):
        return None
    reason = str(report.longrepr[2])
    return reason if MISSING_EXTRA in reason or "could not import" in reason else None


def _fail_under_ci(report) -> None:
    reason = _skipped_for_missing_extra(report) if os.environ.get("CI") else None
    if reason:
        report.outcome = "failed"
        report.longrepr = f"CI installs every extra, but this was skipped: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_under_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_under_ci(outcome.get_result())


def make_policy(directory, *, obs=(6, 6, 6), act=(2, 2, 2), recurrent=True, action="gaussian",
                hidden=16, rank=4, alpha=8.0, layers=None, seed=0, b_std=0.2, adapters=True,
                log_std_offset=False, agent_onehot=0, activation="relu"):
    """Write a tiny random policy with adapters that really differ (with `log_std_offset`, their
    per-agent log-std offsets too); returns (spec, backbone, adapters)."""
    agents = tuple(AgentSpec(f"agent_{i}", o, a) for i, (o, a) in enumerate(zip(obs, act)))
    spec = PolicySpec(agents=agents, hidden=hidden, recurrent=recurrent, action=action, activation=activation,
                      lora=LoraSpec(rank=rank, alpha=alpha, layers=layers, log_std_offset=log_std_offset),
                      agent_onehot=agent_onehot)
    g = torch.Generator().manual_seed(seed)
    backbone = init_backbone(spec, g, head_gain=1.0)
    if action == "gaussian":
        backbone["log_std"] = torch.linspace(-1.0, 0.0, spec.act_max)
    ads = {a: init_adapter(spec, g, b_std=b_std) for a in spec.agent_ids} if adapters else {}
    spec = save_policy(directory, spec, backbone, ads)
    return spec, backbone, ads


@pytest.fixture
def tiny_policy(tmp_path):
    d = tmp_path / "policy"
    spec, backbone, ads = make_policy(d)
    return d, spec, backbone, ads


@pytest.fixture
def hetero_policy(tmp_path):
    """MaMuJoCo Humanoid 9|8-like sizes: obs 242 / 170, act 9 / 8."""
    d = tmp_path / "hetero"
    spec, backbone, ads = make_policy(d, obs=(242, 170), act=(9, 8), hidden=32)
    return d, spec, backbone, ads


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    """A real redis-server on a free loopback port (module-scoped: tests use distinct key prefixes or
    flush it); `.restart()` brings it back empty, `.stop()`/`.start()` simulate an outage."""
    from benchmarks.servers import RedisServer
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def categorical_server(tmp_path_factory):
    """One real `bentoml serve` for the whole session (tests that share it must not change its
    adapters): a recurrent Categorical policy of two agents, obs 7 | 5, act 4 | 3, hidden 16, at most
    64 rows per request; `.policy` its directory, `.engine` the same policy in-process (lora mode)."""
    from lorasa_serve import Engine
    from benchmarks.servers import ServerProcess
    root = tmp_path_factory.mktemp("categorical_server")
    spec, _, _ = make_policy(root / "policy", obs=(7, 5), act=(4, 3), action="categorical")
    env = {"LORASA_POLICY": str(root / "policy"), "LORASA_STATE_DIR": str(root / "state"),
           "LORASA_MAX_ROWS_PER_REQUEST": "64"}
    with ServerProcess(env, root / "server.log") as server:
        server.spec, server.policy = spec, root / "policy"
        server.engine = Engine.from_dir(root / "policy", device="cpu", mode="lora")
        yield server


@pytest.fixture
def no_hang():
    """A blocking open or read (a FIFO) fails the test after 60 s instead of hanging the suite."""
    import signal

    def fail(*_):
        raise TimeoutError("blocked on a file")
    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)
