"""The v1 request parsers and the adapter upload parser, in-process, against hypothesis-generated
hostile input: they return a fully valid request or raise their one typed error, never anything else
(the HTTP twin of these tests is test_service_hostile.py)."""
from __future__ import annotations

import json
import re
import struct

import numpy as np
import pytest
import torch
from conftest import make_policy, require_extra
from safetensors.torch import save as st_save

from lorasa_serve import init_adapter
from lorasa_serve.adapter_layout import adapter_shapes
from lorasa_serve.artifacts import adapter_bytes, parse_adapter
from lorasa_serve.errors import ArtifactError, CorruptFileError
from lorasa_serve.protocol import check_session_id
from services.schema import ECHO_CHARS, BadRequest, parse_act, parse_admin, parse_json

require_extra("dev", "hypothesis")
from hostile import (HOSTILE_IDS, act_bodies, admin_bodies, encode, safetensors_files,  # noqa: E402
                     session_ids, with_duplicate_key)
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SETTINGS = settings(max_examples=400, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MAX_ROWS = 8
SID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    spec, _, ads = make_policy(tmp_path_factory.mktemp("p") / "policy", obs=(6, 5, 6), act=(2, 3, 2))
    return spec, ads


def _message_is_short(e: BadRequest) -> None:
    assert 400 <= e.status < 500 and "\n" not in e.message and len(e.message) < 400 + 3 * ECHO_CHARS, e.message


def _check_accepted(req, d: dict, spec) -> None:
    """A parsed request holds exactly what the body said, all finite and within the spec."""
    assert req.n == len(d["rows"]) <= MAX_ROWS
    assert req.session_id is None or SID.fullmatch(req.session_id)
    assert np.isfinite(req.obs).all() and req.obs.dtype == np.float32
    for i, row in enumerate(d["rows"]):
        agent = spec.agent(row["agent_id"])
        assert req.agent_ids[i] == agent.agent_id
        np.testing.assert_array_equal(req.obs[i, :agent.obs_dim], np.float32(row["obs"]))
        assert not req.obs[i, agent.obs_dim:].any()
    if req.state is not None:
        assert np.isfinite(req.state).all() and req.session_id is None


@SETTINGS
@given(data=st.data())
def test_act_parser_accepts_only_valid_requests(policy, data):
    spec, _ = policy
    body = data.draw(act_bodies(spec, MAX_ROWS))
    raw = with_duplicate_key(body) if isinstance(body, dict) and body and data.draw(st.booleans()) else encode(body)
    try:
        req = parse_act(parse_json(raw), spec, MAX_ROWS)
    except BadRequest as e:
        _message_is_short(e)
        return
    _check_accepted(req, body, spec)


def test_act_parser_regressions(policy):
    spec, _ = policy
    row = {"agent_id": "agent_0", "obs": [0.1] * 6}
    cases = [
        ({"rows": [row], "session_id": "\ud800"}, "session_id"),
        ({"rows": [row], "session_id": "a/b"}, "session_id"),
        ({"rows": [{**row, "agent_id": "x" * 1_000_000}]}, "(1000000 characters)"),
        ({"rows": [{**row, "y" * 100_000: 1}]}, "unknown fields"),
    ]
    for body, msg in cases:
        with pytest.raises(BadRequest, match=re.escape(msg)) as e:
            parse_act(parse_json(encode(body)), spec, MAX_ROWS)
        _message_is_short(e.value)
    for raw in [b'{"rows": [], "rows": [1]}', b'{"rows": [{"agent_id": "agent_0", "agent_id": "agent_1"}]}']:
        with pytest.raises(BadRequest, match="duplicate key"):
            parse_json(raw)


@SETTINGS
@given(sid=session_ids)
def test_session_id_rule(sid):
    try:
        got = check_session_id(sid)
    except BadRequest as e:
        _message_is_short(e)
        assert not (isinstance(sid, str) and SID.fullmatch(sid))
        return
    assert got is None and sid is None or SID.fullmatch(got) and got == sid


def test_session_id_rule_examples():
    for sid in HOSTILE_IDS:
        ok = sid in ("ok-1", "ok.2:x@y_z")
        if ok:
            assert check_session_id(sid) == sid
        else:
            with pytest.raises(BadRequest):
                check_session_id(sid)
    assert check_session_id("a" * 128) and check_session_id("0") and check_session_id(None) is None


SERVED = ["agent_0", "agent_1", "agent_2"]


def _admin_reference(body: object) -> list[str] | None:
    """Slow and obvious: the agent ids an admin body means, or None if it is invalid."""
    if body == {}:
        return SERVED
    if not isinstance(body, dict) or set(body) != {"agent_ids"}:
        return None
    ids = body["agent_ids"]
    if not isinstance(ids, list) or any(not isinstance(a, str) or a not in SERVED for a in ids):
        return None
    out: list[str] = []
    for a in ids:
        if a not in out:
            out.append(a)
    return out


@SETTINGS
@given(body=admin_bodies)
def test_admin_body_parser_matches_reference(body):
    want = _admin_reference(body)
    try:
        got = parse_admin(encode(body), SERVED)
    except BadRequest as e:
        _message_is_short(e)
        assert want is None, body
        return
    assert got == want


def test_admin_body_examples():
    assert parse_admin(b"", SERVED) == parse_admin(b"  \n", SERVED) == parse_admin(b"{}", SERVED) == SERVED
    assert parse_admin(b'{"agent_ids": ["agent_1"]}', SERVED) == ["agent_1"]
    for raw, msg in [(b'{"agent_idz": ["agent_0"]}', "unknown fields"), (b'["agent_0"]', "JSON object"),
                     (b'{"agent_ids": "agent_0"}', "list"), (b'{"agent_ids": null}', "list"),
                     (b'{"agent_ids": ["nobody"]}', "unknown agent_id"),
                     (b'{"agent_ids": [], "agent_ids": ["agent_0"]}', "duplicate key")]:
        with pytest.raises(BadRequest, match=msg):
            parse_admin(raw, SERVED)


@settings(max_examples=600, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=safetensors_files())
def test_upload_parser_raises_only_artifact_errors(policy, data):
    spec, _ = policy
    try:
        agent, tensors = parse_adapter(data, spec, "upload", "agent_0")
    except ArtifactError as e:
        assert "\n" not in str(e) and len(str(e)) < 600
        return
    assert agent == "agent_0" and {k: tuple(t.shape) for k, t in tensors.items()} == adapter_shapes(spec)


@SETTINGS
@given(data=st.data())
def test_upload_parser_on_mutated_valid_files(policy, data):
    """Byte flips, truncations and splices of a real adapter file."""
    spec, ads = policy
    ok = bytearray(adapter_bytes(spec, "agent_0", ads["agent_0"]))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(ok) - 1))
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if op == "flip":
            ok[i] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del ok[i:i + data.draw(st.integers(1, 16))]
        else:
            ok[i:i] = data.draw(st.binary(min_size=1, max_size=8))
    try:
        parse_adapter(bytes(ok), spec, "upload", "agent_0")
    except ArtifactError:
        pass


def _file(header: object, body: bytes = b"") -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


def test_upload_parser_regressions(policy):
    """The concrete uploads that used to raise TypeError / RecursionError (HTTP 500)."""
    spec, ads = policy
    good = adapter_bytes(spec, "agent_0", ads["agent_0"])
    n = struct.unpack("<Q", good[:8])[0]
    header, body = json.loads(good[8:8 + n]), good[8 + n:]
    name = next(k for k in header if k != "__metadata__")
    entry = header[name]
    other = next(k for k in header if k not in ("__metadata__", name) and header[k]["shape"] == entry["shape"])
    cases = [
        (_file({**header, name: {**entry, "data_offsets": "ab"}}, body), "data_offsets"),
        (_file({**header, name: {**entry, "data_offsets": [True, 8]}}, body), "data_offsets"),
        (_file({**header, name: {**entry, "shape": [1.5, 2]}}, body), "shape"),
        (_file({**header, name: {**entry, "dtype": ["F32"]}}, body), "dtype"),
        (_file({**header, name: {**entry, "dtype": "Q7"}}, body), "dtype"),
        (_file({**header, name: [1, 2]}, body), "header entry"),
        (_file(b"[" * 100_000, body), "not valid JSON"),
        (_file(b'{"a": 1, "a": 2}', body), "not valid JSON"),
        (_file(b"\xff\xfe{}", body), "not valid JSON"),
        (_file({**header, other: {**header[other], "data_offsets": entry["data_offsets"]}}, body), "overlap"),
        (_file(header, body[:-4]), "does not match"),
        (struct.pack("<Q", 2 ** 64 - 1) + b"{}", "header length"),
    ]
    for data, msg in cases:
        with pytest.raises(CorruptFileError, match=msg):
            parse_adapter(data, spec, "upload", "agent_0")
    meta = {**header["__metadata__"], "agent_id": "z" * 100_000}
    with pytest.raises(ArtifactError, match=r"\(100002 characters\)"):
        parse_adapter(_file({**header, "__metadata__": meta}, body), spec, "upload", "agent_0")
    ints = st_save({k: (v * 100).to(torch.int32) for k, v in init_adapter(spec, torch.Generator()).items()},
                   metadata=header["__metadata__"])
    with pytest.raises(ArtifactError, match="dtype"):
        parse_adapter(ints, spec, "upload", "agent_0")
    assert parse_adapter(good, spec, "upload", "agent_0")[0] == "agent_0"
