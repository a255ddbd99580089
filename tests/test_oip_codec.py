"""The OIP tensor codec and the shared array validator, checked against slow obvious references
(no server): binary and JSON round trips, BYTES splitting (vectorised and looped), the padding and
avail rules of `check_act` row by row, and /v1's parse_act going through the same validator."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from conftest import make_policy, require_extra

require_extra("serve", "starlette")
from lorasa_serve.oip_codec import TensorError, decode_body, encode, encode_parts  # noqa: E402
from lorasa_serve.protocol import AgentTable, check_act  # noqa: E402
from services.oip import parse_infer  # noqa: E402
from services.schema import BadRequest, parse_act  # noqa: E402


def reference_bytes(elems: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elems)


@pytest.mark.parametrize("binary", [False, True])
def test_round_trip_every_datatype(binary):
    g = np.random.default_rng(0)
    tensors = [("f32", "FP32", g.standard_normal((3, 4)).astype(np.float32), binary),
               ("f64", "FP64", g.standard_normal(5), binary),
               ("i64", "INT64", g.integers(-2**40, 2**40, (2, 3)), binary),
               ("i32", "INT32", g.integers(-9, 9, 4).astype(np.int32), binary),
               ("b", "BOOL", g.random((2, 2)) < 0.5, binary),
               ("s", "BYTES", np.array([b"agent_0", b"a", "\u00e9t\u00e9".encode()], object), binary),
               ("empty", "FP32", np.zeros((0, 3), np.float32), binary)]
    body, hlen = encode({"id": "x"}, "inputs", tensors)
    assert (hlen is None) == (not binary)
    parts, hlen2 = encode_parts({"id": "x"}, "inputs", tensors)  # zero-copy views where possible
    assert b"".join(parts) == body and hlen2 == hlen
    assert not binary or any(isinstance(p, memoryview) for p in parts)
    msg = decode_body(body, hlen, "inputs")
    assert msg.header["id"] == "x" and list(msg.tensors) == [t[0] for t in tensors]
    for name, dt, arr, _ in tensors:
        got = msg.tensors[name].array
        assert got.shape == arr.shape and msg.tensors[name].datatype == dt
        if dt == "BYTES":
            assert got.tolist() == arr.tolist()
        else:
            np.testing.assert_array_equal(got, arr)
            assert got.dtype == arr.dtype or dt in ("INT32",)


def test_huge_declared_bytes_shape_is_rejected_before_allocating():
    raw = reference_bytes([b"agent_0"])
    head = {"inputs": [{"name": "s", "datatype": "BYTES", "shape": [1, 1 << 39],
                        "parameters": {"binary_data_size": len(raw)}}]}
    j = json.dumps(head).encode()
    with pytest.raises(TensorError, match="cannot hold"):
        decode_body(j + raw, len(j), "inputs")


def test_bytes_split_fast_path_equals_loop():
    same = [f"agent_{i}".encode() for i in range(7)]  # one length: the vectorised split
    mixed = [b"", b"a", b"agent_10", b"\x00\x01", b"zz"]  # the loop
    for elems in (same, mixed, [b""] * 3):
        raw = reference_bytes(elems)
        head = {"inputs": [{"name": "s", "datatype": "BYTES", "shape": [len(elems)],
                            "parameters": {"binary_data_size": len(raw)}}]}
        j = json.dumps(head).encode()
        assert decode_body(j + raw, len(j), "inputs").tensors["s"].array.tolist() == elems


@pytest.mark.parametrize("bad,msg", [
    ({"datatype": "FP32", "shape": [2], "data": [1.0, "x"]}, "string"),
    ({"datatype": "FP32", "shape": [2], "data": [[1.0], [2.0, 3.0]]}, "ragged"),
    ({"datatype": "INT64", "shape": [1], "data": [1.5]}, "floating-point"),
    ({"datatype": "INT64", "shape": [1], "data": [2**70]}, "mixed"),
    ({"datatype": "INT32", "shape": [1], "data": [2**40]}, "INT32 range"),
    ({"datatype": "FP32", "shape": [2], "data": [1.0, 10**400]}, "mixed"),  # an integer too big for a float
    ({"datatype": "BOOL", "shape": [1], "data": [1]}, "integer"),
    ({"datatype": "FP32", "shape": [2, 2], "data": [[1.0, 2.0, 3.0, 4.0]]}, r"shape is \[2, 2\]"),
    ({"datatype": "FP32", "shape": [-1], "data": []}, "non-negative"),
    ({"datatype": "FP32", "shape": [1], "data": [1.0], "extra": 1}, "unknown fields"),
    ({"datatype": "BYTES", "shape": [1], "data": [3]}, "strings"),
    ({"datatype": "FP32", "shape": [1]}, "neither"),
    ({"datatype": "FP32", "shape": [2] * 100_000, "data": []}, "at most 16"),
])
def test_json_tensors_are_strict(bad, msg):
    body = json.dumps({"inputs": [{"name": "t", **bad}]}).encode()
    with pytest.raises(TensorError, match=msg):
        decode_body(body, None, "inputs")


def reference_padding_error(spec, idx, obs):
    """Row by row: the first (row, column) past the agent's obs_dim that is not zero."""
    for i, k in enumerate(idx):
        d = spec.agents[k].obs_dim
        for c in range(d, spec.obs_max):
            if obs[i, c] != 0:
                return i, c
    return None


def test_check_act_padding_and_avail_match_row_by_row_reference(tmp_path):
    spec, _, _ = make_policy(tmp_path / "p", obs=(4, 7, 5), act=(2, 4, 3), action="categorical")
    g = np.random.default_rng(1)
    for trial in range(60):
        n = int(g.integers(1, 12))
        idx = g.integers(0, 3, n)
        obs = g.standard_normal((n, spec.obs_max)).astype(np.float32)
        obs *= np.arange(spec.obs_max) < np.array([spec.agents[k].obs_dim for k in idx])[:, None]
        if trial % 2:
            obs[g.integers(0, n), g.integers(0, spec.obs_max)] = 1.0  # maybe past an obs_dim
        avail = g.random((n, spec.act_max)) < 0.4
        want = reference_padding_error(spec, idx, obs)
        own = np.array([[c < spec.agents[k].act_dim for c in range(spec.act_max)] for k in idx])
        empty = [i for i in range(n) if not (avail[i] & own[i]).any()]
        try:
            req = check_act(AgentTable(spec), idx, obs, avail=avail, max_rows=64)
        except BadRequest as e:
            if want is not None:
                k = idx[want[0]]
                assert e.message == (f"row {want[0]} (agent_{k}, obs_dim {spec.agents[k].obs_dim}): non-zero "
                                     "values past its obs_dim: wrong agent's row?")
            else:
                assert empty and e.message.startswith(f"rows {empty[:10]}: no available action")
            continue
        assert want is None and not empty
        np.testing.assert_array_equal(req.avail, avail & own)
        assert req.agent_ids == [spec.agents[k].agent_id for k in idx]


def test_v1_parse_act_uses_the_shared_checks(tmp_path):
    spec, _, _ = make_policy(tmp_path / "p", obs=(6, 5, 6), act=(2, 3, 2))
    row = {"agent_id": "agent_1", "obs": [0.5] * 5, "state": [0.0] * spec.hidden}
    req = parse_act({"rows": [row]}, spec, 8)
    assert req.obs.shape == (1, 6) and req.obs[0, 5] == 0 and req.state.shape == (1, spec.hidden)
    for bad, msg in [({**row, "obs": [1e39] + [0.0] * 4}, "row 0: obs contains NaN or inf \\(or a value beyond float32"),
                     ({**row, "state": [float("nan")] * spec.hidden}, "row 0: state contains NaN")]:
        with pytest.raises(BadRequest, match=msg):
            parse_act({"rows": [bad]}, spec, 8)
    # the same rows through /v2 give the same ActRequest
    obs = np.zeros((1, 6), np.float32)
    obs[0, :5] = 0.5
    body, hlen = encode({}, "inputs", [("agent_id", "BYTES", np.array([b"agent_1"], object), True),
                                       ("obs", "FP32", obs, True),
                                       ("state", "FP32", np.zeros((1, spec.hidden), np.float32), False)])
    v2 = parse_infer(body, str(hlen), spec, 8).req
    assert v2.agent_ids == req.agent_ids and np.array_equal(v2.obs, req.obs) and np.array_equal(v2.state, req.state)


def test_hostile_shapes_and_sizes_are_refused_before_decoding(tmp_path):
    """The shape checks run before any tensor is decoded: each body's binary data is also malformed
    (sizes that do not add up), so had decode() run, its error ("past the end", "bytes of binary
    data after") would be the answer instead of the shape's."""
    spec, _, _ = make_policy(tmp_path / "p", obs=(6, 5, 6), act=(2, 3, 2))
    mixed = reference_bytes([b"a" * (k % 7) for k in range(20_000)])  # [1, N] BYTES of mixed lengths

    def body(inputs, junk=b"junk"):
        head = {"inputs": [{"name": n, "datatype": d, "shape": s, "parameters": {"binary_data_size": z}}
                           for n, d, s, z in inputs]}
        j = json.dumps(head).encode()
        return j + junk, str(len(j))

    cases = [([("agent_id", "BYTES", [1, 20_000], len(mixed))], "input 'agent_id' must be 1-D"),
             ([("agent_index", "INT64", [2, 1], 16)], "input 'agent_index' must be 1-D"),
             ([("reset", "BOOL", [1, 1], 1)], "input 'reset' must be 1-D"),
             ([("obs", "FP32", [1, 6, 1], 24)], "input 'obs' must be 2-D"),
             ([("state", "FP32", [4], 16)], "input 'state' must be 2-D"),
             ([("avail", "BOOL", [], 1)], "input 'avail' must be 2-D"),
             ([("mask", "BYTES", [20_000], len(mixed))], "unknown inputs ['mask']")]
    for inputs, msg in cases:
        with pytest.raises(BadRequest) as e:
            parse_infer(*body(inputs), spec, 8)
        assert msg in e.value.message and e.value.status == 400, (inputs, e.value.message)
    # more elements than max_rows * max(obs_max, act_max, hidden) in a tensor of the right rank:
    # refused by decode's element count, before its data is read
    limit = 8 * max(spec.obs_max, spec.act_max, spec.hidden)
    with pytest.raises(BadRequest, match=f"more than {limit} elements"):
        parse_infer(*body([("obs", "FP32", [8, limit], 24)]), spec, 8)
    # the limit leaves every legal request alone: the widest input at max_rows decodes
    obs = np.zeros((8, 6), np.float32)
    ok, hlen = encode({}, "inputs", [("agent_index", "INT64", np.zeros(8, np.int64), True),
                                     ("obs", "FP32", obs, True),
                                     ("state", "FP32", np.zeros((8, spec.hidden), np.float32), True)])
    assert parse_infer(ok, str(hlen), spec, 8).req.state.shape == (8, spec.hidden)


def test_triton_request_parameters(tmp_path):
    """tritonclient's timeout/priority hints are accepted and ignored; its sequence parameters are
    refused with a message naming session_id; anything else unknown is still refused."""
    spec, _, _ = make_policy(tmp_path / "p", obs=(6, 5, 6), act=(2, 3, 2))
    tensors = [("agent_index", "INT64", np.zeros(1, np.int64), True),
               ("obs", "FP32", np.zeros((1, 6), np.float32), True)]
    for params in ({"timeout": 1_000_000, "priority": 2}, {"timeout": 0}):
        body, hlen = encode({"parameters": params}, "inputs", tensors)
        assert parse_infer(body, str(hlen), spec, 8).req.agent_ids == ["agent_0"]
    for params, msg in [({"sequence_id": 7, "sequence_start": True}, "'session_id'"),
                        ({"sequence_end": True}, "not supported"),
                        ({"priority": "high"}, "non-negative integer"),
                        ({"timeout": True}, "non-negative integer"),
                        ({"timeout_us": 5}, "unknown request parameters ['timeout_us']")]:
        body, hlen = encode({"parameters": params}, "inputs", tensors)
        with pytest.raises(BadRequest) as e:
            parse_infer(body, str(hlen), spec, 8)
        assert msg in e.value.message and e.value.status == 400, (params, e.value.message)
