"""The one set of input rules for every `act` backend (`Engine`, `OnnxEngine`): same checks, same
typed errors (`InputError`, `UnknownAgentError`), same messages.

    slots = agent_slots(agent_ids, slot_of)                    # [B] int64, checked
    obs = float_rows(obs, "obs", B, spec.obs_max, device)      # [B, obs_max] float32, finite
    h = float_rows(state, "state", B, spec.hidden, device, exact=True)
    reset = bool_rows(reset, "reset", B, None, device)         # [B] bool or None
    valid = valid_actions(dim_mask, bool_rows(avail, "avail", B, spec.act_max, device))

Everything is checked before any forward runs, so a rejected call changes no state. Tensors that are
already float32 on the right device pass through without a copy (the hot path of an env loop).
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch
from torch import Tensor

from .errors import InputError, UnknownAgentError

MAX_LISTED_AGENTS = 20  # unknown-agent errors list at most this many served ids


def agent_slots(agent_ids, slot_of: Mapping[str, int]) -> np.ndarray:
    """Agent ids (a sequence of strings) or integer indices (numpy / torch int array) -> slots [B]."""
    if isinstance(agent_ids, (str, bytes)):
        raise InputError(f"agent_ids must be a list of agent ids, not one string: pass [{agent_ids!r}]")
    if isinstance(agent_ids, Tensor):
        agent_ids = agent_ids.cpu().numpy()
    if isinstance(agent_ids, np.ndarray) and agent_ids.dtype.kind in "iu":
        slots = agent_ids.astype(np.int64, copy=False).reshape(-1)
        small = slots.tolist() if len(slots) <= 64 else slots  # Python min/max: faster when tiny
        if len(slots) and (min(small) < 0 or max(small) >= len(slot_of)):
            raise UnknownAgentError(f"agent indices must be in [0, {len(slot_of)})")
    else:
        try:
            slots = np.fromiter((slot_of[a] for a in agent_ids), dtype=np.int64)
        except KeyError as e:
            raise UnknownAgentError(f"unknown agent id {_short(e.args[0])}; serving "
                                    f"{list(slot_of)[:MAX_LISTED_AGENTS]}") from None
        except TypeError:
            raise InputError("agent_ids must be a sequence of agent ids or an int array") from None
    if len(slots) == 0:
        raise InputError("empty batch: agent_ids has no rows")
    return slots


def agent_slot(agent_id, slot_of: Mapping[str, int]) -> int:
    """One agent id -> its slot (UnknownAgentError otherwise)."""
    try:
        return slot_of[agent_id]
    except (KeyError, TypeError):
        raise UnknownAgentError(f"unknown agent id {_short(agent_id)}") from None


def distinct_agents(agent_ids) -> list[str]:
    """A session call's agent ids as a list; each at most once (it owns one state per agent)."""
    if isinstance(agent_ids, (str, bytes)):
        raise InputError(f"agent_ids must be a list of agent ids, not one string: pass [{agent_ids!r}]")
    ids = list(agent_ids)
    try:
        distinct = len(set(ids)) == len(ids)
    except TypeError:
        raise InputError("agent_ids must be a sequence of agent ids") from None
    if not distinct:
        raise InputError("an agent may appear at most once per session call")
    return ids


def float_rows(x, name: str, B: int, width: int, device: torch.device, exact: bool = False) -> Tensor:
    """-> [B, width] float32 on `device` (None: zeros; fewer columns: zero-padded unless `exact`)."""
    if x is None:
        return torch.zeros(B, width, device=device)
    if isinstance(x, Tensor) and x.dtype == torch.float32 and x.device == device:
        t = x.detach()  # a view: a caller's tensor that requires grad reads like any other
    else:
        t = _as_tensor(x, name, device).to(torch.float32)
    if t.dim() != 2 or t.shape[0] != B or t.shape[1] > width or (exact and t.shape[1] != width):
        want = f"[{B}, {width}]" if exact else f"[{B}, <={width}]"
        raise InputError(f"{name} has shape {list(t.shape)}, expected {want}")
    if not _all_finite(t):
        raise InputError(f"{name} contains NaN or inf")
    if t.shape[1] < width:
        t = torch.nn.functional.pad(t, (0, width - t.shape[1]))
    return t


def bool_rows(x, name: str, B: int, width: int | None, device: torch.device) -> Tensor | None:
    """-> [B] (width None) or [B, width] bool on `device` (fewer columns: padded with False); None
    stays None. Accepts booleans or numbers that are all 0 or 1."""
    if x is None:
        return None
    t = _as_tensor(x, name, device)
    if t.dtype != torch.bool:
        if not bool(((t == 0) | (t == 1)).all()):
            raise InputError(f"{name} must hold 0/1 or booleans")
        t = t != 0
    shape_ok = t.shape == (B,) if width is None else (t.dim() == 2 and t.shape[0] == B
                                                      and t.shape[1] <= width)
    if not shape_ok:
        want = [B] if width is None else f"[{B}, <={width}]"
        raise InputError(f"{name} has shape {list(t.shape)}, expected {want}")
    if width is not None and t.shape[1] < width:
        t = torch.nn.functional.pad(t, (0, width - t.shape[1]), value=False)
    return t


def check_avail_kind(action: str, avail) -> None:
    if avail is not None and action == "gaussian":
        raise InputError("avail (action masks) only apply to categorical policies")


def valid_actions(dim_mask: Tensor, avail: Tensor | None) -> Tensor:
    """dim_mask [B, A] or [A] & avail [B, A] -> valid [B, A]; InputError if a row has no action."""
    if avail is None:
        return dim_mask
    valid = dim_mask & avail
    empty = ~valid.any(-1)
    if bool(empty.any()):
        rows = torch.nonzero(empty).flatten().tolist()[:10]
        raise InputError(f"rows {rows} have no available action (all-zero avail mask)")
    return valid


def _as_tensor(x, name: str, device: torch.device) -> Tensor:
    """A real-valued (bool, int or float) tensor on `device`; InputError for anything else."""
    if isinstance(x, Tensor):
        if x.is_complex():
            raise InputError(f"{name} must be real numbers, got dtype {x.dtype}")
        return x.detach().to(device)
    if not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x)
        except (ValueError, TypeError) as e:  # ragged nesting and the like
            raise InputError(f"{name} must be a rectangular numeric array ({e})") from None
    if x.dtype.kind not in "biuf":
        raise InputError(f"{name} must be numeric, got dtype {x.dtype}")
    return torch.as_tensor(x, device=device)


def _all_finite(t: Tensor) -> bool:
    """One reduction instead of isfinite's four passes; exact check only if the sum is not finite."""
    return math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())


def _short(value, limit: int = 64) -> str:
    """repr of a user value, cut so an error never echoes a huge input back."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"
