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
