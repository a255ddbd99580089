"""One set of input rules for every backend: the same hostile inputs give the same typed errors,
with the same messages, from `Engine` and from `OnnxEngine` (lorasa_serve/protocol.py)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import make_policy, require_extra

from lorasa_serve import Engine, InputError, UnknownAgentError
from lorasa_serve.backend import ActBackend

require_extra("onnx", "onnx", "onnxruntime", "onnxscript")
OBS, ACT, H = (7, 5), (4, 3), 16
IDS = ["agent_0", "agent_1"]


def _export(root, action: str, recurrent: bool):
    from exporters import ExportConfig, export_policy
    from lorasa_serve.onnx_backend import OnnxEngine

    make_policy(root / "p", action=action, obs=OBS, act=ACT, hidden=H, recurrent=recurrent, b_std=0.02)
    report = export_policy(ExportConfig(root / "p", root / "out", progress=False))
    assert report.ok, report.table()
    return {"engine": Engine.from_dir(root / "p", device="cpu"), "onnx": OnnxEngine.from_dir(root / "out")}


@pytest.fixture(scope="module")
def categorical(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("cat"), "categorical", True)


@pytest.fixture(scope="module")
def gaussian(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("gauss"), "gaussian", False)


def _obs(B=2):
    return np.zeros((B, OBS[0]), np.float32)


def _h(B=2):
    return np.zeros((B, H), np.float32)


# (name, call(backend), expected error type, message fragment): Categorical recurrent policy
CATEGORICAL_CASES = [
    ("bare string id", lambda b: b.act("agent_0", _obs(1), _h(1)), InputError, "not one string"),
    ("bytes id", lambda b: b.act(b"agent_0", _obs(1), _h(1)), InputError, "not one string"),
    ("unknown id", lambda b: b.act(["agent_0", "nobody"], _obs(), _h()), UnknownAgentError, "'nobody'"),
    ("huge unknown id", lambda b: b.act(["x" * 100_000], _obs(1), _h(1)), UnknownAgentError, "100000 characters"),
    ("unhashable ids", lambda b: b.act([["agent_0"]], _obs(1), _h(1)), InputError, "sequence of agent ids"),
    ("index out of range", lambda b: b.act(np.array([0, 2]), _obs(), _h()), UnknownAgentError, r"\[0, 2\)"),
    ("negative index", lambda b: b.act(torch.tensor([-1, 0]), _obs(), _h()), UnknownAgentError, "indices"),
    ("empty batch", lambda b: b.act([], np.zeros((0, 7)), None), InputError, "empty batch"),
    ("string obs", lambda b: b.act(IDS, [["a"] * 7, ["b"] * 7], _h()), InputError, "obs must be numeric"),
    ("object obs", lambda b: b.act(IDS, np.array([[None] * 7] * 2), _h()), InputError, "obs must be numeric"),
    ("ragged obs", lambda b: b.act(IDS, [[0.0] * 7, [0.0] * 3], _h()), InputError, "obs must be"),
    ("complex obs", lambda b: b.act(IDS, torch.zeros(2, 7, dtype=torch.complex64), _h()), InputError,
     "obs must be real"),
    ("obs too wide", lambda b: b.act(IDS, np.zeros((2, 8)), _h()), InputError,
     "row 0: obs has 8 values, more than the policy's obs_max 7"),
    ("obs narrower than obs_dim", lambda b: b.act(IDS, np.zeros((2, 6)), _h()), InputError,
     r"row 0 \(agent_0, obs_dim 7\): obs has 6 values, fewer than its obs_dim"),
    ("obs dict", lambda b: b.act(IDS, {"agent_0": np.zeros(7), "agent_1": np.zeros(5)}, _h()), InputError,
     r"obs is a dict \(\{'agent_0', 'agent_1'\}\).*use lorasa_serve.envloop.TeamPolicy"),
    ("obs rows", lambda b: b.act(IDS, _obs(3), _h()), InputError, "obs has shape"),
    ("obs 1-d", lambda b: b.act(IDS, np.zeros(7), _h()), InputError, "obs has shape"),
    ("obs NaN", lambda b: b.act(IDS, np.full((2, 7), np.nan), _h()), InputError, "obs contains NaN"),
    ("obs inf", lambda b: b.act(IDS, np.full((2, 7), np.inf), _h()), InputError, "obs contains NaN or inf"),
    ("state width", lambda b: b.act(IDS, _obs(), np.zeros((2, 3))), InputError,
     "row 0: state has 3 values, expected the policy's hidden size 16"),
    ("state rows", lambda b: b.act(IDS, _obs(), np.zeros((3, H))), InputError, r"state has shape \[3, 16\]"),
    ("state strings", lambda b: b.act(IDS, _obs(), [["s"] * H] * 2), InputError, "state must be numeric"),
    ("state NaN", lambda b: b.act(IDS, _obs(), np.full((2, H), np.nan)), InputError, "state contains NaN"),
    ("reset 2", lambda b: b.act(IDS, _obs(), _h(), np.array([2, 0])), InputError, "reset must hold 0/1"),
    ("reset 0.5", lambda b: b.act(IDS, _obs(), _h(), [0.5, 0.0]), InputError, "reset must hold 0/1"),
    ("reset shape", lambda b: b.act(IDS, _obs(), _h(), [True]), InputError, "reset has shape"),
    ("reset strings", lambda b: b.act(IDS, _obs(), _h(), ["yes", "no"]), InputError, "reset must be numeric"),
    ("avail empty row", lambda b: b.act(IDS, _obs(), _h(), avail=[[1, 0, 0, 0], [0, 0, 0, 1]]), InputError,
     r"rows \[1\]: no available action"),
    ("avail too wide", lambda b: b.act(IDS, _obs(), _h(), avail=np.ones((2, 5))), InputError,
     "row 0: avail has 5 values, more than the policy's act_max 4"),
    ("avail narrower than act_dim", lambda b: b.act(IDS[::-1], _obs(), _h(), avail=np.ones((2, 3))), InputError,
     r"row 1 \(agent_0, act_dim 4\): avail has 3 values, fewer than its act_dim"),
    ("avail dict", lambda b: b.act(IDS, _obs(), _h(), avail={"agent_0": [1, 1, 1, 1]}), InputError,
     "avail is a dict"),
    ("avail 3", lambda b: b.act(IDS, _obs(), _h(), avail=np.full((2, 4), 3)), InputError, "avail must hold 0/1"),
]
GAUSSIAN_CASES = [
    ("avail on gaussian", lambda b: b.act(IDS, _obs(), None, avail=np.ones((2, 4))), InputError,
     "only apply to categorical"),
    ("bare string id", lambda b: b.act("agent_1", _obs(1)), InputError, "not one string"),
    ("string obs", lambda b: b.act(IDS, np.array([["1"] * 7] * 2)), InputError, "obs must be numeric"),
]


def _error(call, backend) -> Exception:
    with pytest.raises(InputError) as info:
        call(backend)
    return info.value


@pytest.mark.parametrize("backend", ["engine", "onnx"])
@pytest.mark.parametrize("name,call,kind,match", CATEGORICAL_CASES, ids=[c[0] for c in CATEGORICAL_CASES])
def test_categorical_hostile_input(categorical, backend, name, call, kind, match):
    with pytest.raises(kind, match=match):
        call(categorical[backend])


@pytest.mark.parametrize("backend", ["engine", "onnx"])
@pytest.mark.parametrize("name,call,kind,match", GAUSSIAN_CASES, ids=[c[0] for c in GAUSSIAN_CASES])
def test_gaussian_hostile_input(gaussian, backend, name, call, kind, match):
    with pytest.raises(kind, match=match):
        call(gaussian[backend])


def test_both_backends_say_the_same(categorical, gaussian):
    for backends, cases in ((categorical, CATEGORICAL_CASES), (gaussian, GAUSSIAN_CASES)):
        for name, call, _, _ in cases:
            e, o = _error(call, backends["engine"]), _error(call, backends["onnx"])
            assert (type(e), str(e)) == (type(o), str(o)), name


def test_valid_input_still_acts_alike(categorical):
    eng, oe = categorical["engine"], categorical["onnx"]
    assert isinstance(eng, ActBackend) and isinstance(oe, ActBackend)
    rng = np.random.default_rng(0)
    obs = [rng.standard_normal(7).tolist(), rng.standard_normal(5).tolist() + [0.0, 0.0]]  # lists work
    args = (IDS, obs, None, [1, 0], [[1, 1, 0, 1], [True, False, True, False]])
    a, b = eng.act(*args), oe.act(*args)
    assert torch.equal(a.actions, b.actions)
    assert torch.allclose(a.state, b.state, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inputs_that_require_grad_act_like_plain_ones(categorical, gaussian, dtype):
    """A caller's tensor with requires_grad (float32 on CPU passes validation as a view) acts on both
    backends exactly like the same values without it."""
    rng = np.random.default_rng(1)
    obs = torch.tensor(rng.standard_normal((2, 7)), dtype=dtype)
    obs[1, 5:] = 0  # agent_1's obs_dim is 5
    state = torch.tensor(rng.standard_normal((2, H)), dtype=dtype)
    for backends, recurrent in ((categorical, True), (gaussian, False)):
        for name, be in backends.items():
            plain = be.act(IDS, obs, state if recurrent else None)
            graded = be.act(IDS, obs.clone().requires_grad_(True),
                            state.clone().requires_grad_(True) if recurrent else None)
            assert torch.equal(plain.actions, graded.actions), name
            if recurrent:
                assert torch.equal(plain.state, graded.state), name


def test_session_calls_reject_a_bare_string(categorical):
    eng = categorical["engine"]
    with pytest.raises(InputError, match="not one string"):
        eng.act_session("s", "agent_0", _obs(1))
    with pytest.raises(InputError, match="not one string"):
        eng.agent_index("agent_0")
    assert "s" not in eng.sessions  # nothing was stored


def test_runtime_never_imports_exporters():
    code = ("import sys, lorasa_serve, lorasa_serve.onnx_backend, lorasa_serve.onnx_contract, "
            "lorasa_serve.protocol, lorasa_serve.backend, lorasa_serve.engine\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('exporters', 'training', 'benchmarks'))\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
