"""Per-agent tensors stacked by slot: LoRA adapters and action-dimension masks. The one place that
knows the PEFT adapter layout (`<layer>.lora_A.weight` [r, in], `<layer>.lora_B.weight` [out, r])
and how agents with fewer actions than `act_max` are masked; the Engine's bank, the exporters'
graphs and the training actor all stack through here.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .spec import LOG_STD_OFFSET, PolicySpec


def stack_adapters(spec: PolicySpec, layer: str, adapters: Sequence[dict[str, Tensor] | None],
                   device: torch.device | str | None = None, scaled: bool = True
                   ) -> tuple[Tensor, Tensor]:
    """One adapted layer of S agents -> A [S, r, in] (lora_A as stored) and B^T [S, r, out], float32,
    B^T times alpha/r when `scaled` (then x @ A^T @ B^T is the whole delta). A None adapter is zeros
    (that agent runs the backbone alone). `x @ A^T` needs A.transpose(1, 2) [S, in, r]."""
    i, o = spec.linear_shapes()[layer]
    r, scale = spec.lora.rank, (spec.lora.scale if scaled else 1.0)
    dev = torch.device(device) if device is not None else _device_of(adapters)
    a = [torch.zeros(r, i, device=dev) if ad is None else
         ad[f"{layer}.lora_A.weight"].to(dev, torch.float32) for ad in adapters]
    b = [torch.zeros(r, o, device=dev) if ad is None else
         ad[f"{layer}.lora_B.weight"].to(dev, torch.float32).T * scale for ad in adapters]
    return torch.stack(a), torch.stack(b)


def agent_log_std(spec: PolicySpec, log_std: Tensor, adapter: dict[str, Tensor] | None) -> Tensor:
    """The agent's Gaussian log-std [act_max]: the backbone's shared `log_std` [act_max] plus the
    adapter's `log_std_offset` [act_max] (absent, or no adapter: the shared one as it is)."""
    if adapter is None or not spec.lora.log_std_offset or LOG_STD_OFFSET not in adapter:
        return log_std
    return log_std + adapter[LOG_STD_OFFSET].to(log_std.device, torch.float32)


def stack_log_std(spec: PolicySpec, log_std: Tensor, adapters: Sequence[dict[str, Tensor] | None]
                  ) -> Tensor | None:
    """Per-agent log-std [S, act_max] (`agent_log_std` of each), or None when the policy's adapters
    carry no offsets (every agent then uses the shared [act_max])."""
    if not spec.lora.log_std_offset:
        return None
    return torch.stack([agent_log_std(spec, log_std, ad) for ad in adapters])


def dim_mask(act_dims: Tensor, rows: Tensor, act_max: int) -> Tensor:
    """act_dims [S] int, rows [B] slot of each row -> [B, act_max] bool: the row's agent has that
    action dimension (columns past its act_dim are padding)."""
    cols = torch.arange(act_max, device=act_dims.device)
    return cols < act_dims[rows].unsqueeze(1)


def _device_of(adapters: Sequence[dict[str, Tensor] | None]) -> torch.device:
    for ad in adapters:
        if ad:
            return next(iter(ad.values())).device
    return torch.device("cpu")
