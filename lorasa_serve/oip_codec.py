"""Open Inference Protocol (KServe v2) tensors, JSON and binary, as numpy arrays: pure numpy, strict.

Used by the server (services/oip.py) and the client (lorasa_serve/client.py); importing it needs only
numpy. A body is a JSON header, optionally followed by binary tensor data (the binary tensor data
extension): the header's length is in the `Inference-Header-Content-Length` HTTP header, and each
binary tensor says how many bytes it takes in `parameters.binary_data_size`, in order. Fixed-size
datatypes are little-endian, row-major; BOOL is one byte per element; BYTES elements are each a
4-byte little-endian length followed by that many bytes.

Everything malformed raises `TensorError` with a message naming the tensor: unknown datatypes (or
one that is not a string), shapes that are not lists of non-negative ints, data whose size or type
does not match shape and datatype (booleans among numbers, JSON `data` nested other than flat or
exactly like the shape, BYTES strings that are not valid Unicode), binary sizes past the body or not
adding up to it, duplicate names, duplicate keys in a JSON object, a header length of more than
19 digits. Whatever the bytes, decoding raises nothing else.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field

import numpy as np

from . import strict_json

HEADER = "Inference-Header-Content-Length"
MAX_DIMS = 16
MAX_LENGTH_DIGITS = 19  # a header length of more digits is no length any body has (int() of 4,301+ raises)
DTYPES: dict[str, np.dtype | None] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype("u1"), "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"), "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"), "BYTES": None,
}
DATATYPE_OF = {np.dtype(np.bool_): "BOOL", np.dtype(np.int64): "INT64", np.dtype(np.int32): "INT32",
               np.dtype(np.float32): "FP32", np.dtype(np.float64): "FP64", np.dtype(np.uint8): "UINT8"}
# numpy kinds a JSON `data` list may hold for each datatype family
_JSON_KINDS = {"b": "b", "u": "iu", "i": "iu", "f": "iuf"}
_TENSOR_FIELDS = {"name", "shape", "datatype", "parameters", "data"}


class TensorError(ValueError):
    """A malformed OIP message or tensor (the server answers 400)."""


@dataclass
class Tensor:
    name: str
    datatype: str
    array: np.ndarray  # shaped; BYTES: an object array of `bytes`
    parameters: dict = field(default_factory=dict)


@dataclass
class Message:
    """A decoded inference request or response: the JSON header's other fields plus the tensors."""
    header: dict  # the JSON header (tensors' `data` left in place for JSON tensors)
    tensors: dict[str, Tensor]  # "inputs" (requests) or "outputs" (responses) by name, in order


# --- decoding -------------------------------------------------------------------------------------
def split_body(body: bytes, header_length: str | int | None) -> tuple[dict, memoryview]:
    """-> (JSON header, the binary part after it). header_length: the HTTP header's value (or None)."""
    if header_length is None or header_length == "":
        n = len(body)
    else:
        s = str(header_length)
        if not (s.isascii() and s.isdigit() and len(s) <= MAX_LENGTH_DIGITS):
            raise TensorError(f"{HEADER} must be a non-negative integer of at most {MAX_LENGTH_DIGITS} digits, "
                              f"not {s[:40]!r}{f' ({len(s)} characters)' if len(s) > 40 else ''}")
        n = int(s)
        if n > len(body):
            raise TensorError(f"{HEADER} {n} is past the end of the {len(body)}-byte body")
    try:
        head = strict_json.loads(memoryview(body)[:n] if n < len(body) else body)
    except (ValueError, RecursionError) as e:  # not UTF-8 or JSON, a duplicate key, nested too deep
        raise TensorError(f"malformed JSON header: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(head, dict):
        raise TensorError("the JSON header must be an object")
    return head, memoryview(body)[n:]


def decode(head: dict, binary: memoryview, key: str, max_elements: int | None = None) -> Message:
    """Tensors listed under `key` ("inputs" or "outputs"): JSON `data` or binary (in order)."""
    specs = head.get(key)
    if not isinstance(specs, list):
        raise TensorError(f"'{key}' must be a list of tensors")
    tensors: dict[str, Tensor] = {}
    offset = 0
    for i, t in enumerate(specs):
        name, datatype, shape, params = _tensor_header(t, i, key)
        if name in tensors:
            raise TensorError(f"tensor {name!r} appears twice in '{key}'")
        count = math.prod(shape)
        if max_elements is not None and count > max_elements:
            raise TensorError(f"tensor {name!r} of shape {shape} has more than {max_elements} elements")
        size = params.get("binary_data_size")
        if size is None:
            if "data" not in t:
                raise TensorError(f"tensor {name!r} has neither 'data' nor parameters.binary_data_size")
            arr = _from_json(t["data"], datatype, shape, name)
        else:
            if "data" in t:
                raise TensorError(f"tensor {name!r} has both 'data' and binary_data_size")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise TensorError(f"tensor {name!r}: binary_data_size must be a non-negative integer")
            if offset + size > len(binary):
                raise TensorError(f"tensor {name!r}: binary_data_size {size} is past the end of the "
                                  f"binary data ({len(binary) - offset} bytes left)")
            arr = _from_binary(binary[offset:offset + size], datatype, shape, name)
            offset += size
        tensors[name] = Tensor(name, datatype, arr, params)
    if offset != len(binary):
        raise TensorError(f"{len(binary) - offset} bytes of binary data after the last binary tensor")
    return Message(head, tensors)


def decode_body(body: bytes, header_length: str | int | None, key: str) -> Message:
    head, binary = split_body(body, header_length)
    return decode(head, binary, key)


def _tensor_header(t: object, i: int, key: str) -> tuple[str, str, list[int], dict]:
    if not isinstance(t, dict) or not isinstance(t.get("name"), str):
        raise TensorError(f"{key}[{i}] must be an object with a string 'name'")
    name = t["name"]
    extra = sorted(set(t) - _TENSOR_FIELDS)
    if extra:
        raise TensorError(f"tensor {name!r}: unknown fields {extra}")
    datatype = t.get("datatype")
    if not isinstance(datatype, str) or datatype not in DTYPES:
        raise TensorError(f"tensor {name!r}: unknown datatype {datatype!r}; one of {sorted(DTYPES)}")
    shape = t.get("shape")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40 for d in shape):
        raise TensorError(f"tensor {name!r}: shape must be a list of at most {MAX_DIMS} non-negative "
                          "integers")
    params = t.get("parameters", {})
    if not isinstance(params, dict):
        raise TensorError(f"tensor {name!r}: parameters must be an object")
    return name, datatype, shape, params


def _from_binary(buf: memoryview, datatype: str, shape: list[int], name: str) -> np.ndarray:
    count = math.prod(shape)
    if datatype == "BYTES":
        return _bytes_elements(buf, count, name).reshape(shape)
    dt = DTYPES[datatype]
    if len(buf) != count * dt.itemsize:
        raise TensorError(f"tensor {name!r}: {len(buf)} bytes of binary data, but shape {shape} of "
                          f"{datatype} takes {count * dt.itemsize}")
    arr = np.frombuffer(buf, dtype=dt, count=count)  # a read-only view, no copy
    if datatype == "BOOL" and count and int(arr.view(np.uint8).max()) > 1:
        raise TensorError(f"tensor {name!r}: BOOL bytes must be 0 or 1")
    return arr.reshape(shape)


def _bytes_elements(buf: memoryview, count: int, name: str) -> np.ndarray:
    """-> [count] object array of `bytes`. Elements of one length (agent ids) are split without a
    Python loop."""
    if 4 * count > len(buf):  # each element takes at least its 4-byte length
        raise TensorError(f"tensor {name!r}: {len(buf)} bytes cannot hold {count} BYTES elements")
    if count and len(buf) >= 4:
        (n,) = struct.unpack_from("<I", buf, 0)
        if len(buf) == count * (4 + n):
            rec = np.frombuffer(buf, dtype=np.uint8).reshape(count, 4 + n)  # [count, 4 + n]
            if (rec[:, :4].copy().view("<u4") == n).all():
                return np.ascontiguousarray(rec[:, 4:]).view(f"V{n}").reshape(count).astype(object) \
                    if n else np.full(count, b"", dtype=object)
    out = np.empty(count, dtype=object)
    pos, end = 0, len(buf)
    for k in range(count):
        if pos + 4 > end:
            raise TensorError(f"tensor {name!r}: BYTES element {k} has no 4-byte length (data too short)")
        (n,) = struct.unpack_from("<I", buf, pos)
        if pos + 4 + n > end:
            raise TensorError(f"tensor {name!r}: BYTES element {k} of {n} bytes is past the end of its data")
        out[k] = bytes(buf[pos + 4:pos + 4 + n])
        pos += 4 + n
    if pos != end:
        raise TensorError(f"tensor {name!r}: {end - pos} bytes left after {count} BYTES elements")
    return out


_INT_FLOAT = {int, float}


def _from_json(data: object, datatype: str, shape: list[int], name: str) -> np.ndarray:
    """`data`: flat (row-major) or nested exactly like `shape`; element types must fit the datatype
    (no booleans among numbers, no numbers among booleans, BYTES as valid Unicode strings). The type
    checks are one C-level pass (`set(map(type, ...))`), then numpy converts."""
    if not isinstance(data, list):
        raise TensorError(f"tensor {name!r}: 'data' must be a list")
    flat, kinds = _flat_values(data, shape, name)
    if datatype == "BYTES":
        if not kinds <= {str}:
            raise TensorError(f"tensor {name!r}: BYTES data must be strings")
        arr = np.empty(len(flat), dtype=object)
        try:
            arr[:] = [v.encode("utf-8") for v in flat]
        except UnicodeEncodeError:
            raise TensorError(f"tensor {name!r}: BYTES data holds a string that is not valid Unicode "
                              "(a lone surrogate)") from None
        return arr.reshape(shape)
    dt = DTYPES[datatype]
    if dt.kind != "b" and bool in kinds:
        raise TensorError(f"tensor {name!r}: 'data' holds booleans, not {datatype} numbers")
    if dt.kind == "f" and kinds <= _INT_FLOAT:  # the common case: one conversion, straight to dt
        try:
            with np.errstate(over="ignore", invalid="ignore"):
                return np.array(flat, dtype=dt).reshape(shape)  # FP32 overflow: inf (the callers refuse it)
        except (OverflowError, ValueError):  # an integer too big for a float: the general path says so
            pass
    try:
        arr = np.asarray(flat)
    except (ValueError, OverflowError, TypeError):
        raise TensorError(f"tensor {name!r}: 'data' is not numbers") from None
    if arr.size and arr.dtype.kind not in _JSON_KINDS[dt.kind]:
        raise TensorError(f"tensor {name!r}: 'data' holds {_kind_name(arr.dtype)} values, not {datatype}")
    if dt.kind in "iu" and arr.size:
        info = np.iinfo(dt)
        if arr.min() < info.min or arr.max() > info.max:
            raise TensorError(f"tensor {name!r}: values outside the {datatype} range")
    with np.errstate(over="ignore", invalid="ignore"):
        arr = arr.astype(dt)  # FP32 overflow becomes inf (rejected by the callers' finite checks)
    return arr.reshape(shape)


def _flat_values(data: list, shape: list[int], name: str) -> tuple[list, set[type]]:
    """(the row-major values of `data`, the set of their Python types): a flat list of prod(shape)
    values, or lists nested exactly like `shape` (every level of the right length, scalars only at
    the last)."""
    count = math.prod(shape)
    kinds = set(map(type, data))
    if list not in kinds:
        if len(data) != count:
            raise TensorError(f"tensor {name!r}: 'data' has {len(data)} elements, but shape is {shape}")
        return data, kinds
    level = data
    for k, d in enumerate(shape):
        if k == 0:
            ok = len(level) == d
        else:
            ok = all(type(v) is list and len(v) == d for v in level)
            level = [x for v in level for x in v] if ok else level
        if not ok:
            raise TensorError(f"tensor {name!r}: nested 'data' is ragged or unlike its shape at depth {k} "
                              f"(shape is {shape})")
    kinds = set(map(type, level))
    if list in kinds:
        raise TensorError(f"tensor {name!r}: nested 'data' is ragged or deeper than its shape (shape is {shape})")
    return level, kinds


def _kind_name(dt: np.dtype) -> str:
    return {"b": "boolean", "i": "integer", "u": "integer", "f": "floating-point", "U": "string"}.get(
        dt.kind, "mixed")


# --- encoding -------------------------------------------------------------------------------------
def tensor_bytes(arr: np.ndarray, datatype: str) -> bytes:
    """The binary form of one tensor."""
    if datatype == "BYTES":
        parts = []
        for v in arr.reshape(-1):
            b = v.encode("utf-8") if isinstance(v, str) else bytes(v)
            parts += [struct.pack("<I", len(b)), b]
        return b"".join(parts)
    return np.ascontiguousarray(arr, dtype=DTYPES[datatype]).tobytes()


def tensor_json(arr: np.ndarray, datatype: str) -> list:
    """The JSON `data` of one tensor: flat, row-major."""
    return _json_data(arr, datatype).tolist() if datatype != "BYTES" else _json_data(arr, datatype)


def _json_data(arr: np.ndarray, datatype: str) -> list | np.ndarray:
    """tensor_json for encoding: numbers stay a flat array of the datatype's dtype (strict_json.dumps
    writes it without building a Python list)."""
    flat = arr.reshape(-1)
    if datatype == "BYTES":
        return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in flat]
    return np.ascontiguousarray(flat, dtype=DTYPES[datatype])


def encode_parts(head: dict, key: str, tensors: list[tuple[str, str, np.ndarray, bool]]
                 ) -> tuple[list, int | None]:
    """-> (the body as a list of bytes-like parts, header length or None when all JSON).
    tensors: (name, datatype, array, binary). Binary tensors already little-endian, C-contiguous
    and of the datatype's dtype are memoryviews of the arrays (no copy)."""
    specs, chunks = [], []
    for name, datatype, arr, binary in tensors:
        t: dict = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
        if binary:
            dt = DTYPES[datatype]
            b = memoryview(arr).cast("B") if dt is not None and arr.dtype == dt and \
                arr.flags.c_contiguous and arr.size else tensor_bytes(arr, datatype)
            t["parameters"] = {"binary_data_size": len(b)}
            chunks.append(b)
        else:
            t["data"] = _json_data(arr, datatype)
        specs.append(t)
    header = strict_json.dumps({**head, key: specs})
    return [header, *chunks], (len(header) if chunks else None)


def encode(head: dict, key: str, tensors: list[tuple[str, str, np.ndarray, bool]]
           ) -> tuple[bytes, int | None]:
    """-> (body, header length or None when all JSON). tensors: (name, datatype, array, binary)."""
    parts, header_length = encode_parts(head, key, tensors)
    return b"".join(parts), header_length
