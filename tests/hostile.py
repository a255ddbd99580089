"""Hypothesis strategies for hostile input, shared by the in-process parser tests
(test_hostile_parsers.py) and the real-server tests (test_service_hostile.py)."""
from __future__ import annotations

import json
import struct

from hypothesis import strategies as st

from lorasa_serve.artifacts import ALL_DTYPES

BIG_DEPTH = 100_000  # '[' * BIG_DEPTH: nesting deeper than Python's recursion limit
ANY_CHAR = st.characters(exclude_categories=())  # includes lone surrogates and control characters
EXTREME = [3.4e38, -3.4e38, 3.5e38, 1e39, -1e308, 1e-45, 5e-324, 0.0, -0.0, float("nan"), float("inf"),
           -float("inf"), 2 ** 63, -(2 ** 64), 10 ** 30]
HOSTILE_IDS = ["\ud800", "a\udfff", "a/b", "..", ".", "-a", "a" * 129, "a\x00b", "a\x1f", "é", " a", "a\n",
               "a b", "a%2Fb", "a?b", "a#b", "ep-1" + "\u200b", "x" * 200_000, "", "ok-1", "ok.2:x@y_z"]

json_scalars = (st.none() | st.booleans() | st.integers(min_value=-(2 ** 70), max_value=2 ** 70)
                | st.floats() | st.sampled_from(EXTREME) | st.text(ANY_CHAR, max_size=8))
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=4)
                           | st.dictionaries(st.text(ANY_CHAR, max_size=6), c, max_size=4), max_leaves=12)

session_ids = (st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}", fullmatch=True)
               | st.text(ANY_CHAR, min_size=0, max_size=140) | st.sampled_from(HOSTILE_IDS) | json_values)


def numbers(n_min: int, n_max: int):
    """Mostly well-formed obs/state lists: plain floats, extremes, now and then junk."""
    num = st.floats(-10, 10) | st.sampled_from(EXTREME) | st.integers(-5, 5)
    return st.lists(num, min_size=n_min, max_size=n_max) | json_values


@st.composite
def act_bodies(draw, spec, max_rows: int = 8):
    """A valid /v1/act body for `spec` (a PolicySpec), then 0-3 hostile edits of its parts, or now
    and then any JSON value at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)
    team = draw(st.lists(st.sampled_from(spec.agents), min_size=1, max_size=min(4, max_rows)))
    small = st.floats(-3, 3, width=32)
    rows = [{"agent_id": a.agent_id, "obs": draw(st.lists(small, min_size=a.obs_dim, max_size=a.obs_dim))}
            for a in team]
    body: dict = {"rows": rows}
    if draw(st.booleans()):
        body["deterministic"] = draw(st.booleans())
    if len({a.agent_id for a in team}) == len(team) and draw(st.booleans()):
        body["session_id"] = draw(st.from_regex(r"h[A-Za-z0-9._:@-]{0,20}", fullmatch=True))
    elif spec.recurrent and draw(st.booleans()):
        for r in rows:
            r["state"] = draw(st.lists(small, min_size=spec.hidden, max_size=spec.hidden))
    for _ in range(draw(st.integers(0, 3))):
        dict_rows = [r for r in rows if isinstance(r, dict)]
        if not dict_rows:
            break
        row = draw(st.sampled_from(dict_rows))
        edit = draw(st.sampled_from(["session_id", "deterministic", "unknown", "agent_id", "obs", "state",
                                     "reset", "avail_actions", "row_unknown", "row_junk", "rows"]))
        if edit == "session_id":
            body["session_id"] = draw(session_ids)
        elif edit == "deterministic":
            body["deterministic"] = draw(json_scalars)
        elif edit == "unknown":
            body[draw(st.text(ANY_CHAR, max_size=8))] = draw(json_values)
        elif edit == "agent_id":
            row["agent_id"] = draw(st.sampled_from(spec.agent_ids) | st.text(ANY_CHAR, max_size=10) | json_scalars)
        elif edit in ("obs", "state"):
            obs = row.get("obs")
            n = spec.hidden if edit == "state" else len(obs) if isinstance(obs, list) and obs else spec.obs_max
            row[edit] = draw(numbers(n - 1, n + 1))
        elif edit == "reset":
            row["reset"] = draw(st.booleans() | json_scalars)
        elif edit == "avail_actions":
            row["avail_actions"] = draw(st.lists(st.sampled_from([0, 1, True, 2, 0.5]), max_size=spec.act_max + 1)
                                        | json_values)
        elif edit == "row_unknown":
            row[draw(st.text(ANY_CHAR, max_size=8))] = draw(json_values)
        elif edit == "row_junk":
            rows[rows.index(row)] = draw(json_values)
        else:
            body["rows"] = draw(json_values)
    return body


def encode(body: object) -> bytes:
    """JSON with \\u escapes (so lone surrogates travel as valid JSON); NaN/inf as NaN/Infinity."""
    return json.dumps(body).encode()


def with_duplicate_key(body: dict) -> bytes:
    """The body's JSON text with its first key repeated (a valid JSON text Python would accept)."""
    k, v = next(iter(body.items()))
    inner = json.dumps(body)[1:-1]
    return ("{" + json.dumps(k) + ": " + json.dumps(v) + ", " + inner + "}").encode()


admin_bodies = (st.fixed_dictionaries({}, optional={
    "agent_ids": st.lists(st.sampled_from(["agent_0", "agent_1", "agent_2"]) | st.text(ANY_CHAR, max_size=6),
                          max_size=4) | json_values,
    "agent_idz": json_values}) | json_values)


@st.composite
def safetensors_files(draw):
    """Bytes that look like safetensors: an 8-byte length, a JSON header with hostile entries
    (wrong types, bad dtypes, overlapping or out-of-range offsets, deep nesting...), a body."""
    body_len = draw(st.integers(0, 256))
    offset = st.integers(-4, body_len + 8) | json_scalars
    entry = st.fixed_dictionaries(
        {"dtype": st.sampled_from(sorted(ALL_DTYPES)) | json_scalars,
         "shape": st.lists(st.integers(-1, 8) | json_scalars, max_size=3) | json_scalars,
         "data_offsets": st.lists(offset, min_size=0, max_size=3) | st.tuples(offset, offset).map(list)
         | st.just("ab")},
        optional={"extra": json_scalars})
    header = draw(st.dictionaries(st.text(ANY_CHAR, max_size=12), entry | json_values, max_size=4))
    if draw(st.booleans()):
        header["__metadata__"] = draw(
            st.dictionaries(st.sampled_from(["format_version", "agent_id", "rank", "alpha", "backbone_fingerprint",
                                             "x"]), st.text(ANY_CHAR, max_size=10) | json_scalars, max_size=5))
    raw = draw(st.sampled_from(["json", "nested", "garbage"]))
    text = {"json": lambda: json.dumps(header).encode(),
            "nested": lambda: b"[" * draw(st.integers(900, 20_000)),
            "garbage": lambda: draw(st.binary(max_size=64))}[raw]()
    n = len(text) if draw(st.booleans()) else draw(st.sampled_from([0, 1, len(text) + 1, 1 << 62, 2 ** 64 - 1]))
    return struct.pack("<Q", n) + text + draw(st.binary(min_size=body_len, max_size=body_len))


def _oip_tensor(draw, name: str, datatype: str, arr, binary: bool) -> tuple[dict, bytes]:
    from lorasa_serve.oip_codec import tensor_bytes, tensor_json
    t: dict = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
    if binary:
        raw = tensor_bytes(arr, datatype)
        t["parameters"] = {"binary_data_size": len(raw)}
        return t, raw
    t["data"] = tensor_json(arr, datatype)
    return t, b""


@st.composite
def oip_bodies(draw, spec, max_rows: int = 8):
    """A /v2 infer request for `spec` (a PolicySpec) as (body bytes, headers): valid JSON or binary
    tensors, then 0-3 hostile edits (fields, datatypes as lists/objects, shapes, nesting, booleans
    among floats, lone surrogates, header lengths of any digits, truncation, duplicate keys)."""
    import numpy as np
    team = draw(st.lists(st.sampled_from(spec.agents), min_size=1, max_size=min(4, max_rows)))
    obs = np.zeros((len(team), spec.obs_max), np.float32)
    binary = draw(st.booleans())
    ids = np.asarray([a.agent_id.encode() for a in team], dtype=object)
    parts = [_oip_tensor(draw, "agent_id", "BYTES", ids, binary), _oip_tensor(draw, "obs", "FP32", obs, binary)]
    inputs = [p[0] for p in parts]
    head: dict = {"inputs": inputs}
    if draw(st.booleans()):
        head["parameters"] = {"deterministic": draw(st.booleans())}
    for _ in range(draw(st.integers(0, 3))):
        t = draw(st.sampled_from(inputs))
        edit = draw(st.sampled_from(["datatype", "shape", "name", "field", "data", "nest", "bools", "surrogate",
                                     "params", "top"]))
        if edit == "datatype":
            t["datatype"] = draw(st.sampled_from([["FP32"], {"a": 1}, "BYTES", "FP64", "INT64", "BOOL"])
                                 | json_scalars)
        elif edit == "shape":
            t["shape"] = draw(st.lists(st.integers(-2, 10) | json_scalars, max_size=3) | json_values)
        elif edit == "name":
            t["name"] = draw(st.sampled_from(["state", "reset", "avail", "agent_index", "x"]) | json_scalars)
        elif edit == "field":
            t[draw(st.text(ANY_CHAR, max_size=6))] = draw(json_values)
        elif edit in ("data", "nest", "bools", "surrogate"):
            t.pop("parameters", None)
            n = t["shape"][0] if isinstance(t.get("shape"), list) and t["shape"] and isinstance(t["shape"][0], int) \
                and 0 <= t["shape"][0] <= 8 else 1
            t["data"] = {"data": lambda: draw(json_values),
                         "nest": lambda: [[[draw(st.floats(-1, 1))]] * 2] * n,
                         "bools": lambda: [draw(st.floats(-1, 1) | st.booleans()) for _ in range(n * spec.obs_max)],
                         "surrogate": lambda: ["\ud800" + str(i) for i in range(n)]}[edit]()
        elif edit == "params":
            head["parameters"] = draw(json_values)
        else:
            head[draw(st.sampled_from(["outputs", "id", "inputs", "junk"]))] = draw(json_values)
    header = json.dumps(head).encode()
    if draw(st.integers(0, 5)) == 0:
        header = b"{" + b'"inputs": [], ' + header[1:]  # a duplicate key
    raw = b"".join(p[1] for p in parts) if binary and head.get("inputs") is inputs and all(
        isinstance(t.get("parameters"), dict) for t in inputs) else b""
    body = header + raw
    hlen = str(len(header)) if raw else None
    how = draw(st.sampled_from(["as is"] * 6 + ["digits", "truncate", "flip"]))
    if how == "digits":
        hlen = draw(st.sampled_from(["9" * 5000, "1" * 20, "-1", "0x10", "12 ", "", "\xb2"])
                    | st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e), max_size=8))
    elif how == "truncate":
        body = body[:draw(st.integers(0, len(body)))]
    elif how == "flip" and body:
        i = draw(st.integers(0, len(body) - 1))
        body = body[:i] + bytes([body[i] ^ draw(st.integers(1, 255))]) + body[i + 1:]
    headers = {"Content-Type": "application/octet-stream" if raw else "application/json"}
    if hlen is not None:
        headers["Inference-Header-Content-Length"] = hlen
    return body, headers
