"""Typed export errors. The CLI prints `str(error)` as one line and exits non-zero."""
from __future__ import annotations

from lorasa_serve.errors import LorasaError


class ExportError(LorasaError):
    """Bad export arguments, a missing optional dependency, or an exporter failure."""


class VerificationError(ExportError):
    """An exported artifact disagrees with the Engine beyond the tolerance (the file was removed)."""

    def __init__(self, artifact: str, output: str, max_diff: float, tol: float, step: int):
        self.artifact, self.output, self.max_diff, self.tol, self.step = artifact, output, max_diff, tol, step
        super().__init__(f"{artifact}: output {output!r} differs from the engine by {max_diff:.3g} "
                         f"(tolerance {tol:.1g}) at rollout step {step}")
