"""lorasa-serve: train, serve and export LoRASA multi-agent policies (one backbone, one LoRA per agent).

Names are imported on first use (PEP 562), so `import lorasa_serve.client` needs neither torch nor
bentoml.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what static tools see; at run time these load on first use
    from .artifacts import load_policy, save_adapter, save_policy
    from .caches import CacheLimits
    from .engine import Engine
    from .errors import (ArtifactError, CorruptFileError, DeviceUnavailableError, DigestMismatchError,
                         FingerprintMismatchError,
                         FormatVersionError, InputError, KeyMismatchError, LorasaError, NonFiniteError,
                         NotRegularFileError, OversizedFileError, PeftFormatError, RankAlphaMismatchError,
                         ShapeMismatchError, SpecError, UnknownAgentError)
    from .network import init_adapter, init_backbone
    from .protocol import ActRequest, ActResult, BadRequest, pad_obs
    from .spec import AgentSpec, LoraSpec, PolicySpec

__version__ = "0.1.0"
_WHERE = {
    "load_policy": "artifacts", "save_adapter": "artifacts", "save_policy": "artifacts", "Engine": "engine",
    "CacheLimits": "caches",
    "ActRequest": "protocol", "ActResult": "protocol", "BadRequest": "protocol",
    "pad_obs": "protocol", "init_adapter": "network", "init_backbone": "network", "AgentSpec": "spec", "LoraSpec": "spec",
    "PolicySpec": "spec",
    **{name: "errors" for name in (
        "ArtifactError", "CorruptFileError", "DigestMismatchError", "FingerprintMismatchError",
        "DeviceUnavailableError", "FormatVersionError", "InputError", "KeyMismatchError", "LorasaError", "NonFiniteError",
        "NotRegularFileError", "OversizedFileError", "PeftFormatError", "RankAlphaMismatchError",
        "ShapeMismatchError", "SpecError", "UnknownAgentError")},
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'lorasa_serve' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
