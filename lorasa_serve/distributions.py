"""Action distributions over padded heads, restricted to each row's true action size.

Gaussian: mean = head output, learned state-independent log-std; dims beyond an agent's act_dim are
zeroed in the action and excluded from the log-prob. Categorical: logits of actions beyond the
agent's action count or not available are masked out.

Sampling draws its random numbers from the caller's `generator` on the generator's own device and
moves them to the head's: a seed gives the same numbers whatever device the policy runs on (a CPU
generator serves a CUDA engine; a CUDA generator draws on its GPU). Without a generator they are drawn
on the head's device.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

_LOG_2PI = math.log(2 * math.pi)


def dim_mask(act_dims: Tensor, rows: Tensor, act_max: int) -> Tensor:
    """act_dims [S] int, rows [B] slot of each row -> [B, act_max] bool: the row's agent has that
    action dimension (columns past its act_dim are padding)."""
    cols = torch.arange(act_max, device=act_dims.device)
    return cols < act_dims[rows].unsqueeze(1)


def gaussian_log_prob(mean: Tensor, log_std: Tensor, action: Tensor, dim_mask: Tensor) -> Tensor:
    """mean, action [B, A]; log_std [A]; dim_mask [B, A] bool -> [B]."""
    z = (action - mean) * torch.exp(-log_std)
    lp = -0.5 * z * z - log_std - 0.5 * _LOG_2PI
    return (lp * dim_mask).sum(-1)


def gaussian_entropy(log_std: Tensor, dim_mask: Tensor) -> Tensor:
    """[B]: sum over the row's true dims of 0.5 + 0.5 log(2 pi) + log_std."""
    return ((0.5 + 0.5 * _LOG_2PI + log_std) * dim_mask).sum(-1)


def gaussian_act(mean: Tensor, log_std: Tensor, dim_mask: Tensor, deterministic: bool,
                 generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """-> actions [B, A] (zero beyond each row's act_dim), log-probs [B]."""
    if deterministic:
        action = mean
    else:
        noise = _draw(torch.randn, mean, generator)  # [B, A]
        action = mean + noise * torch.exp(log_std)
    action = action * dim_mask
    return action, gaussian_log_prob(mean, log_std, action, dim_mask)


def masked_logits(logits: Tensor, valid: Tensor) -> Tensor:
    """logits [B, A]; valid [B, A] bool -> logits with invalid actions at the dtype's minimum."""
    return logits.masked_fill(~valid, torch.finfo(logits.dtype).min)


def categorical_log_prob(logits: Tensor, valid: Tensor, action: Tensor) -> Tensor:
    logp = torch.log_softmax(masked_logits(logits, valid), dim=-1)
    return logp.gather(-1, action.unsqueeze(-1)).squeeze(-1)


def categorical_entropy(logits: Tensor, valid: Tensor) -> Tensor:
    logp = torch.log_softmax(masked_logits(logits, valid), dim=-1)
    return -(logp.exp() * logp).masked_fill(~valid, 0.0).sum(-1)


def categorical_act(logits: Tensor, valid: Tensor, deterministic: bool,
                    generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """-> actions [B] int64, log-probs [B]. Sampling is Gumbel-max (one vectorised draw)."""
    ml = masked_logits(logits, valid)
    if deterministic:
        action = ml.argmax(-1)
    else:
        u = _draw(torch.rand, ml, generator)  # [B, A]
        gumbel = -torch.log(-torch.log(u.clamp_min(1e-20)))
        action = (ml + gumbel).masked_fill(~valid, float("-inf")).argmax(-1)
    logp = torch.log_softmax(ml, dim=-1).gather(-1, action.unsqueeze(-1)).squeeze(-1)
    return action, logp


def _draw(sample, like: Tensor, generator: torch.Generator | None) -> Tensor:
    """sample(like.shape) drawn from `generator` on its device (else on `like`'s), on `like`'s device.
    The copy of a drawn CPU tensor (pageable memory, staged before `to` returns) is non_blocking: it
    does not wait for the forward queued before it."""
    dev = like.device if generator is None else generator.device
    x = sample(like.shape, generator=generator, device=dev, dtype=like.dtype)
    return x if x.device == like.device else x.to(like.device, non_blocking=True)
