"""Exporters: merged per-agent safetensors policies and ONNX graphs, each verified against the Engine.

    lorasa-export POLICY_DIR --merge --out OUT            # per-agent merged safetensors + ONNX
    lorasa-export POLICY_DIR --out OUT                    # one multi-agent ONNX graph (stacked adapters)

Python: `exporters.export_policy(ExportConfig(...))` -> ExportReport.
"""
from .errors import ExportError, VerificationError
from .pipeline import ExportConfig, ExportReport, export_policy

__all__ = ["ExportConfig", "ExportError", "ExportReport", "VerificationError", "export_policy"]
