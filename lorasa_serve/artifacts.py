"""Policy directory I/O: policy.json, backbone.safetensors, adapters/<agent_id>.safetensors.

safetensors and JSON only. Every load validates and raises a typed `ArtifactError` naming the file:
corrupt/truncated files, unknown format versions, missing or extra keys, wrong shapes or dtypes,
rank/alpha mismatches, adapters trained on another backbone, NaN/inf.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import struct
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from .errors import (CorruptFileError, DigestMismatchError, FingerprintMismatchError, FormatVersionError,
                     KeyMismatchError, NonFiniteError, NotRegularFileError, RankAlphaMismatchError,
                     ShapeMismatchError)
from . import strict_json
from .adapter_layout import adapter_shapes
from .files import read_file
from .spec import FORMAT_VERSION, PolicySpec, check_agent_id

SPEC_FILE = "policy.json"
BACKBONE_FILE = "backbone.safetensors"
ADAPTER_DIR = "adapters"
DIGESTS_FILE = "digests.json"  # {"format_version": 1, "sha256": {"adapters/<agent>.safetensors": hex}}
MAX_HEADER_BYTES = 1 << 20  # our headers are a few KB; refuse anything absurd before parsing
MAX_JSON_BYTES = 1 << 20  # policy.json, digests.json: a few KB
FLOAT_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
ALL_DTYPES = {**FLOAT_DTYPES, "I8": 1, "U8": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4,
              "I64": 8, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


# --- fingerprints ------------------------------------------------------------------------------
def fingerprint(tensors: dict[str, Tensor]) -> str:
    """sha256 over sorted tensor names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# --- raw safetensors with a header check before any allocation ----------------------------------
def read_safetensors(data: bytes, source: str) -> tuple[dict[str, str], dict[str, Tensor]]:
    """Parse and check a safetensors buffer -> (metadata, float32-or-native tensors).
    Raises only CorruptFileError for anything malformed, whatever the bytes."""
    header = _check_header(data, source)
    try:
        tensors = st_load(data)
    except Exception as e:  # SafetensorError, or a dtype torch cannot hold (TypeError, ...)
        raise CorruptFileError(source, f"not a valid safetensors file: {type(e).__name__}: "
                                       f"{str(e)[:200]}") from None
    return dict(header.get("__metadata__") or {}), tensors


def _short(x: object) -> str:
    """repr of file content for an error message, cut to 64 characters."""
    r = repr(x)
    return r if len(r) <= 64 else f"{r[:64]}... ({len(r)} characters)"


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_header(data: bytes, source: str) -> dict:
    """The JSON header: an object of {name: {dtype, shape, data_offsets}} (+ __metadata__ of strings)
    whose tensors fit the byte buffer exactly, in order, without overlaps or gaps."""
    if len(data) < 8:
        raise CorruptFileError(source, f"not a safetensors file ({len(data)} bytes, truncated?)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES or 8 + n > len(data):
        raise CorruptFileError(source, f"header length {n} does not fit the file "
                                       f"({len(data)} bytes): truncated or not safetensors")
    try:
        header = strict_json.loads(data[8:8 + n])
    except (ValueError, RecursionError) as e:  # not UTF-8/JSON, duplicate keys, too deep, huge ints
        raise CorruptFileError(source, f"header is not valid JSON ({type(e).__name__}): "
                                       "not a safetensors file") from None
    if not isinstance(header, dict):
        raise CorruptFileError(source, "header is not a JSON object")
    body = len(data) - 8 - n
    spans = []
    for key, info in header.items():
        if key == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise CorruptFileError(source, "__metadata__ must map strings to strings")
            continue
        spans.append(_check_entry(key, info, body, source))
    spans.sort()
    for (b0, e0, k0), (b1, _, k1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CorruptFileError(source, f"tensors {_short(k0)} and {_short(k1)} overlap")
    return header


def _check_entry(key: str, info: object, body: int, source: str) -> tuple[int, int, str]:
    """One tensor entry -> (begin, end, key), or CorruptFileError."""
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise CorruptFileError(source, f"tensor {_short(key)}: header entry must be exactly "
                                       "{dtype, shape, data_offsets}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in ALL_DTYPES:
        raise CorruptFileError(source, f"tensor {_short(key)}: unknown dtype {_short(dtype)}")
    if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
        raise CorruptFileError(source, f"tensor {_short(key)}: shape must be a list of integers >= 0")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise CorruptFileError(source, f"tensor {_short(key)}: data_offsets must be [begin, end] integers")
    begin, end = offsets
    size = ALL_DTYPES[dtype] * math.prod(shape)
    if not (0 <= begin <= end <= body) or end - begin != size:
        raise CorruptFileError(source, f"tensor {_short(key)}: declared {dtype}{_short(shape)} does not "
                                       f"match its {end - begin} bytes / file size (truncated?)")
    return begin, end, key


def max_file_bytes(shapes: dict[str, tuple[int, ...]]) -> int:
    """The largest a valid safetensors file of these tensors can be (F64, the widest float we read,
    plus the largest header we accept): anything bigger is refused from `stat`, before reading."""
    return 8 + MAX_HEADER_BYTES + 8 * sum(math.prod(s) for s in shapes.values())


def _read_file(path: Path, max_bytes: int) -> bytes:
    """Every artifact read goes through here: regular files only, size from stat first (files.py)."""
    return read_file(path, max_bytes)


def _check_tensors(tensors: dict[str, Tensor], expected: dict[str, tuple[int, ...]],
                   source: str) -> dict[str, Tensor]:
    """Keys exactly `expected`, shapes equal, floating dtype, finite -> float32 copies."""
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise KeyMismatchError(source, f"missing tensors {missing}, unexpected tensors "
                                       f"{_short(extra[:5])}{' ...' if len(extra) > 5 else ''}")
    out = {}
    for name, shape in expected.items():
        t = tensors[name]
        if not t.is_floating_point():
            raise ShapeMismatchError(source, f"tensor {name!r} has dtype {t.dtype}, expected a float")
        if tuple(t.shape) != tuple(shape):
            raise ShapeMismatchError(source, f"tensor {name!r} has shape {list(t.shape)}, "
                                             f"expected {list(shape)}")
        t = t.to(torch.float32)
        if not bool(torch.isfinite(t).all()):
            raise NonFiniteError(source, f"tensor {name!r} contains NaN or inf")
        out[name] = t
    return out


def _check_version(meta: dict[str, str], source: str) -> None:
    v = meta.get("format_version")
    if v != str(FORMAT_VERSION):
        raise FormatVersionError(source, f"format_version {_short(v)} is not supported "
                                         f"(this runtime reads {FORMAT_VERSION})")


# --- backbone ----------------------------------------------------------------------------------
def save_backbone(path: str | Path, spec: PolicySpec, tensors: dict[str, Tensor]) -> str:
    """Write backbone.safetensors; returns its fingerprint (also stored in the metadata)."""
    tensors = _check_tensors(tensors, spec.backbone_shapes(), str(path))
    fp = fingerprint(tensors)
    meta = {"format_version": str(FORMAT_VERSION), "fingerprint": fp,
            "spec": replace(spec, backbone_fingerprint=fp).to_json()}
    atomic_write(Path(path), st_save(tensors, metadata=meta))
    return fp


def load_backbone(path: str | Path, spec: PolicySpec) -> dict[str, Tensor]:
    path = Path(path)
    meta, tensors = read_safetensors(_read_file(path, max_file_bytes(spec.backbone_shapes())), str(path))
    _check_version(meta, str(path))
    tensors = _check_tensors(tensors, spec.backbone_shapes(), str(path))
    fp = fingerprint(tensors)
    if spec.backbone_fingerprint and fp != spec.backbone_fingerprint:
        raise FingerprintMismatchError(path, f"backbone fingerprint {fp[:12]} does not match the "
                                             f"spec's {spec.backbone_fingerprint[:12]}")
    return tensors


# --- adapters ----------------------------------------------------------------------------------
def adapter_bytes(spec: PolicySpec, agent_id: str, tensors: dict[str, Tensor]) -> bytes:
    """Serialise one agent's adapter (validated against the spec)."""
    check_agent_id(agent_id)
    tensors = _check_tensors(tensors, adapter_shapes(spec), f"adapter {agent_id!r}")
    meta = {"format_version": str(FORMAT_VERSION), "agent_id": agent_id,
            "rank": str(spec.lora.rank), "alpha": repr(float(spec.lora.alpha)),
            "layers": json.dumps(spec.adapted_layers),
            "backbone_fingerprint": spec.backbone_fingerprint}
    return st_save(tensors, metadata=meta)


def save_adapter(path: str | Path, spec: PolicySpec, agent_id: str,
                 tensors: dict[str, Tensor]) -> None:
    atomic_write(Path(path), adapter_bytes(spec, agent_id, tensors))


def parse_adapter(data: bytes, spec: PolicySpec, source: str,
                  agent_id: str | None = None) -> tuple[str, dict[str, Tensor]]:
    """Validate adapter bytes against `spec` -> (agent_id, float32 tensors)."""
    meta, tensors = read_safetensors(data, source)
    _check_version(meta, source)
    file_agent = meta.get("agent_id")
    if agent_id is not None and file_agent is not None and file_agent != agent_id:
        raise KeyMismatchError(source, f"adapter is for agent {_short(file_agent)}, not {_short(agent_id)}")
    agent_id = agent_id or file_agent
    if not agent_id:
        raise KeyMismatchError(source, "adapter metadata names no agent_id")
    try:
        rank, alpha = int(meta["rank"]), float(meta["alpha"])
    except (KeyError, ValueError):
        raise CorruptFileError(source, "adapter metadata needs numeric 'rank' and 'alpha'") from None
    if not math.isfinite(alpha):
        raise CorruptFileError(source, f"adapter alpha {_short(meta['alpha'])} is not a finite number")
    if rank != spec.lora.rank or not math.isclose(alpha, spec.lora.alpha, rel_tol=1e-9):
        raise RankAlphaMismatchError(source, f"adapter rank={rank} alpha={alpha}, policy expects "
                                             f"rank={spec.lora.rank} alpha={spec.lora.alpha}")
    fp = meta.get("backbone_fingerprint", "")
    if fp != spec.backbone_fingerprint:
        raise FingerprintMismatchError(source, f"adapter was trained against backbone {fp[:12]!r}, "
                                               f"this policy's is {spec.backbone_fingerprint[:12]!r}")
    return agent_id, _check_tensors(tensors, adapter_shapes(spec), source)


def load_adapter(path: str | Path, spec: PolicySpec,
                 agent_id: str | None = None) -> tuple[str, dict[str, Tensor]]:
    path = Path(path)
    return parse_adapter(_read_file(path, max_file_bytes(adapter_shapes(spec))), spec, str(path), agent_id)


# --- whole directory ---------------------------------------------------------------------------
def save_policy(directory: str | Path, spec: PolicySpec, backbone: dict[str, Tensor],
                adapters: dict[str, dict[str, Tensor]] | None = None) -> PolicySpec:
    """Write a policy directory; returns the spec with its backbone fingerprint set."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    fp = save_backbone(d / BACKBONE_FILE, spec, backbone)
    spec = replace(spec, backbone_fingerprint=fp)
    atomic_write(d / SPEC_FILE, spec.to_json().encode())
    digests = {}
    for agent_id, tensors in (adapters or {}).items():
        spec.agent(agent_id)  # KeyError for an agent the spec does not list
        (d / ADAPTER_DIR).mkdir(exist_ok=True)
        data = adapter_bytes(spec, agent_id, tensors)
        atomic_write(d / ADAPTER_DIR / f"{agent_id}.safetensors", data)
        digests[f"{ADAPTER_DIR}/{agent_id}.safetensors"] = hashlib.sha256(data).hexdigest()
    if digests:
        atomic_write(d / DIGESTS_FILE, json.dumps({"format_version": FORMAT_VERSION, "sha256": digests},
                                                  indent=1, sort_keys=True).encode())
    else:
        (d / DIGESTS_FILE).unlink(missing_ok=True)  # a stale one would name adapters not written now
    return spec


def load_policy(directory: str | Path) -> tuple[PolicySpec, dict[str, Tensor],
                                                  dict[str, dict[str, Tensor]]]:
    """-> (spec, backbone, adapters). A directory without adapters is a plain (PS/merged) policy;
    one with adapters must have exactly one per agent of the spec."""
    d = Path(directory)
    if not d.is_dir():
        raise NotRegularFileError(d, "no such directory: pass a policy directory (policy.json, "
                                     "backbone.safetensors, adapters/)")
    if not (d / SPEC_FILE).is_file():
        raise CorruptFileError(d / SPEC_FILE, "missing: not a policy directory")
    spec = PolicySpec.load(d / SPEC_FILE)
    backbone = load_backbone(d / BACKBONE_FILE, spec)
    digests = load_digests(d)
    files = _adapter_files(d)
    adapters: dict[str, dict[str, Tensor]] = {}
    for f in files:
        if f.stem not in spec.agent_ids:
            raise KeyMismatchError(f, f"adapter for agent {f.stem!r}, which policy.json does not list")
        data = _read_file(f, max_file_bytes(adapter_shapes(spec)))
        agent_id, tensors = parse_adapter(data, spec, str(f), f.stem)
        if digests is not None:  # None: a policy directory from before digests.json (validated only)
            _check_digest(f, data, digests.pop(f"{ADAPTER_DIR}/{f.name}", None))
        adapters[agent_id] = tensors
    if files and len(adapters) != len(spec.agents):
        missing = [a for a in spec.agent_ids if a not in adapters]
        raise KeyMismatchError(d / ADAPTER_DIR, f"no adapter file for agents {missing}")
    if digests:
        raise NotRegularFileError(d / sorted(digests)[0], f"missing, but {DIGESTS_FILE} lists it")
    return spec, backbone, adapters


def _adapter_files(d: Path) -> list[Path]:
    """adapters/*.safetensors; no `adapters` at all is a plain policy, but one that is there and is
    not a directory (a dangling or looping symlink, a file) is an error, never the bare backbone."""
    a = d / ADAPTER_DIR
    if not os.path.lexists(a):
        return []
    if not a.is_dir():
        kind = "a dangling or looping symlink" if a.is_symlink() else "not a directory"
        raise NotRegularFileError(a, f"{kind}: the adapters cannot be read (remove it for a plain policy)")
    return sorted(a.glob("*.safetensors"))


def load_digests(d: Path) -> dict[str, str] | None:
    """digests.json -> {relative path: sha256}, or None for a policy written before digests."""
    path = d / DIGESTS_FILE
    if not os.path.lexists(path):
        return None
    try:
        doc = strict_json.loads(_read_file(path, MAX_JSON_BYTES))
    except (ValueError, RecursionError) as e:  # not UTF-8 / JSON, duplicate keys, too deep
        raise CorruptFileError(path, f"not valid JSON ({type(e).__name__})") from None
    if not isinstance(doc, dict) or doc.get("format_version") != FORMAT_VERSION:
        raise FormatVersionError(path, f"must be an object with format_version {FORMAT_VERSION}")
    sums = doc.get("sha256")
    if not isinstance(sums, dict) or not all(isinstance(k, str) and isinstance(v, str) and len(v) == 64
                                             for k, v in sums.items()):
        raise CorruptFileError(path, "'sha256' must map file names to 64-character hex digests")
    return dict(sums)


def _check_digest(path: Path, data: bytes, want: str | None) -> None:
    if want is None:
        raise DigestMismatchError(path, f"not listed in {DIGESTS_FILE}: an adapter added by hand?")
    got = hashlib.sha256(data).hexdigest()
    if got != want.lower():
        raise DigestMismatchError(path, f"sha256 {got[:12]} differs from the {want[:12]} recorded in "
                                        f"{DIGESTS_FILE}: the file was modified or corrupted")


@functools.cache
def umask() -> int:
    """The process umask, read once, on first use: from /proc/self/status (Linux; reading it changes
    nothing), else by setting and restoring it (the only portable way, briefly process-wide)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The permissions a new file (0666) or directory (0777) gets under the umask: what a file written
    through a private temp file (mkstemp 0600, mkdtemp 0700) is given before it is published."""
    return (0o777 if directory else 0o666) & ~umask()


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temp file in the same directory, then rename: readers never see half a file.
    The file gets the usual permissions (0666 less the umask), not mkstemp's private 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
