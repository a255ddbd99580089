"""/v2 (Open Inference Protocol) against a real `bentoml serve`, spoken by a standard client
(`tritonclient.http`): JSON and binary results equal `Engine.act`, /v1 and /v2 agree row for row,
sessions and hot swap, every kind of bad input (4xx, nothing changes), and /docs.json."""
from __future__ import annotations

import asyncio
import json
import struct
import threading

import numpy as np
import pytest
from conftest import kserve_client, make_policy, require_extra

require_extra("serve", "starlette", "bentoml")
require_extra("dev", "requests", "tritonclient", "openapi_spec_validator")
import requests  # noqa: E402
import torch  # noqa: E402
import tritonclient.http as th  # noqa: E402

from lorasa_serve import Engine, init_adapter  # noqa: E402
from lorasa_serve.artifacts import adapter_bytes  # noqa: E402
from lorasa_serve.oip_codec import HEADER, encode  # noqa: E402
from benchmarks.servers import ServerProcess  # noqa: E402

pytestmark = pytest.mark.slow
TOKEN = "oip-token-0123456789"
MAX_ROWS = 64
MODEL = "lorasa_policy"
INFER = f"/v2/models/{MODEL}/infer"


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    root = tmp_path_factory.mktemp("oip")
    spec, _, _ = make_policy(root / "policy", obs=(6, 5, 6), act=(2, 3, 2))
    env = {"LORASA_POLICY": str(root / "policy"), "LORASA_ADMIN_TOKEN": TOKEN,
           "LORASA_STATE_DIR": str(root / "state"), "LORASA_MAX_ROWS_PER_REQUEST": str(MAX_ROWS),
           "LORASA_MAX_BODY_BYTES": str(256 * 1024), "LORASA_MODEL_NAME": None}
    with ServerProcess(env, root / "server.log") as server:
        server.spec = spec
        server.engine = Engine.from_dir(root / "policy", device="cpu", mode="lora")
        server.triton = th.InferenceServerClient(server.url.removeprefix("http://"))
        yield server


def sample(spec, n, seed):
    """-> ids [n], obs [n, obs_max] zero past each agent's obs_dim, state [n, H], reset [n]."""
    g = np.random.default_rng(seed)
    ids = [spec.agent_ids[k] for k in g.integers(0, len(spec.agents), n)]
    obs = g.standard_normal((n, spec.obs_max)).astype(np.float32)
    obs *= np.arange(spec.obs_max) < np.array([spec.agent(a).obs_dim for a in ids])[:, None]
    return ids, obs, g.standard_normal((n, spec.hidden)).astype(np.float32), g.random(n) < 0.3


def engine_out(srv, ids, obs, state=None, reset=None, generator=None):
    out = srv.engine.act(ids, torch.tensor(obs), None if state is None else torch.tensor(state),
                         None if reset is None else torch.from_numpy(reset),
                         deterministic=generator is None, generator=generator)
    return out.actions.numpy(), out.log_probs.numpy(), out.state.numpy()


def triton_infer(srv, ids, obs, state=None, reset=None, binary=True, index=False, params=None,
                 outputs=("action", "log_prob", "state_out", "version"), **infer_kw):
    ins = []
    if index:
        ins.append(th.InferInput("agent_index", [len(ids)], "INT64"))
        ins[-1].set_data_from_numpy(np.array([srv.spec.agent_ids.index(a) for a in ids]), binary_data=binary)
    else:
        ins.append(th.InferInput("agent_id", [len(ids)], "BYTES"))
        ins[-1].set_data_from_numpy(np.array([a.encode() for a in ids], dtype=object), binary_data=binary)
    for name, arr, dt in (("obs", obs, "FP32"), ("state", state, "FP32"), ("reset", reset, "BOOL")):
        if arr is not None:
            ins.append(th.InferInput(name, list(arr.shape), dt))
            ins[-1].set_data_from_numpy(arr, binary_data=binary)
    outs = [th.InferRequestedOutput(o, binary_data=binary) for o in outputs]
    return srv.triton.infer(MODEL, ins, outputs=outs, parameters=params, **infer_kw)


def assert_equal(res, want, with_state=True):
    np.testing.assert_allclose(res.as_numpy("action"), want[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(res.as_numpy("log_prob"), want[1], atol=1e-4, rtol=0)
    if with_state:
        np.testing.assert_allclose(res.as_numpy("state_out"), want[2], atol=1e-5, rtol=0)


def test_health_and_metadata_through_tritonclient(srv):
    t, spec = srv.triton, srv.spec
    assert t.is_server_live() and t.is_server_ready() and t.is_model_ready(MODEL)
    assert "binary_tensor_data" in t.get_server_metadata()["extensions"]
    md = t.get_model_metadata(MODEL)
    inputs = {i["name"]: (i["datatype"], i["shape"]) for i in md["inputs"]}
    outputs = {o["name"]: (o["datatype"], o["shape"]) for o in md["outputs"]}
    assert inputs["obs"] == ("FP32", [-1, spec.obs_max]) and inputs["state"] == ("FP32", [-1, spec.hidden])
    assert inputs["agent_id"] == ("BYTES", [-1]) and inputs["reset"] == ("BOOL", [-1])
    assert outputs == {"action": ("FP32", [-1, spec.act_max]), "log_prob": ("FP32", [-1]),
                       "state_out": ("FP32", [-1, spec.hidden]), "version": ("INT64", [-1])}
    assert t.get_model_metadata(MODEL, model_version="1")["name"] == MODEL
    assert not t.is_model_ready("other_model")
    assert requests.get(srv.url + "/v2/models/other").json()["error"].startswith("unknown model")


@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("index", [False, True])
def test_tritonclient_results_equal_engine_act(srv, binary, index):
    ids, obs, state, reset = sample(srv.spec, 13, 1)
    res = triton_infer(srv, ids, obs, state, reset, binary=binary, index=index)
    assert_equal(res, engine_out(srv, ids, obs, state, reset))
    assert res.as_numpy("version").tolist() == [srv.engine.versions()[a] for a in ids]
    assert res.get_output("obs") is None and res.as_numpy("action").dtype == np.float32
    # seeded sampling equals Engine.act with a generator seeded the same way, and repeats
    params = {"deterministic": False, "seed": 1234}
    a = triton_infer(srv, ids, obs, state, reset, binary=binary, index=index, params=params)
    b = triton_infer(srv, ids, obs, state, reset, binary=binary, index=index, params=params)
    assert_equal(a, engine_out(srv, ids, obs, state, reset, torch.Generator().manual_seed(1234)))
    np.testing.assert_array_equal(a.as_numpy("action"), b.as_numpy("action"))


def test_default_outputs_and_requested_subset(srv):
    ids, obs, _, _ = sample(srv.spec, 3, 2)
    body, hlen = encode({}, "inputs", [("agent_id", "BYTES", np.array([a.encode() for a in ids], object), True),
                                       ("obs", "FP32", obs, False)])
    r = requests.post(srv.url + INFER, data=body, headers={HEADER: str(hlen)})
    assert r.status_code == 200 and HEADER not in r.headers, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert list(out) == ["action", "log_prob", "state_out", "version"]
    np.testing.assert_allclose(np.reshape(out["action"]["data"], out["action"]["shape"]),
                               engine_out(srv, ids, obs)[0], atol=1e-5)
    res = triton_infer(srv, ids, obs, outputs=("log_prob",))
    assert res.get_output("action") is None and res.as_numpy("log_prob").shape == (3,)
    r = requests.post(srv.url + INFER, json={"id": "req-7", "inputs": [
        {"name": "agent_id", "shape": [1], "datatype": "BYTES", "data": ["agent_0"]},
        {"name": "obs", "shape": [1, 6], "datatype": "FP32", "data": [[0.5] * 6]}]})
    assert r.status_code == 200 and r.json()["id"] == "req-7" and r.json()["model_name"] == MODEL


def test_v1_and_v2_agree_row_for_row(srv):
    spec = srv.spec
    ids, obs, state, reset = sample(spec, 17, 3)
    rows = [{"agent_id": a, "obs": obs[i, :spec.agent(a).obs_dim].tolist(), "state": state[i].tolist(),
             "reset": bool(reset[i])} for i, a in enumerate(ids)]
    v1 = requests.post(srv.url + "/v1/act", json={"rows": rows}).json()
    v2 = triton_infer(srv, ids, obs, state, reset)
    for i, a in enumerate(ids):
        d = spec.agent(a).act_dim
        np.testing.assert_allclose(v2.as_numpy("action")[i, :d], v1["actions"][i], atol=1e-6)
        assert not v2.as_numpy("action")[i, d:].any()
    np.testing.assert_allclose(v2.as_numpy("log_prob"), v1["log_probs"], atol=1e-6)
    np.testing.assert_allclose(v2.as_numpy("state_out"), v1["state"], atol=1e-6)
    assert v2.as_numpy("version").tolist() == v1["versions"]


def kserve_infer(srv, ids, obs, state=None, reset=None, binary=True, params=None, outputs=None,
                 model_name=MODEL, request_id=None, response_headers=None):
    """The real kserve 0.21 client: InferenceRESTClient(...).infer(InferRequest) -> InferResponse."""
    kserve = kserve_client()
    ins = [kserve.InferInput("agent_id", [len(ids)], "BYTES")]
    ins[0].set_data_from_numpy(np.array([a.encode() for a in ids], dtype=object), binary_data=binary)
    for name, arr, dt in (("obs", obs, "FP32"), ("state", state, "FP32"), ("reset", reset, "BOOL")):
        if arr is not None:
            ins.append(kserve.InferInput(name, list(arr.shape), dt))
            ins[-1].set_data_from_numpy(arr, binary_data=binary)
    from kserve.protocol.infer_type import RequestedOutput
    req_outputs = None if outputs is None else [RequestedOutput(o, {"binary_data": binary}) for o in outputs]
    req = kserve.InferRequest(model_name, ins, request_id=request_id, parameters=params,
                              request_outputs=req_outputs)

    async def go():
        client = kserve.InferenceRESTClient(kserve.RESTConfig(protocol="v2", timeout=30))
        try:
            return await client.infer(srv.url, req, model_name=MODEL, response_headers=response_headers)
        finally:
            await client.close()
    return asyncio.run(go())


def kserve_arrays(res) -> dict[str, np.ndarray]:
    return {o.name: o.as_numpy() for o in res.outputs}


@pytest.mark.parametrize("binary", [False, True])
def test_kserve_client_results_equal_engine_act(srv, binary):
    ids, obs, state, reset = sample(srv.spec, 9, 11)
    headers: dict = {}
    res = kserve_infer(srv, ids, obs, state, reset, binary=binary, request_id="kserve-1",
                       params={"binary_data_output": binary}, response_headers=headers)
    assert res.model_name == MODEL and res.id == "kserve-1"
    assert (HEADER.lower() in {k.lower() for k in headers}) == binary  # binary outputs came back
    out = kserve_arrays(res)
    want = engine_out(srv, ids, obs, state, reset)
    np.testing.assert_allclose(out["action"], want[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(out["log_prob"], want[1], atol=1e-4, rtol=0)
    np.testing.assert_allclose(out["state_out"], want[2], atol=1e-5, rtol=0)
    assert out["version"].tolist() == [srv.engine.versions()[a] for a in ids]
    # request parameters as kserve sends them (typed InferParameter values) and a session
    params = {"deterministic": False, "seed": 77}
    a = kserve_arrays(kserve_infer(srv, ids, obs, state, reset, binary=binary, params=params))
    want = engine_out(srv, ids, obs, state, reset, torch.Generator().manual_seed(77))
    np.testing.assert_allclose(a["action"], want[0], atol=1e-5, rtol=0)
    team = srv.spec.agent_ids  # a session step: each agent once
    tobs = sample(srv.spec, 3, 13)[1] * (np.arange(srv.spec.obs_max) <
                                        np.array([srv.spec.agent(a).obs_dim for a in team])[:, None])
    sess = kserve_arrays(kserve_infer(srv, team, tobs, binary=binary, params={"session_id": f"ks-{binary}"}))
    assert "state_out" not in sess
    np.testing.assert_allclose(sess["action"], engine_out(srv, team, tobs)[0], atol=1e-5, rtol=0)
    # requested outputs, each with its binary_data parameter
    sub = kserve_arrays(kserve_infer(srv, ids, obs, state, binary=binary, outputs=("log_prob", "version")))
    assert list(sub) == ["log_prob", "version"]
    np.testing.assert_allclose(sub["log_prob"], engine_out(srv, ids, obs, state)[1], atol=1e-4, rtol=0)


def test_kserve_model_name_in_the_body_must_match_the_url(srv):
    """kserve puts model_name in every body: accepted when it is the URL's model, else a 400 naming it;
    model_version likewise (raw requests: kserve's REST client sends no model_version)."""
    ids, obs, _, _ = sample(srv.spec, 2, 12)
    import httpx
    with pytest.raises(httpx.HTTPStatusError) as e:
        kserve_infer(srv, ids, obs, model_name="another_model")
    assert e.value.response.status_code == 400
    assert "model_name 'another_model' contradicts the URL's 'lorasa_policy'" in e.value.response.json()["error"]
    body = {"model_name": MODEL, "model_version": "1", "id": "x", "inputs": [
        {"name": "agent_id", "shape": [1], "datatype": "BYTES", "data": ["agent_0"],
         "parameters": {"content_type": "str"}},
        {"name": "obs", "shape": [1, 6], "datatype": "FP32", "data": [[0.5] * 6]}],
        "outputs": [{"name": "action", "parameters": {"binary_data": False}}]}
    r = requests.post(srv.url + INFER, json=body)
    assert r.status_code == 200 and [o["name"] for o in r.json()["outputs"]] == ["action"], r.text
    r = requests.post(srv.url + f"/v2/models/{MODEL}/versions/1/infer", json=body)
    assert r.status_code == 200, r.text
    for field, value, words in (("model_version", "2", "model_version '2' contradicts the URL's '1'"),
                                ("model_name", 7, "'model_name' must be a string")):
        r = requests.post(srv.url + INFER, json={**body, field: value})
        assert r.status_code == 400 and words in r.json()["error"], r.text


def test_sessions_and_hot_swap_through_v2(srv):
    spec = srv.spec
    ids = spec.agent_ids
    steps = [sample(spec, 3, 40 + t)[1] for t in range(3)]
    steps = [o * (np.arange(spec.obs_max) < np.array([spec.agent(a).obs_dim for a in ids])[:, None])
             for o in steps]
    state = None
    for t, obs in enumerate(steps[:2]):
        res = triton_infer(srv, ids, obs, params={"session_id": "v2-ep"}, outputs=("action", "log_prob"))
        want = engine_out(srv, ids, obs, state)
        assert_equal(res, want, with_state=False)
        assert res.get_response()["parameters"] == {"session_state": "new" if t == 0 else "resumed"}
        state = want[2]
    new = init_adapter(spec, torch.Generator().manual_seed(5), b_std=0.5)
    r = requests.put(srv.url + "/v1/admin/adapters/agent_2", data=adapter_bytes(spec, "agent_2", new),
                     headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert r.status_code == 200, r.text
    srv.engine.set_adapter("agent_2", new)
    res = triton_infer(srv, ids, steps[2], params={"session_id": "v2-ep"})
    assert_equal(res, engine_out(srv, ids, steps[2], state))  # carried state, new adapter
    assert res.as_numpy("version").tolist() == [1, 1, r.json()["version"]]
    # the session's state is shared with /v1: resetting it there restarts it here
    assert requests.post(srv.url + "/v1/sessions/v2-ep/reset").json()["existed"]
    res = triton_infer(srv, ids, steps[0], params={"session_id": "v2-ep"})
    assert_equal(res, engine_out(srv, ids, steps[0]))
    assert res.get_response()["parameters"] == {"session_state": "new"}  # a zero state, and it says so
    assert "parameters" not in triton_infer(srv, ids, steps[0]).get_response()  # stateless: none


def test_tritonclient_scheduling_hints_ignored_and_sequences_refused(srv):
    """infer(timeout=, priority=) sends them as request parameters: accepted, ignored (same result);
    infer(sequence_id=, sequence_start=) is a 400 naming session_id, the parameter to use."""
    ids, obs, state, reset = sample(srv.spec, 4, 77)
    res = triton_infer(srv, ids, obs, state, reset, timeout=5_000_000, priority=1)
    assert_equal(res, engine_out(srv, ids, obs, state, reset))
    with pytest.raises(th.InferenceServerException) as e:
        triton_infer(srv, ids, obs, sequence_id=42, sequence_start=True)
    assert e.value.status() == "400" and "'session_id'" in e.value.message(), e.value


def _binary_request(inputs, params=None, outputs=None, hlen_delta=0, tail=b""):
    """inputs: (name, datatype, shape, raw bytes) -> (body, headers)."""
    head = {"inputs": [{"name": n, "datatype": d, "shape": s, "parameters": {"binary_data_size": len(b)}}
                       for n, d, s, b in inputs]}
    if params:
        head["parameters"] = params
    if outputs:
        head["outputs"] = outputs
    j = json.dumps(head).encode()
    return j + b"".join(b for *_, b in inputs) + tail, {HEADER: str(len(j) + hlen_delta)}


def _ids(*names: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(n)) + n for n in names)


def _bad_requests(spec):
    f32 = lambda *rows: np.array(rows, dtype=np.float32).tobytes()  # noqa: E731
    ok_obs = f32([0.1] * 6)
    a0 = ("agent_id", "BYTES", [1], _ids(b"agent_0"))
    obs = ("obs", "FP32", [1, 6], ok_obs)
    return [
        ("binary size short of shape", _binary_request([a0, ("obs", "FP32", [1, 6], ok_obs[:-4])]), 400,
         "takes 24"),
        ("wrong datatype size", _binary_request([a0, ("obs", "FP64", [1, 6], ok_obs)]), 400, "takes 48"),
        ("header length past body", _binary_request([a0, obs], hlen_delta=10_000), 400, "past the end"),
        ("bytes after last tensor", _binary_request([a0, obs], tail=b"xx"), 400, "after the last"),
        ("non-numeric header length", (_binary_request([a0, obs])[0], {HEADER: "12a"}), 400,
         "non-negative integer"),
        ("non-ASCII digit header length", (_binary_request([a0, obs])[0], {HEADER: "\u00b2"}), 400,
         "non-negative integer"),
        ("text/plain body (cross-site POST)", (_binary_request([a0, obs])[0],
                                               {**_binary_request([a0, obs])[1], "Content-Type": "text/plain"}),
         415, "Content-Type"),
        ("compressed body", (_binary_request([a0, obs])[0],
                             {**_binary_request([a0, obs])[1], "Content-Encoding": "gzip"}), 415, "uncompressed"),
        ("unknown input", _binary_request([a0, obs, ("mask", "BOOL", [1], b"\x01")]), 400, "unknown inputs"),
        ("obs as FP64", _binary_request([a0, ("obs", "FP64", [1, 6], np.zeros(6).tobytes())]), 400,
         "must be FP32"),
        ("unknown datatype", _binary_request([a0, ("obs", "FLOAT", [1, 6], ok_obs)]), 400, "unknown datatype"),
        ("shapes disagree", _binary_request([("agent_id", "BYTES", [2], _ids(b"agent_0", b"agent_1")), obs]),
         400, "obs has shape [1, 6], expected [2, width]: one row per agent id"),
        ("obs too wide", _binary_request([a0, ("obs", "FP32", [1, 7], ok_obs + ok_obs[:4])]), 400,
         "row 0: obs has 7 values, more than the policy's obs_max 6"),
        ("reset shape", _binary_request([a0, obs, ("reset", "BOOL", [2], b"\x00\x01")]), 400, "reset"),
        ("BOOL byte not 0/1", _binary_request([a0, obs, ("reset", "BOOL", [1], b"\x07")]), 400, "0 or 1"),
        ("BYTES id not UTF-8", _binary_request([("agent_id", "BYTES", [1], _ids(b"\xff\xfeag")), obs]), 400,
         "not UTF-8"),
        ("BYTES length past data", _binary_request([("agent_id", "BYTES", [1], struct.pack("<I", 99) + b"a"),
                                                    obs]), 400, "past the end"),
        ("unknown agent", _binary_request([("agent_id", "BYTES", [1], _ids(b"nobody")), obs]), 400,
         "row 0: unknown agent id 'nobody'"),
        ("agent index out of range", _binary_request([("agent_index", "INT64", [1],
                                                       np.array([7], np.int64).tobytes()), obs]), 400,
         "agent indices must be in [0, 3)"),
        ("both agent inputs", _binary_request([a0, ("agent_index", "INT64", [1], np.zeros(1, np.int64).tobytes()),
                                               obs]), 400, "exactly one"),
        ("NaN obs", _binary_request([a0, ("obs", "FP32", [1, 6], f32([np.nan] + [0] * 5))]), 400, "NaN"),
        ("inf state", _binary_request([a0, obs, ("state", "FP32", [1, spec.hidden],
                                                 f32([np.inf] * spec.hidden))]), 400, "NaN or inf"),
        ("obs past agent_1's obs_dim", _binary_request([("agent_id", "BYTES", [1], _ids(b"agent_1")),
                                                        ("obs", "FP32", [1, 6], f32([1] * 6))]), 400,
         "row 0 (agent_1, obs_dim 5): non-zero values past its obs_dim"),
        ("rows over the limit", _binary_request([("agent_index", "INT64", [MAX_ROWS + 1],
                                                  np.zeros(MAX_ROWS + 1, np.int64).tobytes()),
                                                 ("obs", "FP32", [MAX_ROWS + 1, 6],
                                                  np.zeros((MAX_ROWS + 1, 6), np.float32).tobytes())]),
         413, "over the limit"),
        ("state with session", _binary_request([a0, obs, ("state", "FP32", [1, spec.hidden],
                                                          f32([0] * spec.hidden))], params={"session_id": "s"}),
         400, "not both"),
        ("unknown parameter", _binary_request([a0, obs], params={"determinstic": False}), 400,
         "unknown request parameters"),
        ("Triton sequence parameters", _binary_request([a0, obs], params={"sequence_id": 3}), 400,
         "send the string parameter 'session_id'"),
        ("agent_id [1, N] of mixed lengths", _binary_request([("agent_id", "BYTES", [1, 3],
                                                                _ids(b"a", b"bb", b"agent_0")), obs]), 400,
         "input 'agent_id' must be 1-D [B], not shape [1, 3]"),
        ("obs 3-D", _binary_request([a0, ("obs", "FP32", [1, 6, 1], ok_obs)]), 400, "input 'obs' must be 2-D"),
        ("obs of more elements than any request needs", _binary_request([a0, ("obs", "FP32", [1, 10**6], ok_obs)]),
         400, "elements"),
        ("deterministic not bool", _binary_request([a0, obs], params={"deterministic": "no"}), 400,
         "true or false"),
        ("seed not int", _binary_request([a0, obs], params={"seed": 1.5}), 400, "integer"),
        ("unknown output", _binary_request([a0, obs], outputs=[{"name": "logits"}]), 400, "unknown output"),
        ("session id too long", _binary_request([a0, obs], params={"session_id": "x" * 200}), 400, "session_id"),
        ("malformed JSON header", (b"{not json", {}), 400, "malformed JSON"),
        ("JSON data of strings", (json.dumps({"inputs": [
            {"name": "agent_id", "datatype": "BYTES", "shape": [1], "data": ["agent_0"]},
            {"name": "obs", "datatype": "FP32", "shape": [1, 6], "data": ["a"] * 6}]}).encode(), {}), 400,
         "string values"),
        ("JSON data of the wrong size", (json.dumps({"inputs": [
            {"name": "agent_id", "datatype": "BYTES", "shape": [1], "data": ["agent_0"]},
            {"name": "obs", "datatype": "FP32", "shape": [1, 6], "data": [0.0] * 5}]}).encode(), {}), 400,
         "5 elements"),
        ("JSON 1e39 overflows float32", (json.dumps({"inputs": [
            {"name": "agent_id", "datatype": "BYTES", "shape": [1], "data": ["agent_0"]},
            {"name": "obs", "datatype": "FP32", "shape": [1, 6], "data": [1e39] + [0.0] * 5}]}).encode(), {}),
         400, "float32"),
        ("body over the byte limit", _binary_request([a0, ("obs", "FP32", [1, 6], ok_obs + b"\0" * 300_000)]),
         413, "limit"),
    ]


def test_bad_input_is_rejected_and_changes_nothing(srv):
    spec = srv.spec
    ids, obs, _, _ = sample(spec, 3, 9)
    ids = spec.agent_ids
    obs = obs * (np.arange(spec.obs_max) < np.array([spec.agent(a).obs_dim for a in ids])[:, None])
    first = triton_infer(srv, ids, obs, params={"session_id": "bad-ep"})
    agents = requests.get(srv.url + "/v1/agents").json()
    for name, (body, headers), status, msg in _bad_requests(spec):
        r = requests.post(srv.url + INFER, data=body, headers=headers, timeout=30)
        assert r.status_code == status and msg in r.json()["error"], (name, r.status_code, r.text)
        # a bad request naming the session never advances it
        hl = headers.get(HEADER, "")
        ok_hl = hl.isascii() and hl.isdigit() and int(hl) <= len(body)
        head = json.loads(body[:int(hl)]) if ok_hl else None
        if head is not None and "parameters" not in head:
            head["parameters"] = {"session_id": "bad-ep"}
            j = json.dumps(head).encode()
            r = requests.post(srv.url + INFER, data=j + body[int(hl):], headers={**headers, HEADER: str(len(j))})
            assert 400 <= r.status_code < 500, (name, r.text)
    assert requests.post(srv.url + f"/v2/models/{MODEL}/versions/2/infer", data=b"{}").status_code == 404
    assert requests.get(srv.url + INFER).status_code == 405
    # nothing changed: same adapters, the session continues from its first step, the server answers
    assert requests.get(srv.url + "/v1/agents").json() == agents
    second = triton_infer(srv, ids, obs, params={"session_id": "bad-ep"})
    assert_equal(second, engine_out(srv, ids, obs, first.as_numpy("state_out")))
    assert requests.get(srv.url + "/readyz").status_code == 200


def test_bad_requests_never_fail_good_ones_batched_with_them(srv):
    spec, bad = srv.spec, _bad_requests(srv.spec)
    results, errors = [], []

    def client(k):
        try:
            with requests.Session() as s:
                for j in range(6):
                    if (k + j) % 2:
                        _, (body, headers), status, _ = bad[(k * 6 + j) % len(bad)]
                        results.append(("bad", status, s.post(srv.url + INFER, data=body, headers=headers)))
                    else:
                        ids, obs, state, reset = sample(spec, 1 + (k + j) % 7, 100 * k + j)
                        body, hlen = encode({"parameters": {"binary_data_output": True}}, "inputs", [
                            ("agent_id", "BYTES", np.array([a.encode() for a in ids], object), True),
                            ("obs", "FP32", obs, True), ("state", "FP32", state, True),
                            ("reset", "BOOL", reset, True)])
                        r = s.post(srv.url + INFER, data=body, headers={HEADER: str(hlen)})
                        results.append(((ids, obs, state, reset), 200, r))
        except Exception as e:  # surfaced by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and len(results) == 48
    for inputs, status, r in results:
        assert r.status_code == status, r.text
        if inputs != "bad":
            res = th.InferResult.from_response_body(r.content, header_length=int(r.headers[HEADER]))
            assert_equal(res, engine_out(srv, *inputs))


def test_docs_json_describes_every_v1_and_v2_route(srv):
    from services.config import ServiceConfig
    from services.http import build_app
    from services.oip import build_oip_app
    from openapi_spec_validator import validate
    doc = requests.get(srv.url + "/docs.json").json()
    assert doc["openapi"].startswith("3.") and doc["info"]["title"]
    validate(doc)  # the whole served document is valid OpenAPI 3
    for prefix, app in (("/v1", build_app(ServiceConfig(), None)), ("/v2", build_oip_app(ServiceConfig(), None))):
        for route in app.routes:
            path = (prefix + route.path).rstrip("/")
            ops = doc["paths"].get(path)
            assert ops is not None, f"{path} is not in /docs.json"
            for method in route.methods - {"HEAD"}:
                op = ops[method.lower()]
                assert op["responses"]["200"]["content"], (path, method)
    assert "/livez" in doc["paths"]  # BentoML's own routes are kept
    infer = doc["paths"]["/v2/models/{model}/infer"]["post"]
    assert set(infer["requestBody"]["content"]) == {"application/json", "application/octet-stream"}
    # every $ref resolves, every path parameter is declared
    text = json.dumps(doc)
    for ref in {r for r in _refs(doc)}:
        assert ref.startswith("#/components/schemas/") and ref.split("/")[-1] in doc["components"]["schemas"], ref
    for path, ops in doc["paths"].items():
        for op in ops.values():
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == {seg[1:-1] for seg in path.split("/") if seg.startswith("{")}, path
    assert "Inference-Header-Content-Length" in text


def _refs(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref":
                yield v
            else:
                yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)
