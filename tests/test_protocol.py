"""One request protocol (lorasa_serve/protocol.py): every case of one table goes through every entry
point, the in-process Engine, /v1 (JSON rows) and /v2 (OIP binary) of a real `bentoml serve` (the
session's shared server, tests/conftest.py), and the ONNX backend (when onnxruntime is installed), and
each gives the same outcome: accepted with equal outputs, or refused with the same message (and, over
HTTP, the same status). A case that an entry point cannot express (a reset array of the wrong shape
in /v1's JSON rows, a session on the session-less ONNX backend, the row limit that only the service
has) names the entry points it runs on.

The policy: recurrent Categorical, agent_0 obs 7 / act 4, agent_1 obs 5 / act 3 (obs_max 7, act_max 4),
at most 64 rows per request; and a feed-forward Gaussian one of the same sizes (its own server).
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
ARRAYS = ("engine", "onnx", "v2")  # entry points that take arrays (not /v1's JSON rows)
HTTP = ("v1", "v2")
MAX_ROWS = 64  # the shared server's LORASA_MAX_ROWS_PER_REQUEST
# (name, inputs, expected error message or None: accepted). Inputs: ids, obs, state, reset, avail;
# "session": a session id (Engine.act_session in-process; "{}" in it: the entry point's name, so each
# steps its own session); "only": the entry points it runs on.
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
    # the width rule: from the widest obs_dim / act_dim of the rows present up to obs_max / act_max
    ("narrower than obs_dim", dict(obs=_obs()[:, :6]),
     "row 0 (agent_0, obs_dim 7): obs has 6 values, fewer than its obs_dim"),
    ("as wide as the rows' obs_dim", dict(ids=["agent_1"] * 4, obs=_obs(2)[:, :5]), None),
    ("wider than obs_max", dict(obs=np.pad(_obs(), ((0, 0), (0, 1)))),
     "row 0: obs has 8 values, more than the policy's obs_max 7"),
    ("avail narrower than act_dim", dict(obs=_obs(), avail=AVAIL[:, :3]),
     "row 0 (agent_0, act_dim 4): avail has 3 values, fewer than its act_dim"),
    ("avail wider than act_max", dict(obs=_obs(), avail=np.ones((4, 5), bool)),
     "row 0: avail has 5 values, more than the policy's act_max 4"),
    ("avail 0/1", dict(obs=_obs(), avail=AVAIL.astype(np.int64)), None),
    ("wrong state width", dict(obs=_obs(), state=_state()[:, :15]),
     "row 0: state has 15 values, expected the policy's hidden size 16"),
    ("wrong state rows", dict(obs=_obs(), state=_state()[:3], only=ARRAYS),
     "state has shape [3, 16], expected [4, width]: one row per agent id"),
    ("reset shape", dict(obs=_obs(), reset=np.array([1, 0, 1], bool), only=ARRAYS),
     "reset has shape [3], expected [4]"),
    ("over the row limit", dict(ids=["agent_0"] * (MAX_ROWS + 1), obs=np.zeros((MAX_ROWS + 1, 7), np.float32),
                                only=HTTP), (413, f"{MAX_ROWS + 1} rows is over the limit of {MAX_ROWS} per request")),
    ("duplicate agent in a session", dict(obs=_obs(), session="protocol-dup", only=("engine", *HTTP)),
     "with a session each agent may appear at most once per request"),
    ("a session", dict(ids=["agent_1", "agent_0"], obs=_obs(3)[[1, 0]], session="protocol-ok-{}",
                       only=("engine", *HTTP)), None),
    ("state with a session", dict(ids=["agent_0"], obs=_obs()[:1], state=_state()[:1], session="protocol-st",
                                  only=("engine", *HTTP)),
     "send either 'state' or a 'session_id', not both"),
    ("invalid session id", dict(ids=["agent_0"], obs=_obs()[:1], session="no spaces", only=HTTP),
     "'session_id' 'no spaces' is invalid: use 1-128 characters from A-Z a-z 0-9 . _ : @ -, starting with a "
     "letter or digit"),
    ("per-agent dict", dict(ids=["agent_0", "agent_1"], obs={"agent_0": np.zeros(7), "agent_1": np.zeros(5)},
                            only=("engine", "onnx")),
     "obs is a dict ({'agent_0', 'agent_1'}): act takes arrays with one row per agent id; for per-agent "
     "dicts (PettingZoo) use lorasa_serve.envloop.TeamPolicy"),
]
# the feed-forward Gaussian policy (its own server)
FF_CASES = [
    ("valid", dict(obs=_obs()), None),
    ("state for a feed-forward policy", dict(obs=_obs(), state=_state()),
     "this policy is feed-forward and takes no 'state'"),
    ("avail on a Gaussian policy", dict(obs=_obs(), avail=AVAIL), "avail (action masks) only apply to categorical "
                                                                  "policies"),
    ("narrower than obs_dim", dict(obs=_obs()[:, :4]),
     "row 0 (agent_0, obs_dim 7): obs has 4 values, fewer than its obs_dim"),
]


def _sid(case, entry: str) -> str | None:
    sid = case.get("session")
    return None if sid is None else sid.format(entry)


def _engine(be, case):
    ids, sid = case.get("ids", IDS), _sid(case, "engine")
    if sid is not None:
        if case.get("state") is not None:  # act_session has no state argument: the protocol's own check
            check_act(AgentTable(be.spec), ids, case["obs"], case["state"], session_id=sid)
        return be.act_session(sid, ids, case["obs"], case.get("avail"), reset=case.get("reset"))
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
    doc = {"rows": rows}
    if case.get("session") is not None:
        doc["session_id"] = _sid(case, "v1")
    body = json.dumps(doc)  # NaN / Infinity literals, as Python's json reads them
    return requests.post(srv.url + "/v1/act", data=body, headers={"Content-Type": "application/json"},
                         timeout=30)


def _v2(srv, case):
    ids = np.array([a.encode() for a in case.get("ids", IDS)], object)
    tensors = [("agent_id", "BYTES", ids, True), ("obs", "FP32", case["obs"], True)]
    for name, dtype in (("state", "FP32"), ("reset", "BOOL"), ("avail", "BOOL")):
        if case.get(name) is not None:
            arr = case[name].astype(bool) if dtype == "BOOL" else case[name]  # /v2 carries BOOL, not 0/1
            tensors.append((name, dtype, arr, True))
    params = {"binary_data_output": True}
    if case.get("session") is not None:
        params["session_id"] = _sid(case, "v2")
    body, hlen = encode({"parameters": params}, "inputs", tensors)
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
    """entry point -> ("ok", actions [B], log_probs [B], state [B, H] | None) or ("error", status,
    message); only the entry points the case runs on."""
    only = case.get("only", ("engine", "onnx", "v1", "v2"))
    got = {}
    for name, be in (("engine", srv.engine), ("onnx", onnx)):
        if be is None or name not in only:
            continue
        try:
            out = _engine(be, case)
            got[name] = ("ok", out.actions.numpy(), out.log_probs.numpy(),  # a session keeps the state
                         None if out.state is None or "session" in case else out.state.numpy())
        except InputError as e:
            got[name] = ("error", e.status, str(e))
    if "v1" in only:
        r = _v1(srv, case)
        assert r.status_code in (200, 400, 413), r.text
        d = r.json()
        got["v1"] = ("ok", _padded(d["actions"]), np.array(d["log_probs"]),
                     np.array(d["state"]) if "state" in d else None) if r.status_code == 200 else \
            ("error", r.status_code, d["error"])
    if "v2" in only:
        r = _v2(srv, case)
        assert r.status_code in (200, 400, 413), r.text
        if r.status_code == 200:
            t = decode_body(r.content, r.headers.get(HEADER), "outputs").tensors
            got["v2"] = ("ok", t["action"].array, t["log_prob"].array,
                         t["state_out"].array if "state_out" in t and case.get("session") is None else None)
        else:
            got["v2"] = ("error", r.status_code, r.json()["error"])
    return got


def _padded(actions: list) -> np.ndarray:
    """/v1's actions: Categorical ints, or Gaussian rows cut to each agent's act_dim -> [B, act_max]
    with zeros past act_dim, as the arrays entry points return them."""
    if not actions or not isinstance(actions[0], list):
        return np.array(actions)
    out = np.zeros((len(actions), 4), np.float32)  # act_max 4
    for i, a in enumerate(actions):
        out[i, :len(a)] = a
    return out


def _same_outcome(got: dict, error) -> None:
    if error is not None:
        status, message = error if isinstance(error, tuple) else (400, error)
        assert got == {k: ("error", status, message) for k in got}, got
        return
    first = next(iter(got))
    _, actions, logp, state = got[first]
    for k, (kind, a, lp, h) in got.items():
        assert kind == "ok", (k, a)
        a_close = np.testing.assert_array_equal if a.dtype.kind in "iu" else \
            lambda x, y, err_msg: np.testing.assert_allclose(x, y, atol=1e-5, rtol=0, err_msg=err_msg)
        a_close(a, actions, err_msg=k)
        np.testing.assert_allclose(lp, logp, atol=1e-4, rtol=0, err_msg=k)
        assert (h is None) == (state is None), k
        if h is not None:
            np.testing.assert_allclose(h, state, atol=1e-5, rtol=0, err_msg=k)


@pytest.mark.parametrize("name,case,error", CASES, ids=[c[0] for c in CASES])
def test_every_entry_point_gives_the_same_outcome(categorical_server, onnx_engine, name, case, error):
    got = _outcomes(categorical_server, onnx_engine, case)
    assert len(got) >= 2, got  # at least two entry points compared
    _same_outcome(got, error)


@pytest.fixture(scope="module")
def feed_forward(tmp_path_factory):
    """A real `bentoml serve` of a feed-forward Gaussian policy (obs 7 | 5, act 4 | 3), its Engine and
    (when onnxruntime is installed) its ONNX export."""
    from benchmarks.servers import ServerProcess
    from conftest import make_policy
    from lorasa_serve import Engine
    root = tmp_path_factory.mktemp("protocol_ff")
    make_policy(root / "policy", obs=(7, 5), act=(4, 3), recurrent=False)
    onnx = None
    if not any(_missing(m) for m in ("onnx", "onnxruntime", "onnxscript")):
        from exporters import ExportConfig, export_policy
        from lorasa_serve.onnx_backend import OnnxEngine
        report = export_policy(ExportConfig(root / "policy", root / "onnx", progress=False))
        assert report.ok, report.table()
        onnx = OnnxEngine.from_dir(root / "onnx")
    env = {"LORASA_POLICY": str(root / "policy"), "LORASA_STATE_DIR": str(root / "state")}
    with ServerProcess(env, root / "server.log") as server:
        server.engine = Engine.from_dir(root / "policy", device="cpu", mode="lora")
        yield server, onnx


@pytest.mark.parametrize("name,case,error", FF_CASES, ids=[c[0] for c in FF_CASES])
def test_feed_forward_gaussian_policy_gives_the_same_outcome(feed_forward, name, case, error):
    srv, onnx = feed_forward
    _same_outcome(_outcomes(srv, onnx, case), error)


def test_narrower_arrays_are_zero_padded(categorical_server):
    """Arrays as wide as the rows' widest obs_dim / act_dim are zero- / False-padded to obs_max / act_max."""
    spec, eng = categorical_server.spec, categorical_server.engine
    obs = _obs()[[1, 2]]  # two agent_1 rows
    narrow = eng.act(["agent_1"] * 2, obs[:, :5], avail=AVAIL[[1, 2], :3])
    full = eng.act(["agent_1"] * 2, obs, avail=AVAIL[[1, 2]])
    assert np.array_equal(narrow.actions.numpy(), full.actions.numpy())
    req = check_act(AgentTable(spec), np.array([1, 1]), obs[:, :5])
    assert req.obs.shape == (2, spec.obs_max) and not req.obs[:, 5:].any()


def test_v1_rows_from_obs_dim_to_obs_max(categorical_server):
    """/v1 rows carry the agent's obs_dim numbers, or more (zeros) up to obs_max; fewer is the
    protocol's error, word for word what an array of that width gets."""
    srv, obs = categorical_server, _obs()
    short_row = {"agent_id": "agent_1", "obs": obs[1, :5].tolist()}
    padded = {"agent_id": "agent_1", "obs": obs[1, :6].tolist()}
    a, b = (requests.post(srv.url + "/v1/act", json={"rows": [r]}, timeout=30) for r in (short_row, padded))
    assert a.status_code == b.status_code == 200 and a.json()["actions"] == b.json()["actions"]
    r = requests.post(srv.url + "/v1/act", json={"rows": [padded, {"agent_id": "agent_0", "obs": [0.0] * 6}]},
                      timeout=30)
    want = "row 1 (agent_0, obs_dim 7): obs has 6 values, fewer than its obs_dim"
    assert r.status_code == 400 and r.json()["error"] == want, r.text
    with pytest.raises(InputError) as e:
        check_act(AgentTable(srv.spec), ["agent_1", "agent_0"], np.zeros((2, 6)))
    assert str(e.value) == want


def test_readme_quick_start_runs_as_written(tmp_path, monkeypatch):
    """README.md's "Quick start in Python" block, executed as written (issue 23 item 5)."""
    from pathlib import Path
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = re.search(r"## Quick start in Python\n\n```python\n(.*?)```", text, re.S).group(1)
    ast.parse(block)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md quick start", "exec"), {})
