"""lorasa-serve: train, serve and export LoRASA multi-agent policies (one backbone, one LoRA per agent)."""
from .artifacts import load_policy, save_policy
from .engine import ActOutput, Engine
from .errors import (ArtifactError, CorruptFileError, FingerprintMismatchError, FormatVersionError,
                     InputError, KeyMismatchError, LorasaError, NonFiniteError, RankAlphaMismatchError,
                     ShapeMismatchError, SpecError, UnknownAgentError)
from .network import init_adapter, init_backbone
from .spec import AgentSpec, LoraSpec, PolicySpec

__version__ = "0.1.0"
__all__ = [
    "ActOutput", "AgentSpec", "ArtifactError", "CorruptFileError", "Engine",
    "FingerprintMismatchError", "FormatVersionError", "InputError", "KeyMismatchError", "LoraSpec",
    "LorasaError", "NonFiniteError", "PolicySpec", "RankAlphaMismatchError", "ShapeMismatchError",
    "SpecError", "UnknownAgentError", "init_adapter", "init_backbone", "load_policy", "save_policy",
]
