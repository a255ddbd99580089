"""Export a policy directory and serve it through onnxruntime in one call (benchmarks, tests).

    oe = onnx_engine_from_policy("policies/halfcheetah_2x3")              # one multi-agent graph
    oe = onnx_engine_from_policy("policies/halfcheetah_2x3", merge=True)  # per-agent merged graphs

The export is the verified one `lorasa-export` runs, into a temporary directory; the returned
`lorasa_serve.onnx_backend.OnnxEngine` holds the models in memory.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Sequence

from lorasa_serve.onnx_backend import OnnxEngine

from .errors import ExportError
from .pipeline import ExportConfig, export_policy


def onnx_engine_from_policy(policy_dir: str | Path, merge: bool = False,
                            providers: str | Sequence[str] = "cpu", threads: int | None = None,
                            lora_impl: str = "auto") -> OnnxEngine:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = ExportConfig(Path(policy_dir), Path(tmp), merge=merge, formats=("onnx",),
                           lora_impl=lora_impl, progress=False)
        report = export_policy(cfg)
        failed = [r.error for r in report.results if r.error]
        if failed:
            raise ExportError(f"export of {policy_dir} failed verification: {failed[0]}")
        return OnnxEngine.from_dir(tmp, providers, threads)  # sessions hold the models in memory
