"""PEFT <-> lorasa-serve: the one home of every name mapping between our tensors and PEFT's.

Needs neither `peft` nor `transformers`: safetensors and JSON only. `lorasa_serve.torch_module.ActorModule`
is the `nn.Module` whose submodule names these mappings use.

Backbone tensor <-> ActorModule state-dict key (`module_key`, `tensor_name`):
    ln_in.*, mlp.<i>.*, gru.x.*, gru.h.*, post.*, head.*, log_std    the same name
    mlp.<i>.ln.*  <->  mlp_ln.<i>.*      (LayerNorms never nest under a Linear's name)
    gru.ln.*      <->  gru_ln.*
    post.ln.*     <->  post_ln.*
Adapter tensor <-> PEFT `adapter_model.safetensors` key (`peft_key`, `adapter_name`):
    <layer>.lora_A.weight  <->  base_model.model.<layer>.lora_A.weight     (lora_B alike)
    log_std_offset         <->  base_model.model.std.offset  (ActorModule's `std` module, which the
                               exported LoraConfig lists in `modules_to_save`: PEFT's own per-adapter
                               trainable tensors, so PEFT loads, trains and saves it as is)
A PEFT adapter directory holds `adapter_config.json` (a LoraConfig) and `adapter_model.safetensors`;
`lora_alpha` lives only in the config, so a bare PEFT file is refused unless the config comes with it.
The config's `base_model_name_or_path` is `lorasa-backbone:<fingerprint>` (ActorModule's `name_or_path`,
which PEFT's save_pretrained copies there): it is checked like our adapters' `backbone_fingerprint`.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save as st_save
from torch import Tensor

from . import artifacts
from .errors import (CorruptFileError, FingerprintMismatchError, KeyMismatchError, PeftFormatError,
                     RankAlphaMismatchError)
from .adapter_layout import LOG_STD_OFFSET, adapter_shapes, lora_a_key, lora_b_key
from .spec import PolicySpec

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
MODEL_FILE = "adapter_model.safetensors"
STD_MODULE = "std"  # ActorModule submodule holding the per-agent log-std offset
OFFSET_KEY = f"{STD_MODULE}.offset"
BASE_MODEL_PREFIX = "lorasa-backbone:"  # not a Hub repo id: PEFT never looks it up online
META_AGENT = "lorasa_agent_id"  # safetensors metadata of our exports (PEFT ignores it)
_NORM_RE = re.compile(r"^(mlp)\.(\d+)\.ln\.|^(gru|post)\.ln\.")
# LoraConfig options whose non-default values change the math (or add tensors) we cannot represent
_UNSUPPORTED = {"use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "bias": "none",
                "lora_bias": False, "rank_pattern": {}, "alpha_pattern": {}, "layer_replication": None,
                "target_parameters": None}


# --- backbone <-> ActorModule state dict --------------------------------------------------------
def module_key(name: str) -> str:
    """Backbone tensor name -> ActorModule state-dict key (`mlp.0.ln.weight` -> `mlp_ln.0.weight`)."""
    m = _NORM_RE.match(name)
    if m is None:
        return name
    rest = name[m.end():]
    return f"mlp_ln.{m.group(2)}.{rest}" if m.group(1) else f"{m.group(3)}_ln.{rest}"


def tensor_name(key: str) -> str:
    """ActorModule state-dict key -> backbone tensor name (the inverse of `module_key`)."""
    m = re.match(r"^mlp_ln\.(\d+)\.|^(gru|post)_ln\.", key)
    if m is None:
        return key
    rest = key[m.end():]
    return f"mlp.{m.group(1)}.ln.{rest}" if m.group(1) is not None else f"{m.group(2)}.ln.{rest}"


def base_model_name(spec: PolicySpec) -> str:
    return BASE_MODEL_PREFIX + spec.backbone_fingerprint


# --- adapter <-> PEFT keys ----------------------------------------------------------------------
def peft_key(name: str) -> str:
    """Our adapter tensor name -> PEFT's saved key."""
    return PREFIX + (OFFSET_KEY if name == LOG_STD_OFFSET else name)


def adapter_name(key: str, spec: PolicySpec, source: str) -> str:
    """PEFT's saved key -> our adapter tensor name; PeftFormatError naming an unknown module."""
    if not key.startswith(PREFIX):
        raise PeftFormatError(source, f"tensor {key[:64]!r} lacks PEFT's {PREFIX!r} prefix")
    rest = key[len(PREFIX):]
    if rest == OFFSET_KEY:
        return LOG_STD_OFFSET
    module, dot, leaf = rest.rpartition(".lora_")
    name = {"A.weight": lora_a_key, "B.weight": lora_b_key}.get(leaf) if dot else None
    if name is None:
        raise PeftFormatError(source, f"tensor {key[:64]!r} is not a LoRA A/B weight of this actor "
                                      "(only lora_A.weight / lora_B.weight, and std.offset, are representable)")
    if module not in spec.linear_names():
        raise PeftFormatError(source, f"unknown target module {module[:64]!r}; this actor's Linears are "
                                      f"{spec.linear_names()}")
    return name(module)


# --- export -------------------------------------------------------------------------------------
def lora_config(spec: PolicySpec) -> dict:
    """The adapter_config.json PEFT's LoraConfig reads for this policy's adapters."""
    return {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name(spec),
            "r": spec.lora.rank, "lora_alpha": spec.lora.alpha, "lora_dropout": 0.0,
            "target_modules": spec.adapted_layers, "bias": "none", "fan_in_fan_out": False,
            "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
            "modules_to_save": [STD_MODULE] if spec.lora.log_std_offset else None,
            "rank_pattern": {}, "alpha_pattern": {}}


@dataclass(frozen=True)
class PeftFiles:
    config: bytes  # adapter_config.json
    model: bytes  # adapter_model.safetensors


def to_peft(spec: PolicySpec, agent_id: str, tensors: dict[str, Tensor]) -> PeftFiles:
    """One agent's adapter (validated against the spec) -> PEFT's two files."""
    tensors = artifacts._check_tensors(tensors, adapter_shapes(spec), f"adapter {agent_id!r}")
    meta = {"format": "pt", META_AGENT: agent_id}
    model = st_save({peft_key(k): v.contiguous() for k, v in tensors.items()}, metadata=meta)
    return PeftFiles(json.dumps(lora_config(spec), indent=2, sort_keys=True).encode(), model)


def save_peft(directory: str | Path, spec: PolicySpec, agent_id: str, tensors: dict[str, Tensor]) -> None:
    files, d = to_peft(spec, agent_id, tensors), Path(directory)
    artifacts.atomic_write(d / MODEL_FILE, files.model)
    artifacts.atomic_write(d / CONFIG_FILE, files.config)


# --- import -------------------------------------------------------------------------------------
def is_peft(data: bytes, source: str) -> bool:
    """A PEFT safetensors file: no lorasa `format_version`, tensor keys under `base_model.model.`."""
    header = artifacts._check_header(data, source)
    if "format_version" in (header.get("__metadata__") or {}):
        return False
    return any(k.startswith(PREFIX) for k in header if k != "__metadata__")


def parse_config(raw: bytes | str | dict, source: str) -> dict:
    if isinstance(raw, dict):
        return raw
    try:
        cfg = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise CorruptFileError(source, f"{CONFIG_FILE} is not valid JSON ({type(e).__name__})") from None
    if not isinstance(cfg, dict):
        raise CorruptFileError(source, f"{CONFIG_FILE} must be a JSON object")
    return cfg


def parse_peft(data: bytes, config: bytes | str | dict | None, spec: PolicySpec, source: str,
               agent_id: str | None = None) -> tuple[str, dict[str, Tensor]]:
    """PEFT adapter bytes + its adapter_config.json -> (agent_id, our float32 tensors), validated as
    `artifacts.parse_adapter` validates ours: rank/alpha, backbone, keys, shapes, finite values."""
    if config is None:
        raise PeftFormatError(source, f"a PEFT adapter needs its {CONFIG_FILE} (lora_alpha is only there): "
                                      "load the adapter directory, or upload both files (multipart parts "
                                      "'adapter_config' and 'adapter_model')")
    check_config(parse_config(config, source), spec, source)
    meta, raw = artifacts.read_safetensors(data, source)
    file_agent = meta.get(META_AGENT)
    if agent_id is not None and file_agent is not None and file_agent != agent_id:
        raise KeyMismatchError(source, f"adapter is for agent {file_agent[:64]!r}, not {agent_id[:64]!r}")
    agent_id = agent_id or file_agent
    if not agent_id:
        raise KeyMismatchError(source, "a PEFT adapter names no agent: pass agent_id")
    tensors = {adapter_name(k, spec, source): v for k, v in raw.items()}
    if LOG_STD_OFFSET in tensors and not spec.lora.log_std_offset:
        raise KeyMismatchError(source, f"adapter has {OFFSET_KEY} (a log-std offset) but this policy's adapters "
                                       "carry none (policy.json lora.log_std_offset is false)")
    if LOG_STD_OFFSET not in tensors and spec.lora.log_std_offset:
        raise KeyMismatchError(source, f"missing {PREFIX}{OFFSET_KEY}: this policy's adapters carry a log-std "
                                       f"offset (LoraConfig modules_to_save=[{STD_MODULE!r}])")
    return agent_id, artifacts._check_tensors(tensors, adapter_shapes(spec), source)


def check_config(cfg: dict, spec: PolicySpec, source: str) -> None:
    """The LoraConfig must describe exactly this policy's adapters."""
    if cfg.get("peft_type", "LORA") != "LORA":
        raise PeftFormatError(source, f"peft_type {str(cfg.get('peft_type'))[:64]!r} is not LORA")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or not isinstance(alpha, (int, float)) \
            or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise CorruptFileError(source, f"{CONFIG_FILE} needs integer 'r' and numeric 'lora_alpha'")
    if r != spec.lora.rank or not math.isclose(alpha, spec.lora.alpha, rel_tol=1e-9):
        raise RankAlphaMismatchError(source, f"adapter rank={r} alpha={float(alpha)}, policy expects "
                                             f"rank={spec.lora.rank} alpha={spec.lora.alpha}")
    for key, default in _UNSUPPORTED.items():
        if cfg.get(key) not in (None, default):
            raise PeftFormatError(source, f"LoraConfig {key}={str(cfg[key])[:64]} is not supported "
                                          f"(only {key}={default!r})")
    _check_targets(cfg.get("target_modules"), spec, source)
    base = cfg.get("base_model_name_or_path")
    if base != base_model_name(spec):
        raise FingerprintMismatchError(source, f"base_model_name_or_path {str(base)[:80]!r} is not this policy's "
                                               f"backbone {base_model_name(spec)[:28]}... (train on "
                                               "lorasa_serve.torch_module.ActorModule of this policy)")


def _check_targets(targets: object, spec: PolicySpec, source: str) -> None:
    if isinstance(targets, str) or targets is None:
        return  # a regex or "all-linear": the tensors present say which layers were adapted
    names = spec.linear_names()
    for t in targets if isinstance(targets, list) else [targets]:
        if not isinstance(t, str) or not any(n == t or n.endswith("." + t) for n in names):
            raise PeftFormatError(source, f"unknown target module {str(t)[:64]!r}; this actor's Linears are "
                                          f"{names}")


def read_dir(path: Path, spec: PolicySpec) -> tuple[bytes, bytes | None]:
    """A PEFT adapter directory, or a file (ours or PEFT's) -> (safetensors bytes, the adapter_config.json
    beside it, or None). Reads go through `artifacts._read_file` (regular files, sizes bounded)."""
    model = path / MODEL_FILE if path.is_dir() else path
    config = model.parent / CONFIG_FILE
    if path.is_dir() and not model.is_file():
        raise CorruptFileError(path, f"not a PEFT adapter directory: no {MODEL_FILE} (a .bin one is pickled: "
                                     "re-save with save_pretrained(safe_serialization=True))")
    data = artifacts._read_file(model, artifacts.max_file_bytes(adapter_shapes(spec)))
    if not config.is_file():
        return data, None
    return data, artifacts._read_file(config, artifacts.MAX_JSON_BYTES)


def parse_any(data: bytes, spec: PolicySpec, source: str, agent_id: str | None = None,
              config: bytes | str | dict | None = None) -> tuple[str, dict[str, Tensor]]:
    """Our adapter bytes or a PEFT adapter (with its config) -> (agent_id, validated tensors)."""
    if is_peft(data, source):
        return parse_peft(data, config, spec, source, agent_id)
    return artifacts.parse_adapter(data, spec, source, agent_id)


def load_any(source: str | Path, spec: PolicySpec, agent_id: str | None = None
             ) -> tuple[str, dict[str, Tensor]]:
    """A path: our adapter file, a PEFT adapter directory, or a PEFT file (config read from beside it)."""
    path = Path(source)
    data, config = read_dir(path, spec)
    return parse_any(data, spec, str(path), agent_id, config)


def canonical_bytes(data: bytes, spec: PolicySpec, source: str, agent_id: str,
                    config: bytes | None = None) -> tuple[bytes, dict[str, Tensor]]:
    """Validate an upload (ours, or PEFT with its config) -> (our adapter bytes: ours as sent, PEFT's
    converted; the validated tensors)."""
    if not is_peft(data, source):
        return data, artifacts.parse_adapter(data, spec, source, agent_id)[1]
    agent_id, tensors = parse_peft(data, config, spec, source, agent_id)
    return artifacts.adapter_bytes(spec, agent_id, tensors), tensors
