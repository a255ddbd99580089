"""Strict JSON for every reader and writer in lorasa-serve: the one place that parses JSON text.

`loads` is the standard library's JSON (UTF-8 bytes or str) with one rule added: **a duplicate key in
any object is an error** (`DuplicateKeyError`, a `ValueError`), never "the last one wins". It accepts
what `json.loads` accepts except that rule: NaN / Infinity literals parse (the callers' finite checks
reject them with their own message), integers of any size parse (range checks are the callers').

Two implementations, one answer:
- `loads_reference`: `json.loads` with an `object_pairs_hook` that sees every pair: obviously right,
  and slow on big number arrays (~8x orjson on a 1.6 MB OIP body).
- `loads`: orjson when it is installed, else the reference. orjson keeps the last of duplicate keys
  silently, so duplicates are found by counting: every key/value pair in the text is one structural
  `:` (outside strings), and a `:` inside a string stays a literal `:` in the text unless written as a
  `\\u` escape. So with no `\\u` escape in the text, `colons(text) - colons(strings parsed)` is the
  number of pairs the text has, and it equals the number of keys in the parsed objects iff no object
  repeated a key. Texts with a `\\u` escape, NaN / Infinity, or a float of magnitude 2**63 or more
  (orjson reads an integer literal past 64 bits as a float) go to the reference; tests check that both
  give the same answer on generated and hostile inputs.

`dumps` writes compact JSON bytes; numpy arrays and scalars are written as their values (orjson's
numpy support, or `tolist()` on the reference path).
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np

try:  # optional speed-up (the `serve` extra installs it); the answers are the same without it
    import orjson
except ImportError:  # pragma: no cover - exercised by tests that force the reference path
    orjson = None

_SCALARS = (int, float, bool, type(None))
_NUMBERS = {int, float, bool}
_INT_LIMIT = 2.0 ** 63  # orjson: an integer literal past int64 (below) / uint64 (above) becomes a float


class DuplicateKeyError(ValueError):
    """A JSON object holds the same key twice."""


def _unique_pairs(pairs: list[tuple[str, object]]) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise DuplicateKeyError(f"duplicate key {dup[:64]!r} in a JSON object")
    return d


def loads_reference(text: bytes | bytearray | memoryview | str) -> Any:
    """The standard library's parse with duplicate keys refused (ValueError, RecursionError)."""
    if isinstance(text, memoryview):
        text = bytes(text)
    return json.loads(text, object_pairs_hook=_unique_pairs)


def loads(text: bytes | bytearray | memoryview | str) -> Any:
    """JSON -> Python, duplicate keys refused: the same result (or error type) as loads_reference."""
    if orjson is None:
        return loads_reference(text)
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
    if b"\\u" in raw:
        return loads_reference(text)
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return loads_reference(text)  # NaN, big integers, ... or really malformed: the reference says which
    pairs, string_colons, huge = _count(value)
    if huge or raw.count(b":") - string_colons != pairs:
        return loads_reference(text)  # a duplicate key (DuplicateKeyError naming it), or big numbers
    return value


def _count(value: Any) -> tuple[int, int, bool]:
    """(key/value pairs in every object, ':' characters in every string and key, whether a float is
    outside the 64-bit integers: orjson reads such an integer literal as a float) of a parsed value.
    orjson gives exact types (dict, list, str, int, float, bool, None): one `type()` per value."""
    pairs = colons = 0
    huge = False
    stack = [value]
    pop, extend = stack.pop, stack.extend
    while stack:
        v = pop()
        t = type(v)
        if t is dict:
            pairs += len(v)
            for k in v:
                if ":" in k:
                    colons += k.count(":")
            extend(v.values())
        elif t is list:
            kinds = set(map(type, v))  # one pass in C over a big number array
            if kinds <= _NUMBERS:
                if float in kinds:
                    huge = huge or max(v) >= _INT_LIMIT or min(v) <= -_INT_LIMIT  # in C too
                continue
            extend(v)
        elif t is str:
            if ":" in v:
                colons += v.count(":")
        elif t is float:
            huge = huge or abs(v) >= _INT_LIMIT
    return pairs, colons, huge


def _default(obj: Any) -> Any:
    if isinstance(obj, (np.ndarray, np.generic)):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def dumps(value: Any) -> bytes:
    """Compact JSON bytes; numpy arrays (C-contiguous or not) and scalars as their values."""
    if orjson is not None:
        try:
            return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY, default=_default)
        except TypeError:
            pass  # e.g. integers past 64 bits: the reference writes them
    return json.dumps(value, separators=(",", ":"), default=_default).encode()
