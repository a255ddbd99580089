"""One request protocol (lorasa_serve/protocol.py): every case of one table goes through every entry
point, the in-process Engine, /v1 (JSON rows) and /v2 (OIP binary) of a real `bentoml serve` (the
session's shared server, tests/conftest.py), and the ONNX backend (when onnxruntime is installed), and
each gives the same outcome: accepted with equal outputs, or refused with the same message.

The policy: recurrent Categorical, agent_0 obs 7 / act 4, agent_1 obs 5 / act 3 (obs_max 7, act_max 4).
"""
from __future__ import annotations

import ast
import json
import re

import numpy as np
import pytest
import requests
from conftest import _missing

from lorasa_serve import InputError
from lorasa_serve.oip_codec import HEADER, decode_body, encode
from lorasa_serve.protocol import AgentTable, check_act

pytestmark = pytest.mark.slow
IDS = ["agent_0", "agent_1", "agent_1", "agent_0"]
H = 16


def _obs(seed=0):
    """[4, 7] valid rows: each agent's observation, zero past its obs_dim."""
    obs = np.random.default_rng(seed).standard_normal((4, 7)).astype(np.float32)
    obs[[1, 2], 5:] = 0.0
    return obs


def _with(x, where, value):
    x = x.copy()
    x[where] = value
    return x


def _state():
    return (np.random.default_rng(1).standard_normal((4, H)) * 0.5).astype(np.float32)


AVAIL = np.array([[1, 0, 1, 1], [0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 1]], bool)
# (name, inputs, expected error message or None: accepted)
CASES = [
    ("valid", dict(obs=_obs()), None),
    ("valid with state, reset and avail", dict(obs=_obs(), state=_state(), reset=np.array([1, 0, 0, 1], bool),
                                              avail=AVAIL), None),
    ("avail past act_dim ignored", dict(obs=_obs(), avail=np.ones((4, 4), bool)), None),
    ("non-zero padding", dict(obs=_with(_obs(), (2, 6), 0.25)),
     "row 2 (agent_1, obs_dim 5): non-zero values past its obs_dim: wrong agent's row?"),
    ("obs NaN", dict(obs=_with(_obs(), (3, 0), np.nan)),
     "row 3: obs contains NaN or inf (or a value beyond float32 range)"),
    ("obs inf", dict(obs=_with(_obs(), (1, 1), np.inf)),
     "row 1: obs contains NaN or inf (or a value beyond float32 range)"),
    ("state NaN", dict(obs=_obs(), state=_with(_state(), (2, 3), np.nan)),
     "row 2: state contains NaN or inf (or a value beyond float32 range)"),
    ("unknown agent", dict(ids=["agent_0", "nobody", "agent_1", "agent_0"], obs=_obs()),
     "row 1: unknown agent id 'nobody'; serving ['agent_0', 'agent_1']"),
    ("no available action", dict(obs=_obs(), avail=_with(AVAIL, 1, [False, False, False, True])),
     "rows [1]: no available action among the agent's actions (all-zero avail mask)"),
]


def _engine(be, case):
    ids = case.get("ids", IDS)
    return be.act(ids, case["obs"], case.get("state"), case.get("reset"), case.get("avail"))


def _v1(srv, case):
    ids, obs = case.get("ids", IDS), case["obs"]
    rows = []
    for i, a in enumerate(ids):
        row = {"agent_id": a, "obs": obs[i].tolist()}  # obs_max numbers: zeros past obs_dim
        for key, name in (("state", "state"), ("avail", "avail_actions")):
            if case.get(key) is not None:
                row[name] = case[key][i].tolist()
        if case.get("reset") is not None:
            row["reset"] = bool(case["reset"][i])
        rows.append(row)
    body = json.dumps({"rows": rows})  # NaN / Infinity literals, as Python's json reads them
    return requests.post(srv.url + "/v1/act", data=body, headers={"Content-Type": "application/json"},
                         timeout=30)


def _v2(srv, case):
    ids = np.array([a.encode() for a in case.get("ids", IDS)], object)
    tensors = [("agent_id", "BYTES", ids, True), ("obs", "FP32", case["obs"], True)]
    for name, dtype in (("state", "FP32"), ("reset", "BOOL"), ("avail", "BOOL")):
        if case.get(name) is not None:
            tensors.append((name, dtype, case[name], True))
    body, hlen = encode({"parameters": {"binary_data_output": True}}, "inputs", tensors)
    return requests.post(srv.url + "/v2/models/lorasa_policy/infer", data=body, timeout=30,
                         headers={"Content-Type": "application/octet-stream", HEADER: str(hlen)})


@pytest.fixture(scope="module")
def onnx_engine(categorical_server, tmp_path_factory):
    if any(_missing(m) for m in ("onnx", "onnxruntime", "onnxscript")):
        return None  # the other entry points still run (test_validation covers the ONNX extra's skip)
    from exporters import ExportConfig, export_policy
    from lorasa_serve.onnx_backend import OnnxEngine
    out = tmp_path_factory.mktemp("protocol_onnx")
    report = export_policy(ExportConfig(categorical_server.policy, out, progress=False))
    assert report.ok, report.table()
    return OnnxEngine.from_dir(out)


def _outcomes(srv, onnx, case) -> dict[str, tuple]:
    """entry point -> ("ok", actions [B], log_probs [B], state [B, H]) or ("error", message)."""
    got = {}
    for name, be in (("engine", srv.engine), ("onnx", onnx)):
        if be is None:
            continue
        try:
            out = _engine(be, case)
            got[name] = ("ok", out.actions.numpy(), out.log_probs.numpy(), out.state.numpy())
        except InputError as e:
            got[name] = ("error", str(e))
    r = _v1(srv, case)
    got["v1"] = ("ok", np.array(r.json()["actions"]), np.array(r.json()["log_probs"]),
                 np.array(r.json()["state"])) if r.status_code == 200 else ("error", r.json()["error"])
    assert r.status_code in (200, 400), r.text
    r = _v2(srv, case)
    assert r.status_code in (200, 400), r.text
    if r.status_code == 200:
        t = decode_body(r.content, r.headers.get(HEADER), "outputs").tensors
        got["v2"] = ("ok", t["action"].array, t["log_prob"].array, t["state_out"].array)
    else:
        got["v2"] = ("error", r.json()["error"])
    return got


@pytest.mark.parametrize("name,case,error", CASES, ids=[c[0] for c in CASES])
def test_every_entry_point_gives_the_same_outcome(categorical_server, onnx_engine, name, case, error):
    got = _outcomes(categorical_server, onnx_engine, case)
    if error is not None:
        assert got == {k: ("error", error) for k in got}, got
        return
    _, actions, logp, state = got["engine"]
    for k, (kind, a, lp, h) in got.items():
        assert kind == "ok", (k, a)
        np.testing.assert_array_equal(a, actions, err_msg=k)
        np.testing.assert_allclose(lp, logp, atol=1e-4, rtol=0, err_msg=k)
        np.testing.assert_allclose(h, state, atol=1e-5, rtol=0, err_msg=k)


def test_narrower_arrays_are_zero_padded(categorical_server):
    """Arrays (Engine, /v2, ONNX) may be narrower than obs_max / act_max: zero- / False-padded."""
    spec, eng = categorical_server.spec, categorical_server.engine
    obs = _obs()[[1, 2]]  # two agent_1 rows
    narrow = eng.act(["agent_1"] * 2, obs[:, :5], avail=AVAIL[[1, 2], :3])
    full = eng.act(["agent_1"] * 2, obs, avail=AVAIL[[1, 2]])
    assert np.array_equal(narrow.actions.numpy(), full.actions.numpy())
    req = check_act(AgentTable(spec), np.array([1, 1]), obs[:, :5])
    assert req.obs.shape == (2, spec.obs_max) and not req.obs[:, 5:].any()


def test_v1_rows_from_obs_dim_to_obs_max(categorical_server):
    """/v1 rows carry the agent's obs_dim numbers, or more (zeros) up to obs_max; fewer is an error."""
    srv, obs = categorical_server, _obs()
    short_row = {"agent_id": "agent_1", "obs": obs[1, :5].tolist()}
    padded = {"agent_id": "agent_1", "obs": obs[1, :6].tolist()}
    a, b = (requests.post(srv.url + "/v1/act", json={"rows": [r]}, timeout=30) for r in (short_row, padded))
    assert a.status_code == b.status_code == 200 and a.json()["actions"] == b.json()["actions"]
    r = requests.post(srv.url + "/v1/act", json={"rows": [{"agent_id": "agent_0", "obs": [0.0] * 6}]},
                      timeout=30)
    assert r.status_code == 400 and r.json()["error"] == "row 0: obs has shape [6], expected 7 numbers", r.text


def test_readme_quick_start_runs_as_written(tmp_path, monkeypatch):
    """README.md's "Quick start in Python" block, executed as written (issue 23 item 5)."""
    from pathlib import Path
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = re.search(r"## Quick start in Python\n\n```python\n(.*?)```", text, re.S).group(1)
    ast.parse(block)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md quick start", "exec"), {})
