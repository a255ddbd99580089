"""HTTP service against a real `bentoml serve` (1 worker): equality with the in-process Engine,
adaptive batching, sessions, hot swap, merge, health/metrics, and every kind of bad input."""
from __future__ import annotations

import json
import os
import struct
import threading
import time
import warnings

import numpy as np
import pytest
import requests
import torch
from conftest import make_policy, require_extra
from safetensors.torch import save as st_save

from lorasa_serve import Engine, PolicySpec, init_adapter
from lorasa_serve.artifacts import adapter_bytes, fingerprint
from benchmarks.servers import REPO, ServerProcess

pytestmark = pytest.mark.slow
TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON = {"Content-Type": "application/json"}
MAX_ROWS, MAX_UPLOAD = 64, 64 * 1024


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    root = tmp_path_factory.mktemp("svc")
    spec, backbone, ads = make_policy(root / "policy", obs=(6, 5, 6), act=(2, 3, 2))
    env = {"LORASA_POLICY": str(root / "policy"), "LORASA_ADMIN_TOKEN": TOKEN,
           "LORASA_STATE_DIR": str(root / "state"), "LORASA_MAX_ROWS_PER_REQUEST": str(MAX_ROWS),
           "LORASA_MAX_UPLOAD_BYTES": str(MAX_UPLOAD), "LORASA_MAX_BODY_BYTES": str(256 * 1024),
           "LORASA_ACCESS_LOG": "1"}
    with ServerProcess(env, root / "server.log") as server:
        server.policy, server.spec, server.log = root / "policy", spec, root / "server.log"
        server.engine = Engine.from_dir(root / "policy", device="cpu", mode="lora")
        yield server


def rows_for(spec, ids, obs, state=None, reset=None):
    dims = {a.agent_id: a.obs_dim for a in spec.agents}
    rows = []
    for i, a in enumerate(ids):
        row = {"agent_id": a, "obs": obs[i, :dims[a]].tolist()}
        if state is not None:
            row["state"] = state[i].tolist()
        if reset is not None:
            row["reset"] = bool(reset[i])
        rows.append(row)
    return rows


def act(srv, body, status=200):
    r = requests.post(srv.url + "/v1/act", json=body, timeout=30)
    assert r.status_code == status, r.text
    return r.json()


def expected(srv, ids, obs, state=None, reset=None):
    """In-process engine output, actions sliced per agent like the service returns them."""
    out = srv.engine.act(ids, torch.as_tensor(obs), None if state is None else torch.as_tensor(state),
                         None if reset is None else torch.as_tensor(reset))
    dims = {a.agent_id: a.act_dim for a in srv.spec.agents}
    acts = [out.actions[i, :dims[a]].numpy() for i, a in enumerate(ids)]
    return acts, out.log_probs.numpy(), out.state.numpy()


def assert_matches(resp, exp, with_state=True):
    acts, logp, state = exp
    assert len(resp["actions"]) == len(acts)
    for got, want in zip(resp["actions"], acts):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(resp["log_probs"], logp, atol=1e-4, rtol=0)
    if with_state:
        np.testing.assert_allclose(resp["state"], state, atol=1e-5, rtol=0)


def sample(spec, n, seed):
    g = np.random.default_rng(seed)
    ids = [spec.agent_ids[k] for k in g.integers(0, len(spec.agents), n)]
    obs = np.zeros((n, spec.obs_max), dtype=np.float32)
    for i, a in enumerate(ids):
        obs[i, :spec.agent(a).obs_dim] = g.standard_normal(spec.agent(a).obs_dim)
    return ids, obs


def test_act_matches_in_process_engine(srv):
    spec = srv.spec
    ids, obs = sample(spec, 11, 0)
    state = np.random.default_rng(1).standard_normal((11, spec.hidden)).astype(np.float32)
    reset = np.arange(11) % 3 == 0
    resp = act(srv, {"rows": rows_for(spec, ids, obs, state, reset)})
    assert_matches(resp, expected(srv, ids, obs, state, reset))
    assert resp["versions"] == [srv.engine.versions()[a] for a in ids]
    # a large body (parsed off the event loop) gives the same answer
    padded = json.dumps({"rows": rows_for(spec, ids, obs, state, reset)}) + " " * 100_000
    big = requests.post(srv.url + "/v1/act", data=padded, headers=JSON, timeout=30)
    assert big.status_code == 200 and big.json()["actions"] == resp["actions"]
    # sampled actions differ from the deterministic mean but have the right shapes
    samp = act(srv, {"rows": rows_for(spec, ids, obs), "deterministic": False})
    assert [len(a) for a in samp["actions"]] == [spec.agent(a).act_dim for a in ids]
    assert not np.allclose(samp["actions"][0], resp["actions"][0])


def test_concurrent_requests_are_merged_and_each_answer_is_right(srv):
    spec, results, errors = srv.spec, [], []

    def client(k):
        try:
            with requests.Session() as s:
                for j in range(8):
                    ids, obs = sample(spec, 1 + (k + j) % 5, 100 * k + j)
                    r = s.post(srv.url + "/v1/act", json={"rows": rows_for(spec, ids, obs)}, timeout=30)
                    results.append((ids, obs, r.status_code, r.json()))
        except Exception as e:  # surfaced by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(12)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and len(results) == 96
    for ids, obs, code, resp in results:
        assert code == 200, resp
        assert_matches(resp, expected(srv, ids, obs))
    assert max(resp["batch"]["requests"] for *_, resp in results) > 1, "no request was ever batched"


def _inline_count(srv) -> float:
    text = requests.get(srv.url + "/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("lorasa_inline_requests_total"))


def test_a_lone_client_is_served_by_the_fast_path(srv):
    """One kept-alive client sending small stateless requests one after another: each is served by a
    cycle on the event loop (the counter grows by one per request), and each answer is still right."""
    before = _inline_count(srv)
    with requests.Session() as s:
        for j in range(20):
            ids, obs = sample(srv.spec, 2, 900 + j)
            r = s.post(srv.url + "/v1/act", json={"rows": rows_for(srv.spec, ids, obs)}, timeout=30)
            assert r.status_code == 200, r.text
            assert_matches(r.json(), expected(srv, ids, obs))
    assert _inline_count(srv) - before >= 18  # an idle check of the batcher may take one or two


def test_sessions_carry_state_and_reset(srv):
    spec = srv.spec
    ids = spec.agent_ids
    obs_seq = [sample(spec, 3, 50 + t)[1] for t in range(4)]
    obs_seq = [np.stack([o[i] * (np.arange(spec.obs_max) < spec.agent(a).obs_dim)
                         for i, a in enumerate(ids)]).astype(np.float32) for o in obs_seq]
    state = None
    for t, obs in enumerate(obs_seq):
        resp = act(srv, {"session_id": "ep-1", "rows": rows_for(spec, ids, obs)})
        exp = expected(srv, ids, obs, state)
        assert_matches(resp, exp, with_state=False)
        assert "state" not in resp and resp["session_state"] == ("new" if t == 0 else "resumed")
        state = exp[2]
    # another session is independent; reset forgets ep-1
    fresh = act(srv, {"session_id": "ep-2", "rows": rows_for(spec, ids, obs_seq[0])})
    assert_matches(fresh, expected(srv, ids, obs_seq[0]), with_state=False)
    assert fresh["session_state"] == "new"
    r = requests.post(srv.url + "/v1/sessions/ep-1/reset", timeout=10)
    assert r.status_code == 200 and r.json() == {"session_id": "ep-1", "existed": True}
    again = act(srv, {"session_id": "ep-1", "rows": rows_for(spec, ids, obs_seq[1])})
    assert_matches(again, expected(srv, ids, obs_seq[1]), with_state=False)
    assert again["session_state"] == "new"  # a zero state, and the answer says so
    assert "session_state" not in act(srv, {"rows": rows_for(spec, ids, obs_seq[1])})  # stateless


def test_hot_swap_changes_only_that_agent(srv):
    spec, ids = srv.spec, srv.spec.agent_ids * 2
    _, obs = sample(spec, 6, 7)
    obs = np.stack([obs[i] * (np.arange(spec.obs_max) < spec.agent(a).obs_dim)
                    for i, a in enumerate(ids)]).astype(np.float32)
    before = act(srv, {"rows": rows_for(spec, ids, obs)})
    mid_session = act(srv, {"session_id": "swap", "rows": rows_for(spec, spec.agent_ids, obs[:3])})
    carried = expected(srv, spec.agent_ids, obs[:3])[2]  # session state, computed before the swap
    v0 = srv.engine.versions()["agent_1"]
    new = init_adapter(spec, torch.Generator().manual_seed(11), b_std=0.5)
    r = requests.put(srv.url + "/v1/admin/adapters/agent_1", data=adapter_bytes(spec, "agent_1", new),
                     headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["version"] == r.json()["served_version"] >= 2
    srv.engine.set_adapter("agent_1", new)
    after = act(srv, {"rows": rows_for(spec, ids, obs)})
    assert_matches(after, expected(srv, ids, obs))
    for i, a in enumerate(ids):
        same = np.allclose(after["actions"][i], before["actions"][i], atol=1e-6)
        assert same == (a != "agent_1"), (i, a)
    assert after["versions"] == [r.json()["version"] if a == "agent_1" else 1 for a in ids]
    # the session started before the swap keeps going, agent_1 now on the new adapter
    cont = act(srv, {"session_id": "swap", "rows": rows_for(spec, spec.agent_ids, obs[3:])})
    assert_matches(cont, expected(srv, spec.agent_ids, obs[3:], carried), with_state=False)
    assert mid_session["versions"][1] == v0
    info = requests.get(srv.url + "/v1/agents", timeout=10).json()
    a1 = next(a for a in info["agents"] if a["agent_id"] == "agent_1")
    assert a1["version"] == r.json()["version"]
    assert a1["adapter_fingerprint"] == fingerprint(srv.engine.adapter("agent_1"))
    metrics = requests.get(srv.url + "/metrics", timeout=10).text
    assert f'lorasa_adapter_version{{agent_id="agent_1"}} {float(a1["version"])}' in metrics


def test_merge_and_unmerge_keep_outputs(srv):
    spec = srv.spec
    ids, obs = sample(spec, 9, 21)
    base = act(srv, {"rows": rows_for(spec, ids, obs)})
    r = requests.post(srv.url + "/v1/admin/merge", json={"agent_ids": ["agent_0", "agent_2"]},
                      headers=AUTH, timeout=30)
    assert r.status_code == 200 and r.json()["merged"] == ["agent_0", "agent_2"], r.text
    info = {a["agent_id"]: a["merged"] for a in requests.get(srv.url + "/v1/agents").json()["agents"]}
    assert info["agent_0"] and info["agent_2"]
    assert_matches(act(srv, {"rows": rows_for(spec, ids, obs)}), expected(srv, ids, obs))
    r = requests.post(srv.url + "/v1/admin/unmerge", headers=AUTH, timeout=30)
    assert r.status_code == 200 and r.json()["merged"] == []
    assert_matches(act(srv, {"rows": rows_for(spec, ids, obs)}),
                   (base["actions"], base["log_probs"], base["state"]))
    # right after unmerge nothing is reported pinned; what mode auto merged on its own (the act above,
    # a tiny policy: auto runs merged weights) is told apart
    agents = {a["agent_id"]: a for a in requests.get(srv.url + "/v1/agents").json()["agents"]}
    assert set(ids) == set(agents)  # every agent acted after the unmerge
    assert all(not a["merged"] and a["auto_merged"] for a in agents.values()), agents


def test_health_metrics_and_spec(srv):
    assert requests.get(srv.url + "/livez").status_code == 200
    assert requests.get(srv.url + "/readyz").status_code == 200
    pol = requests.get(srv.url + "/v1/policy").json()
    assert pol["backbone_fingerprint"] == srv.spec.backbone_fingerprint
    assert [a["agent_id"] for a in pol["agents"]] == srv.spec.agent_ids
    act(srv, {"rows": rows_for(srv.spec, ["agent_2"], np.zeros((1, 6), np.float32))})
    text = requests.get(srv.url + "/metrics").text
    assert 'lorasa_agent_rows_total{agent_id="agent_2"}' in text
    assert "lorasa_batch_rows_bucket" in text and "bentoml_service_request_total" in text
    # LORASA_ACCESS_LOG=1 turns BentoML's per-request access lines on (off by default:
    # test_service_hostile.py::test_access_log_is_quiet_by_default)
    time.sleep(0.5)
    log = srv.log.read_text(errors="replace").splitlines()
    assert any("path=/v1/policy," in line and "trace=" in line for line in log)
    # the act routes are left out of BentoML's OpenTelemetry tracing (no trace id) unless LORASA_TRACE_ACT=1
    acts = [line for line in log if "path=/v1/act," in line]
    assert acts and not any("trace=" in line for line in acts)


def _hostile_uploads(spec, good: dict) -> list[tuple[str, bytes, int, str]]:
    ok = adapter_bytes(spec, "agent_0", good)
    meta = json.loads(ok[8:8 + struct.unpack("<Q", ok[:8])[0]])["__metadata__"]
    ints = st_save({k: (v * 100).to(torch.int32) for k, v in good.items()}, metadata=meta)
    nan = {k: v.clone() for k, v in good.items()}
    nan["head.lora_B.weight"][0, 0] = float("nan")
    huge_hdr = json.dumps({"__metadata__": meta, "mlp.0.lora_A.weight": {
        "dtype": "F32", "shape": [1 << 31, 1 << 31], "data_offsets": [0, 16]}}).encode()
    other_spec, _, other = make_policy_other()
    return [
        ("garbage", b"definitely not safetensors", 400, "CorruptFileError"),
        ("truncated", ok[: len(ok) // 2], 400, "CorruptFileError"),
        ("absurd header length", struct.pack("<Q", 1 << 60) + b"{}", 400, "CorruptFileError"),
        ("huge declared shape", struct.pack("<Q", len(huge_hdr)) + huge_hdr + b"\0" * 16, 400,
         "CorruptFileError"),
        ("int32 tensors", ints, 400, "ShapeMismatchError"),
        ("NaN values", st_save({k: v.contiguous() for k, v in nan.items()}, metadata=meta), 400,
         "NonFiniteError"),
        ("other backbone", adapter_bytes(other_spec, "agent_0", other["agent_0"]), 400,
         "FingerprintMismatchError"),
        ("adapter of another agent", adapter_bytes(spec, "agent_2", good), 400, "KeyMismatchError"),
        ("huge finite weights", adapter_bytes(spec, "agent_0", {k: torch.full_like(v, 3e38) for k, v in good.items()}),
         400, "probe batch"),
        ("over the size limit", ok + b"\0" * MAX_UPLOAD, 413, "limit"),
    ]


def make_policy_other():
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        return make_policy(d, obs=(6, 5, 6), act=(2, 3, 2), seed=99)


def test_bad_input_is_rejected_and_changes_nothing(srv):
    spec = srv.spec
    ids, obs = sample(spec, 4, 3)
    good = {"rows": rows_for(spec, ids, obs)}
    ref = act(srv, good)
    versions = requests.get(srv.url + "/v1/agents").json()
    row0 = rows_for(spec, ["agent_0"], obs[:1])[0]
    bad_json = [
        ('{"rows": [', 400, "malformed JSON"),
        ('[1, 2]', 400, "JSON object"),
        ('{"rows": []}', 400, "non-empty"),
        (json.dumps({"rows": [{**row0, "obs": row0["obs"][:-1]}]}), 400,
         "row 0 (agent_0, obs_dim 6): obs has 5 values, fewer than its obs_dim"),
        (json.dumps({"rows": [{**row0, "obs": [1.0] * 7}]}), 400, "row 0: obs has 7 values, more than the policy's "
                                                                  "obs_max 6"),
        ('{"rows": [{"agent_id": "agent_0", "obs": [NaN, 0, 0, 0, 0, 0]}]}', 400, "NaN"),
        ('{"rows": [{"agent_id": "agent_0", "obs": [Infinity, 0, 0, 0, 0, 0]}]}', 400, "NaN or inf"),
        ('{"rows": [{"agent_id": "agent_0", "obs": [1e39, 0, 0, 0, 0, 0]}]}', 400, "float32"),
        ('{"rows": [{"agent_id": "agent_0", "obs": [' + "1" * 400 + ', 0, 0, 0, 0, 0]}]}', 400, "numbers"),
        ('{"rows": [{"agent_id": "agent_0", "obs": [' + "1" * 5000 + ', 0, 0, 0, 0, 0]}]}', 400, "JSON"),
        ("[" * 100_000 + "]" * 100_000, 400, "malformed JSON"),
        (json.dumps({"rows": [{**row0, "obs": ["a"] * 6}]}), 400, "numbers"),
        (json.dumps({"rows": [{**row0, "agent_id": "nobody"}]}), 400, "unknown agent id"),
        (json.dumps({"rows": [row0] * (MAX_ROWS + 1)}), 413, "over the limit"),
        (json.dumps({"rows": [row0], "determinstic": True}), 400, "unknown fields"),
        (json.dumps({"rows": [row0], "deterministic": "yes"}), 400, "true or false"),
        (json.dumps({"rows": [{**row0, "state": [0.0] * 3}]}), 400, "row 0: state has 3 values, expected the "
                                                                    "policy's hidden size 16"),
        (json.dumps({"rows": [{**row0, "state": [0.0] * spec.hidden}], "session_id": "s"}), 400,
         "not both"),
        (json.dumps({"rows": [row0, row0], "session_id": "s"}), 400, "at most once"),
        (json.dumps({"rows": [{**row0, "avail_actions": [1, 0]}]}), 400, "categorical"),
        (json.dumps({"rows": [row0], "session_id": ""}), 400, "session_id"),
        ('{"rows": [{"agent_id": "agent_0", "obs": [' + "0," * 200_000 + '0]}]}', 413, "limit"),
    ]
    r = requests.get(srv.url + "/v1/act")
    assert r.status_code == 405 and "GET /v1/act" in r.json()["error"]
    assert requests.get(srv.url + "/v1/nothing").status_code == 404
    for body, status, msg in bad_json:
        r = requests.post(srv.url + "/v1/act", data=body, headers=JSON, timeout=30)
        assert r.status_code == status and msg in r.json()["error"], (body[:80], r.status_code, r.text)
    good_ad = init_adapter(spec, torch.Generator().manual_seed(2), b_std=0.3)
    url = srv.url + "/v1/admin/adapters/agent_0"
    ok_bytes = adapter_bytes(spec, "agent_0", good_ad)
    assert requests.put(url, data=ok_bytes).status_code == 401
    assert requests.put(url, data=ok_bytes, headers={"Authorization": "Bearer wrong"}).status_code == 403
    assert requests.post(srv.url + "/v1/admin/merge", headers={"Authorization": "Basic x"}).status_code == 401
    r = requests.put(srv.url + "/v1/admin/adapters/nobody", data=ok_bytes, headers=AUTH)
    assert r.status_code == 404 and "unknown agent_id" in r.json()["error"]
    for name, data, status, msg in _hostile_uploads(spec, good_ad):
        r = requests.put(url, data=data, headers=AUTH, timeout=30)
        assert r.status_code == status and msg in r.json()["error"], (name, r.status_code, r.text)
    # nothing changed: same versions, same outputs, and the server still answers
    assert requests.get(srv.url + "/v1/agents").json() == versions
    again = act(srv, good)
    assert_matches(again, (ref["actions"], ref["log_probs"], ref["state"]))
    assert requests.get(srv.url + "/readyz").status_code == 200


def _peft_trained(srv, agent, out, **config):
    """A few PEFT training steps on the shipped module of the served policy -> (PeftModel, saved dir)."""
    from peft import LoraConfig, get_peft_model

    from lorasa_serve.torch_module import ActorModule
    spec = srv.spec
    cfg = {"r": spec.lora.rank, "lora_alpha": spec.lora.alpha, "target_modules": spec.linear_names(), **config}
    model = get_peft_model(ActorModule.from_dir(srv.policy, agent), LoraConfig(**cfg))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    g = torch.Generator().manual_seed(3)
    obs, target = torch.randn(16, spec.obs_max, generator=g), torch.randn(16, spec.act_max, generator=g)
    for _ in range(5):
        loss = ((model(obs).head - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with warnings.catch_warnings():  # PEFT: "could not find a config file in lorasa-backbone:<fp>"
        warnings.simplefilter("ignore", UserWarning)
        model.save_pretrained(out)
    return model.eval(), out


def _multipart(path, config_name="adapter_config"):
    return {config_name: ("adapter_config.json", (path / "adapter_config.json").read_bytes()),
            "adapter_model": ("adapter_model.safetensors", (path / "adapter_model.safetensors").read_bytes())}


def test_peft_trained_adapter_uploads_over_http(srv, tmp_path):
    require_extra("dev", "peft")
    spec, agent = srv.spec, "agent_2"
    model, saved = _peft_trained(srv, agent, tmp_path / "trained")
    url = f"{srv.url}/v1/admin/adapters/{agent}"
    ids, obs = sample(spec, 6, 31)
    before = act(srv, {"rows": rows_for(spec, ids, obs)})
    versions = requests.get(srv.url + "/v1/agents").json()
    # refused, naming the problem, and nothing changes: PEFT's file alone (lora_alpha is only in the
    # config), a part missing or misnamed, another rank, a malformed multipart body
    _, r2 = _peft_trained(srv, agent, tmp_path / "r2", r=2)
    bad = [({"data": (saved / "adapter_model.safetensors").read_bytes()}, 400, "adapter_config.json"),
           ({"files": {"adapter_model": _multipart(saved)["adapter_model"]}}, 400, "multipart parts"),
           ({"files": _multipart(saved, "config")}, 400, "multipart parts"),
           ({"files": _multipart(r2)}, 400, "RankAlphaMismatchError"),
           ({"data": b"--x\r\nnot a part", "headers": {"Content-Type": "multipart/form-data; boundary=x"}}, 400,
            "multipart")]
    for kw, status, words in bad:
        r = requests.put(url, headers={**AUTH, **kw.pop("headers", {})}, timeout=30, **kw)
        assert r.status_code == status and words in r.json()["error"], (words, r.status_code, r.text)
    assert requests.get(srv.url + "/v1/agents").json() == versions
    r = requests.put(url, files=_multipart(saved), headers=AUTH, timeout=30)
    assert r.status_code == 200 and r.json()["served_version"] == r.json()["version"], r.text
    srv.engine.load_adapter(saved, agent)  # the in-process mirror takes the same directory
    after = act(srv, {"rows": rows_for(spec, ids, obs)})
    assert_matches(after, expected(srv, ids, obs))
    rows = [i for i, a in enumerate(ids) if a == agent]
    assert rows
    with torch.no_grad():  # the served actions are PEFT's own outputs
        want = model(torch.as_tensor(obs[rows])).head[:, :spec.agent(agent).act_dim].numpy()
    np.testing.assert_allclose([after["actions"][i] for i in rows], want, atol=1e-5, rtol=0)
    assert not np.allclose([before["actions"][i] for i in rows], want, atol=1e-3)
    assert [after["actions"][i] for i, a in enumerate(ids) if a != agent] == \
        [before["actions"][i] for i, a in enumerate(ids) if a != agent]


def test_bentoml_serve_with_no_arguments_serves_the_shipped_policy(tmp_path):
    shipped = REPO / "policies" / "halfcheetah_2x3"
    spec = PolicySpec.load(shipped / "policy.json")
    env = {k: None for k in os.environ if k.startswith("LORASA_")}
    with ServerProcess(env, tmp_path / "server.log") as server:
        info = requests.get(server.url + "/v1/agents", timeout=10).json()
        assert info["backbone_fingerprint"] == spec.backbone_fingerprint
        assert [a["agent_id"] for a in info["agents"]] == spec.agent_ids
        rows = [{"agent_id": a.agent_id, "obs": [0.1] * a.obs_dim} for a in spec.agents]
        r = requests.post(server.url + "/v1/act", json={"rows": rows}, timeout=30)
        assert r.status_code == 200, r.text
        assert [len(a) for a in r.json()["actions"]] == [a.act_dim for a in spec.agents]
        eng = Engine.from_dir(shipped, device="cpu")
        want = eng.act(spec.agent_ids, torch.tensor([row["obs"] for row in rows]))
        np.testing.assert_allclose(r.json()["actions"], want.actions.numpy(), atol=1e-5, rtol=0)


def test_not_ready_until_loaded_and_admin_disabled_without_token(tmp_path):
    """A server whose policy cannot load stays alive but never ready; admin is 403 with no token."""
    spec, _, _ = make_policy(tmp_path / "broken")
    data = (tmp_path / "broken" / "backbone.safetensors").read_bytes()
    (tmp_path / "broken" / "backbone.safetensors").write_bytes(data[:100])  # truncated
    server = ServerProcess({"LORASA_POLICY": str(tmp_path / "broken"), "LORASA_ADMIN_TOKEN": ""},
                           tmp_path / "server.log").start()
    try:
        deadline, r = time.monotonic() + 60, None
        while time.monotonic() < deadline:  # until the worker has tried (and failed) to load
            try:
                r = requests.get(server.url + "/v1/policy", timeout=2)
                if "backbone.safetensors" in r.json().get("error", ""):
                    break
            except (requests.ConnectionError, requests.Timeout, ValueError):
                pass
            time.sleep(0.1)
        assert r is not None and r.status_code == 503, r and r.text
        assert requests.get(server.url + "/livez").status_code == 200
        assert requests.get(server.url + "/readyz").status_code == 503
        r = requests.post(server.url + "/v1/act", json={"rows": [{"agent_id": "agent_0", "obs": [0] * 6}]})
        assert r.status_code == 503 and "backbone.safetensors" in r.json()["error"]
        r = requests.put(server.url + "/v1/admin/adapters/agent_0", data=b"x", headers=AUTH)
        assert r.status_code == 403 and "disabled" in r.json()["error"]
    finally:
        server.stop()


def _worker_rss_kb(srv) -> int:
    """Resident memory of the server's processes (arbiter and workers), from /proc."""
    from benchmarks.servers import descendants
    total = 0
    for pid in [srv.proc.pid, *descendants(srv.proc.pid)]:
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
    return total


def test_metrics_and_memory_stay_bounded_under_distinct_paths(srv):
    """Every distinct path (session resets, unknown 1 KB paths) used to add label sets to BentoML's
    HTTP metrics: 2,000 + 2,000 took /metrics from 375 KB to 98.5 MB. Labels are route templates
    now: after a warm-up, 1,500 more distinct paths leave /metrics and the server's memory flat."""
    http = requests.Session()

    def burst(tag: str, n: int) -> None:
        for i in range(n):
            assert http.post(f"{srv.url}/v1/sessions/{tag}-{i}/reset", timeout=10).status_code == 200
            r = http.get(f"{srv.url}/{tag}/{i}/" + "x" * 1000, timeout=10)
            assert r.status_code == 404 and r.json()["error"]

    burst("warm", 100)
    size0, rss0 = len(http.get(srv.url + "/metrics", timeout=10).content), _worker_rss_kb(srv)
    burst("many", 750)
    text = http.get(srv.url + "/metrics", timeout=10).text
    size1, rss1 = len(text), _worker_rss_kb(srv)
    assert size1 - size0 < 4096, (size0, size1)  # a leak: ~20 KB per distinct path
    assert rss1 - rss0 < 40 * 1024, (rss0, rss1)  # a leak: ~120 KB per distinct path
    assert 'endpoint="/v1/sessions/{session_id}/reset"' in text and 'endpoint="other"' in text
    assert "many-" not in text and "xxxx" not in text


def test_trailing_slash_is_404_not_a_redirect_from_host(srv):
    for path in ("/v1/act/", "/v1/agents/", "/v2/models/lorasa_policy/", "/metrics/", "/readyz/"):
        r = requests.request("POST" if path == "/v1/act/" else "GET", srv.url + path, allow_redirects=False,
                             headers={"Host": "evil.example"}, timeout=10)
        assert r.status_code == 404, (path, r.status_code, r.headers)
        assert "location" not in r.headers and "evil" not in r.text and r.json()["error"]


def test_env_loop_adapter_over_http_equals_in_process(srv):
    """lorasa_serve.envloop.TeamPolicy on a PolicyClient (state carried per request) gives the
    in-process Engine's actions step for step, clipped to each agent's box."""
    require_extra("mujoco", "gymnasium")  # its Box spaces (gymnasium-robotics brings it)
    from gymnasium import spaces
    from lorasa_serve.client import PolicyClient
    from lorasa_serve.envloop import TeamPolicy
    boxes = {a.agent_id: spaces.Box(-0.5, 0.5, (a.act_dim,)) for a in srv.spec.agents}
    with PolicyClient(srv.url) as client:
        assert client.policy_spec().agent_ids == srv.spec.agent_ids
        remote = TeamPolicy(client, action_spaces=boxes, n_envs=2)
        local = TeamPolicy(srv.engine, action_spaces=boxes, n_envs=2)
        rng = np.random.default_rng(0)
        for t in range(5):
            obs = [{a.agent_id: rng.standard_normal(a.obs_dim) for a in srv.spec.agents} for _ in range(2)]
            if t == 3:
                remote.reset(0), local.reset(0)
            got, want = remote.act(obs), local.act(obs)
            for e in range(2):
                for a, v in want[e].items():
                    np.testing.assert_allclose(got[e][a], v, atol=1e-5)
                    assert np.all(np.abs(v) <= 0.5)
