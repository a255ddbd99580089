"""Exporters: merged per-agent safetensors policies and ONNX graphs, each verified against the Engine.

    lorasa-export POLICY_DIR --merge --out OUT            # per-agent merged safetensors + ONNX
    lorasa-export POLICY_DIR --out OUT                    # one multi-agent ONNX graph (stacked adapters)

Python: `exporters.export_policy(ExportConfig(...))` -> ExportReport;
`exporters.onnx_engine_from_policy(policy_dir)` -> an OnnxEngine over a fresh verified export.
"""
from .errors import ExportError, VerificationError
from .onnx_engine import onnx_engine_from_policy
from .pipeline import ExportConfig, ExportReport, export_policy

__all__ = ["ExportConfig", "ExportError", "ExportReport", "VerificationError", "export_policy",
           "onnx_engine_from_policy"]
