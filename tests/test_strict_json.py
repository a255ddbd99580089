"""lorasa_serve.strict_json: the fast parse (orjson plus counting colons) against the obviously right
one (json.loads seeing every key/value pair), on generated values and on texts built to fool it."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorasa_serve import strict_json
from lorasa_serve.strict_json import DuplicateKeyError, dumps, loads, loads_reference

pytest.importorskip("orjson")

KEYS = st.text(alphabet=st.sampled_from('ab:"\\ \u00e9\u2603'), max_size=4)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=6))
VALUES = st.recursive(SCALARS, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                      st.dictionaries(KEYS, kids, max_size=4)), max_leaves=20)


def outcome(f, text):
    """(kind, value): the parsed value, or the error's class for an error."""
    try:
        return "ok", f(text)
    except DuplicateKeyError:
        return "duplicate", None
    except (ValueError, RecursionError):
        return "error", None


def same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return type(a) is type(b) and (a == b if not isinstance(a, (list, dict)) else json.dumps(a) == json.dumps(b))


@settings(max_examples=300, deadline=None)
@given(VALUES, st.sampled_from([None, 0, 2]), st.booleans())
def test_loads_is_the_reference_on_generated_json(value, indent, ascii_only):
    text = json.dumps(value, indent=indent, ensure_ascii=ascii_only).encode()
    assert loads(text) == loads_reference(text) == value


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(KEYS, SCALARS), min_size=2, max_size=5), st.integers(0, 3), st.booleans())
def test_a_repeated_key_is_refused_at_any_depth(pairs, depth, ascii_only):
    """Objects written pair by pair (json.dumps cannot repeat a key): a repeat anywhere is an error."""
    obj = "{" + ",".join(f"{json.dumps(k, ensure_ascii=ascii_only)}:{json.dumps(v, ensure_ascii=ascii_only)}"
                         for k, v in pairs) + "}"
    text = ("[" * depth + '{"x": ' + obj + "}" + "]" * depth).encode()
    has_dup = len({k for k, _ in pairs}) < len(pairs)
    kind, _ = outcome(loads, text)
    assert kind == ("duplicate" if has_dup else "ok")
    assert outcome(loads_reference, text)[0] == kind


@pytest.mark.parametrize("text", [
    b'{"a": 1, "a": 1}', b'{"a": {"b": 1, "b": 2}}', b'[{"a": 1}, {"a": 1, "a": 1}]',
    b'{"a:": 1, "a:": 2}',                       # keys with colons
    b'{"a": "x:y", "a": 2}', b'{"k": ":::", "k": ":"}',
    b'{"\\u0061": 1, "a": 2}',                   # one key written two ways
    b'{"a\\u003a": 1, "a:": 2}',                  # a colon as an escape (colons in the text undercount)
    b'{"a": 1, "b": "\\u003a", "a": 2}',
    b'{"a": NaN, "a": 1}', b'{"a": 1e999, "a": 1}', b'{"a": 123456789012345678901234567890, "a": 1}',
])
def test_crafted_duplicates(text):
    assert outcome(loads, text)[0] == outcome(loads_reference, text)[0] == "duplicate"


@pytest.mark.parametrize("text", [
    b'{"a": NaN}', b'[Infinity, -Infinity]', b'[123456789012345678901234567890]', b'[1e999]',
    b'{"a\\u003a": 1, "b": ":"}', b'"\\ud800"', b'{"\\u0061": 1, "b": 2}', b'\xef\xbb\xbf{}',
    b'{"a": 1} x', b'', b'{"a": 1,}', b"[" * 5000 + b"]" * 5000, "{\"\u00e9:\": \":\u2603\"}".encode(),
    json.dumps({"a": "x\u2028:y"}).encode(), b'{"a": "\xff"}', '{"a": 1}'.encode("utf-16"),
])
def test_odd_texts_answer_as_the_reference(text):
    fast, ref = outcome(loads, text), outcome(loads_reference, text)
    assert fast[0] == ref[0] and same(fast[1], ref[1]), (fast, ref)


def test_str_and_memoryview_inputs():
    assert loads('{"a": [1, 2.5, "é:"]}') == loads(memoryview(b'{"a": [1, 2.5, "\xc3\xa9:"]}')) \
        == {"a": [1, 2.5, "é:"]}
    with pytest.raises(DuplicateKeyError, match="duplicate key 'a'"):
        loads(memoryview(b'{"a": 1, "a": 2}'))


def test_without_orjson_the_reference_answers(monkeypatch):
    monkeypatch.setattr(strict_json, "orjson", None)
    assert loads(b'{"a": [1, 2]}') == {"a": [1, 2]}
    with pytest.raises(DuplicateKeyError):
        loads(b'{"a": 1, "a": 2}')
    assert json.loads(dumps({"x": np.arange(3, dtype=np.int64)})) == {"x": [0, 1, 2]}


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.int32, np.bool_, np.uint8])
def test_dumps_numpy_round_trips(dtype):
    rng = np.random.default_rng(0)
    arr = (rng.standard_normal((5, 7)) * 100).astype(dtype)
    for a in (arr, arr[:, :3], arr.T, arr[0, 0]):  # contiguous, sliced, transposed, a scalar
        back = np.asarray(json.loads(dumps({"a": a}))["a"], dtype=dtype)
        assert back.shape == np.shape(a) and (back == a).all()  # float32: shortest repr, the same float32


def test_dumps_is_compact_json_of_python_values():
    v = {"a": [1, 2.5, None, True, "é"], "b": {"c": []}}
    assert json.loads(dumps(v)) == v and b" " not in dumps(v)
    assert json.loads(dumps({"big": 2 ** 70})) == {"big": 2 ** 70}  # past orjson's 64 bits
