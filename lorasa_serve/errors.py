"""Typed errors. Artifact errors name the file and the problem; input errors name the row/field."""
from __future__ import annotations


class LorasaError(Exception):
    """Base class of every error this package raises on purpose."""


class ArtifactError(LorasaError):
    """A policy file (spec, backbone or adapter) is unusable. `path` names the file."""

    def __init__(self, path: object, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class CorruptFileError(ArtifactError):
    """Not a safetensors/JSON file, truncated, or unreadable."""


class FormatVersionError(ArtifactError):
    """The file declares a format version this runtime does not read."""


class KeyMismatchError(ArtifactError):
    """Tensors missing from, or unexpected in, a file."""


class ShapeMismatchError(ArtifactError):
    """A tensor has the wrong shape or dtype for the spec."""


class RankAlphaMismatchError(ArtifactError):
    """An adapter's rank or alpha differs from the policy's LoRA config."""


class FingerprintMismatchError(ArtifactError):
    """An adapter was trained against a different backbone."""


class NonFiniteError(ArtifactError):
    """A tensor contains NaN or inf."""


class PeftFormatError(ArtifactError):
    """A PEFT adapter this runtime cannot represent: no adapter_config.json (so no lora_alpha), a
    LoraConfig option that changes the math (DoRA, rsLoRA, LoRA biases, ...), unknown target modules."""


class SpecError(LorasaError, ValueError):
    """An invalid PolicySpec / AgentSpec value."""


class InputError(LorasaError, ValueError):
    """Bad input to an act entry point (shapes, dtypes, non-finite values, empty action masks; see
    `lorasa_serve.protocol`), or any other bad request to the service (`BadRequest` is this class).
    `status`: the HTTP status the service answers with (4xx); `message`: its text."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message = message
        self.status = status


class UnknownAgentError(InputError):
    """An agent id the engine does not serve."""


class NotRegularFileError(CorruptFileError):
    """Missing, a dangling or looping symlink, a FIFO, a device, a socket or a directory where a
    regular file must be (checked with `stat` before anything is opened for reading)."""


class OversizedFileError(CorruptFileError):
    """A file larger than anything its kind can be (checked with `stat` before reading)."""


class DigestMismatchError(ArtifactError):
    """A file's sha256 differs from the digest recorded for it (digests.json, a state manifest)."""


class DeviceUnavailableError(LorasaError, ValueError):
    """The requested torch device does not exist here (e.g. "cuda" with a CPU build of torch)."""
