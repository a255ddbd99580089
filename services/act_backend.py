"""What acts: the `ActBackend` a worker serves through, built from the configuration."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lorasa_serve import Engine
from lorasa_serve.backend import ActBackend

from .config import ServiceConfig


def open_act_backend(cfg: ServiceConfig, policy_dir: Path) -> ActBackend:
    """LORASA_BACKEND=engine: the policy directory through `Engine` (hot swap, merge). onnx: a
    `lorasa-export` directory through onnxruntime, the graphs its manifest lists as verified (the
    adapters are fixed in them: uploads and merges are refused)."""
    if cfg.backend == "onnx":
        from lorasa_serve.onnx_backend import OnnxEngine
        return OnnxEngine.from_dir(policy_dir, providers="cpu" if cfg.device == "cpu" else "auto",
                                   threads=cfg.torch_threads)
    return Engine.from_dir(policy_dir, device=cfg.device, mode=cfg.mode)  # sessions: the state backend's


def check_agent_order(backend: ActBackend) -> None:
    """Requests carry agent indices in the spec's order: the backend's slots must be that order."""
    slots = backend.agent_index(backend.spec.agent_ids)
    if not np.array_equal(slots, np.arange(len(slots))):
        raise RuntimeError(f"the backend's agent order {slots.tolist()} is not its spec's")
