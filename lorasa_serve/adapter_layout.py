"""The adapter layout: the one home of what an agent's adapter is and of every shape it takes.

This module owns the tensor keys of an adapter file, the low-rank update and its scaling, and every
transpose, stack and scaling between the layouts below; the bank, the network's parameters, the
training actor, the PEFT format and the ONNX graphs all go through it.

The update (PEFT's LoRA, peft/tuners/lora/layer.py: `scaling = lora_alpha / r`, `get_delta_weight`,
`merge`), on each Linear `W0 [out, in]` named in `spec.adapted_layers`:

    dW = scale * B @ A        A = lora_A [r, in], B = lora_B [out, r], scale = alpha / r (`scaling`)
    unmerged: y = x @ W0^T + b + (x @ A^T) @ (scale * B^T)     (the low-rank term beside the backbone)
    merged:   y = x @ W^T + b,  W = W0 + dW                    (`merge_weight`)

The merge is reversible by construction: `merge_weight` returns a new tensor and W0 is never written,
so unmerging is dropping W (exact; PEFT's in-place `W -= dW` rounds).

Layouts (S slots = agents of the bank, C chunks of M rows, P agents per chunk, N agents in training):

| where                | tensor                  | shape                           | scaled | built by           |
|----------------------|-------------------------|---------------------------------|--------|--------------------|
| adapter file, PEFT,  | `<layer>.lora_A.weight` | [r, in]                         | no     | (the file)         |
| `Engine.adapter`     | `<layer>.lora_B.weight` | [out, r]                        | no     |                    |
|                      | `log_std_offset`        | [act_max] (Gaussian, optional)  | -      |                    |
| bank (`AdapterBank`) | `a_r[layer]`            | [S, r, in] (A as stored)        | no     | `stack_adapters`   |
|                      | `b_t[layer]`            | [S, r, out] (B^T)               | yes    | `stack_adapters`   |
|                      | `log_std`               | [S, act_max] (shared + offset)  | -      | `stack_log_std`    |
| forward (`LinearP`)  | `lora_a`                | [C, in, P*r] (P blocks of A^T)  | no     | `chunk_lora`       |
|                      | `lora_b`                | [C, P*r, out]                   | yes    | `chunk_lora`       |
|                      | `lora_mask`             | [C, M, P*r] 0/1                 | -      | `block_mask`       |
|                      | `weight`, per chunk     | [C, in, out] (W^T per chunk)    | -      | `per_chunk_weight` |
|                      | `weight`, shared        | [out, in] (PyTorch's Linear)    | -      | (the backbone)     |
| merged weights       | W0 + dW                 | [out, in]                       | yes    | `merge_weight`     |
| training (`Actor`)   | `<layer>.lora_a`        | [N, in, r]                      | no     | `to_training`      |
|                      | `<layer>.lora_b`        | [N, r, out] (B^T)               | (1)    | `to_training`      |
|                      | `log_std_offset`        | [N, 1, act_max]                 | -      | `to_training`      |
| ONNX graph, dense    | A                       | [in, S*r] (agent-major columns) | no     | `onnx_lora`        |
|                      | B                       | [S*r, out]                      | yes    | `onnx_lora`        |
| ONNX graph, gather   | A                       | [S, in, r]                      | no     | `onnx_lora`        |
|                      | B                       | [S, r, out]                     | yes    | `onnx_lora`        |

(1) stored unscaled; `scaled_b` scales it at every forward, so gradients reach B itself.
A missing adapter (None) is zeros in every stacked layout: that agent runs the backbone alone.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .spec import LoraSpec, PolicySpec

LOG_STD_OFFSET = "log_std_offset"  # adapter tensor [act_max]: agent log-std = backbone log_std + it
TRAINING_SUFFIXES = (".lora_a", ".lora_b")  # the training actor's per-agent adapter tensors


# --- keys -------------------------------------------------------------------------------------------
def lora_a_key(layer: str) -> str:
    """The adapter file's key of A [r, in] for `layer` (PEFT's naming)."""
    return f"{layer}.lora_A.weight"


def lora_b_key(layer: str) -> str:
    """The adapter file's key of B [out, r] for `layer`."""
    return f"{layer}.lora_B.weight"


def adapter_shapes(spec: PolicySpec) -> dict[str, tuple[int, ...]]:
    """Every tensor of one adapter file, key -> shape, in file order: per adapted layer A [r, in] and
    B [out, r]; then `log_std_offset` [act_max] when `spec.lora.log_std_offset`."""
    shapes, r = spec.linear_shapes(), spec.lora.rank
    out: dict[str, tuple[int, ...]] = {}
    for layer in spec.adapted_layers:
        i, o = shapes[layer]
        out[lora_a_key(layer)] = (r, i)
        out[lora_b_key(layer)] = (o, r)
    if spec.lora.log_std_offset:
        out[LOG_STD_OFFSET] = (spec.act_max,)
    return out


def training_a_key(layer: str) -> str:
    """The training actor's key of A^T [N, in, r] for `layer`."""
    return f"{layer}.lora_a"


def training_b_key(layer: str) -> str:
    """The training actor's key of B^T [N, r, out] (unscaled) for `layer`."""
    return f"{layer}.lora_b"


def is_training_adapter_key(name: str) -> bool:
    """A training actor tensor with one row per agent (adapters, log-std offsets), never gathered by group."""
    return name.endswith(TRAINING_SUFFIXES) or name == LOG_STD_OFFSET


# --- the update ---------------------------------------------------------------------------------------
def scaling(lora: LoraSpec) -> float:
    """scale = alpha / r: dW = scale * B @ A."""
    return lora.alpha / lora.rank


def delta_weight(spec: PolicySpec, adapter: dict[str, Tensor], layer: str) -> Tensor:
    """dW = scale * B @ A [out, in] of `layer`."""
    return scaling(spec.lora) * (adapter[lora_b_key(layer)] @ adapter[lora_a_key(layer)])


def merge_weight(spec: PolicySpec, w0: Tensor, adapter: dict[str, Tensor] | None, layer: str) -> Tensor:
    """W0 + dW [out, in], a new tensor (W0 itself copied without an adapter); W0 is never modified."""
    return w0.clone() if adapter is None else w0 + delta_weight(spec, adapter, layer)


def merge(spec: PolicySpec, backbone: dict[str, Tensor], adapter: dict[str, Tensor] | None
          ) -> dict[str, Tensor]:
    """Adapted layer -> W0 + dW [out, in] (`merge_weight` of each)."""
    return {layer: merge_weight(spec, backbone[f"{layer}.weight"], adapter, layer)
            for layer in spec.adapted_layers}


def agent_log_std(spec: PolicySpec, log_std: Tensor, adapter: dict[str, Tensor] | None) -> Tensor:
    """The agent's Gaussian log-std [act_max]: the backbone's shared `log_std` [act_max] plus the
    adapter's `log_std_offset` [act_max] (absent, or no adapter: the shared one as it is)."""
    if adapter is None or not spec.lora.log_std_offset or LOG_STD_OFFSET not in adapter:
        return log_std
    return log_std + adapter[LOG_STD_OFFSET].to(log_std.device, torch.float32)


# --- file -> bank -------------------------------------------------------------------------------------
def stack_adapters(spec: PolicySpec, layer: str, adapters: Sequence[dict[str, Tensor] | None],
                   device: torch.device | str | None = None, scaled: bool = True
                   ) -> tuple[Tensor, Tensor]:
    """One adapted layer of S agents -> A [S, r, in] (lora_A as stored) and B^T [S, r, out], float32,
    B^T times scale when `scaled` (then x @ A^T @ B^T is the whole delta). A None adapter is zeros."""
    i, o = spec.linear_shapes()[layer]
    r, scale = spec.lora.rank, (scaling(spec.lora) if scaled else 1.0)
    dev = torch.device(device) if device is not None else _device_of(adapters)
    a = [torch.zeros(r, i, device=dev) if ad is None else
         ad[lora_a_key(layer)].to(dev, torch.float32) for ad in adapters]
    b = [torch.zeros(r, o, device=dev) if ad is None else
         ad[lora_b_key(layer)].to(dev, torch.float32).T * scale for ad in adapters]
    return torch.stack(a), torch.stack(b)


def stack_log_std(spec: PolicySpec, log_std: Tensor, adapters: Sequence[dict[str, Tensor] | None]
                  ) -> Tensor | None:
    """Per-agent log-std [S, act_max] (`agent_log_std` of each), or None when the policy's adapters
    carry no offsets (every agent then uses the shared [act_max])."""
    if not spec.lora.log_std_offset:
        return None
    return torch.stack([agent_log_std(spec, log_std, ad) for ad in adapters])


# --- bank -> forward ----------------------------------------------------------------------------------
def chunk_lora(a_r: Tensor, b_t: Tensor, chunk_slots: Tensor | None, contiguous: bool) -> tuple[Tensor, Tensor]:
    """Bank stacks a_r [S, r, in], b_t [S, r, out], chunk_slots [C, P] int64 on their device (the P agents
    of each chunk) -> A [C, in, P*r], B [C, P*r, out]: each chunk's P adapters side by side.

    `chunk_slots` None: the identity layout (P = 1 and chunk c is slot c): the stacks themselves, no
    gather. A is a transposed view of [C, P*r, in] unless `contiguous` (a copy: faster as a GEMM over
    several rows per chunk)."""
    if chunk_slots is None:
        a, b = a_r, b_t
    else:
        C, P = chunk_slots.shape
        idx = chunk_slots.reshape(-1)  # [C*P]
        a = a_r.index_select(0, idx).view(C, P * a_r.shape[1], a_r.shape[2])  # [C, P*r, in]
        b = b_t.index_select(0, idx).view(C, P * b_t.shape[1], b_t.shape[2])  # [C, P*r, out]
    a = a.transpose(1, 2)  # [C, in, P*r]
    return (a.contiguous() if contiguous else a), b


def block_mask(row_block: Tensor, P: int, r: int) -> Tensor:
    """row_block [C, M] (which of its chunk's P agents each row uses; -1: dead row) -> [C, M, P*r]
    0/1 float32 keeping the r columns of the row's own agent's block of `chunk_lora`'s A."""
    blocks = torch.arange(P, device=row_block.device)
    mask = (row_block.unsqueeze(-1) == blocks).to(torch.float32)  # [C, M, P]
    return mask.repeat_interleave(r, dim=-1).contiguous()  # [C, M, P*r]


def per_chunk_weight(weights: Sequence[Tensor]) -> Tensor:
    """C Linear weights [out, in] (PyTorch's layout) -> the per-chunk layout [C, in, out]."""
    return torch.stack([w.T for w in weights])


# --- file <-> training --------------------------------------------------------------------------------
def to_training(spec: PolicySpec, adapters: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """N agents' adapters (file layout) -> the training actor's tensors: `<layer>.lora_a` [N, in, r],
    `<layer>.lora_b` [N, r, out] (unscaled), and `log_std_offset` [N, 1, act_max] when carried."""
    t = {}
    for layer in spec.adapted_layers:
        a_r, b_t = stack_adapters(spec, layer, adapters, scaled=False)
        t[training_a_key(layer)] = a_r.transpose(1, 2).contiguous()  # [N, in, r]
        t[training_b_key(layer)] = b_t  # [N, r, out]
    if spec.lora.log_std_offset:
        t[LOG_STD_OFFSET] = torch.stack([ad[LOG_STD_OFFSET] for ad in adapters]).unsqueeze(1)  # [N, 1, A]
    return t


def from_training(spec: PolicySpec, tensors: dict[str, Tensor]) -> list[dict[str, Tensor]]:
    """The training actor's tensors (`to_training`'s layout) -> each agent's adapter (file layout),
    detached copies."""
    n = len(spec.agents)
    out: list[dict[str, Tensor]] = [{} for _ in range(n)]
    for i in range(n):
        for layer in spec.adapted_layers:
            out[i][lora_a_key(layer)] = tensors[training_a_key(layer)][i].detach().T.contiguous()
        for layer in spec.adapted_layers:
            out[i][lora_b_key(layer)] = tensors[training_b_key(layer)][i].detach().T.contiguous()
        if LOG_STD_OFFSET in tensors:
            out[i][LOG_STD_OFFSET] = tensors[LOG_STD_OFFSET][i, 0].detach().clone()  # [A]
    return out


def scaled_b(spec: PolicySpec, b_t: Tensor) -> Tensor:
    """Training's B^T [N, r, out] -> the forward's [N, r, out] times scale (differentiable)."""
    return b_t * scaling(spec.lora)


# --- bank layout -> ONNX graph ------------------------------------------------------------------------
def onnx_lora(a_r: Tensor, b_t: Tensor, dense: bool) -> tuple[Tensor, Tensor]:
    """Bank stacks a_r [S, r, in], b_t [S, r, out] (scaled) -> the multi-agent graph's constants:
    dense A [in, S*r] (agent s's A^T in columns s*r .. s*r+r-1, `dense_columns`) and B [S*r, out];
    gather A [S, in, r] and B [S, r, out]. Contiguous copies."""
    S, r, i = a_r.shape
    a = a_r.transpose(1, 2)  # [S, in, r]
    b = b_t
    if dense:
        a = a.permute(1, 0, 2).reshape(i, S * r)  # [in, S*r]
        b = b.reshape(S * r, b.shape[2])  # [S*r, out]
    return a.contiguous(), b.contiguous()


def dense_columns(S: int, r: int) -> Tensor:
    """[S*r] int64: the agent each column of `onnx_lora`'s dense A belongs to."""
    return torch.arange(S).repeat_interleave(r)


def _device_of(adapters: Sequence[dict[str, Tensor] | None]) -> torch.device:
    for ad in adapters:
        if ad:
            return next(iter(ad.values())).device
    return torch.device("cpu")
