"""torch module -> ONNX bytes with torch 2.13's dynamo exporter (onnxscript), dynamic batch.

The dynamo exporter is the supported one on torch 2.13 (`dynamo=False` is deprecated). Our modules
hold no `nn.GRU`, so the GRU is written as explicit Gemm/Sigmoid/Tanh ops with PyTorch semantics.
The model is returned as bytes (weights embedded, no external-data side file) so callers can write
it atomically; metadata_props carry the spec and the I/O contract for non-Python users.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings

import torch
from torch import Tensor, nn

from .errors import ExportError

MIN_OPSET = 18  # LayerNormalization needs 17; the dynamo exporter writes 18+
EXAMPLE_BATCH = 3  # >= 2 so the exporter does not specialise the batch dimension


def require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ExportError(f"ONNX export needs the 'onnx' extra (pip install 'lorasa-serve[onnx]'): {e}") from None


def export_bytes(module: nn.Module, example: tuple[Tensor, ...], inputs: list[str], outputs: list[str],
                 opset: int, metadata: dict[str, str]) -> bytes:
    """Trace `module(*example)` -> serialised, checked ONNX ModelProto with dim 0 named 'batch'."""
    require_onnx()
    import onnx

    if opset < MIN_OPSET:
        raise ExportError(f"--opset {opset} is too old: need >= {MIN_OPSET} (LayerNormalization)")
    batch = torch.export.Dim("batch", min=1)
    named = module.n_named  # forward(named..., *rest): dynamic_shapes mirrors that structure
    dynamic = tuple({0: batch} for _ in example[:named])
    if len(example) > named:
        dynamic += (tuple({0: batch} for _ in example[named:]),)
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(module.eval(), example, None, dynamo=True, input_names=inputs,
                                     output_names=outputs, dynamic_shapes=dynamic,
                                     opset_version=opset, verbose=False, optimize=True)
    except Exception as e:  # the exporter raises many unrelated types; report it as one typed error
        root = e
        while root.__cause__ is not None:  # the exporter wraps the real error; report that one
            root = root.__cause__
        raise ExportError(f"torch.onnx.export failed: {type(root).__name__}: "
                          f"{(str(root).strip().splitlines() or [''])[0]}") from e
    finally:
        quiet.setLevel(level)
    model = prog.model_proto
    for out in model.graph.output:  # name every output's dim 0 'batch' like the inputs
        dims = out.type.tensor_type.shape.dim
        if len(dims) and not dims[0].dim_value:
            dims[0].dim_param = "batch"
    for k, v in metadata.items():
        model.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(model)
    return model.SerializeToString()
