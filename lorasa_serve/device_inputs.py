"""An act call's inputs on the Engine's device, and the protocol's value rules run there.

Host data (numpy arrays, lists, CPU tensors) is checked by `lorasa_serve.protocol` on the host and
then copied to the device (`Inputs.upload`). Tensors already on an accelerator would have to be read
back to be checked that way: a host synchronisation and a copy per tensor. `check_on_device` instead
checks their metadata (dtype, shape) on the host and their values as reductions on the device, the
protocol's rules for values:
  * obs and state finite (in float32);
  * obs zero past each row's agent obs_dim (a wrong agent's row otherwise);
  * reset and avail booleans, or numbers that are all 0 or 1;
  * every avail row has an available action among its agent's own,
and reads the result back ONCE: the one deliberate synchronisation of such a call (it runs before any
forward is queued, so it waits only for the checks and for the caller's own pending work).

The protocol stays the one authority for errors and their messages: when any check fails, or an input
comes in a form this path does not take, `check_on_device` returns None and the Engine checks the
request with the protocol on the host (reading device tensors back: the error path may synchronise),
which raises the canonical error. Whatever `check_on_device` accepts, the protocol accepts too, with
the same normalised values (tests/test_device_inputs.py runs both on the same inputs).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import protocol
from .errors import InputError
from .protocol import ActRequest, AgentTable

# dtypes read as numbers (protocol: bool, int, uint, float); others (complex, wide uints, ...) take the host path
_NUMERIC = {torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
            torch.float16, torch.bfloat16, torch.float32, torch.float64}


@dataclass
class Inputs:
    """A checked request's arrays on the engine's device (`ActRequest`'s, after the protocol's checks)."""
    idx: np.ndarray  # [B] int64 agent slots, on the host (the row layout is planned on the host)
    obs: Tensor  # [B, obs_max] float32, zero past each row's obs_dim
    state: Tensor | None  # [B, H] float32 (None: zeros, or a session's)
    reset: Tensor | None  # [B] bool (None: no row resets)
    avail: Tensor | None  # [B, act_max] bool, False past each row's act_dim (None: all available)

    @property
    def n(self) -> int:
        return len(self.idx)

    @classmethod
    def upload(cls, req: ActRequest, device: torch.device, obs: object = None) -> "Inputs":
        """A request the protocol checked, on `device`. `obs`: the caller's own obs, used as is when it
        already is the checked array as a float32 tensor on `device` (no copy back and forth)."""
        given = obs if isinstance(obs, Tensor) and obs.dtype == torch.float32 and obs.device == device \
            and obs.shape == req.obs.shape else None
        return cls(req.idx, _upload(req.obs, device) if given is None else given.detach(),
                   _upload(req.state, device), _upload(req.reset, device), _upload(req.avail, device))


class DeviceRules:
    """The protocol's per-agent sizes as masks on a device, made once per `AgentTable` and device."""

    def __init__(self, table: AgentTable, device: torch.device):
        self.table, self.device = table, device
        spec = table.spec
        # [S, obs_max] True past each agent's obs_dim (None: every agent sees every column)
        self.padding = None if table.obs_uniform else _upload(
            np.arange(spec.obs_max) >= table.obs_dims[:, None], device)
        # [S, act_max] True below each agent's act_dim (None: every agent has every action)
        self.actions = None if table.act_uniform else _upload(
            np.arange(spec.act_max) < table.act_dims[:, None], device)


def check_on_device(rules: DeviceRules, agent_ids, obs, state, reset, avail,
                    rows: Callable[[np.ndarray], Tensor]) -> Inputs | None:
    """The protocol's checks with values checked on `rules.device` (see the module doc) -> Inputs, or
    None: check this request on the host instead. `agent_ids` are host data (their errors are the
    protocol's own); `rows(idx)` gives idx [B] as int64 on the device (the row layout's cached copy)."""
    table, dev = rules.table, rules.device
    spec = table.spec
    idx = protocol.agent_indices(table, agent_ids)  # [B]; the protocol checks agent ids first, so do we
    B, bad = len(idx), []  # bad: 0-d bool tensors, True where a rule is broken
    x = _tensor(obs, dev)
    if x is None or x.dim() != 2 or x.shape[0] != B or not _width_ok(table, "obs", idx, x.shape[1]):
        return None
    x = x.to(torch.float32)  # [B, w] (beyond float32's range -> inf: refused as the protocol does)
    bad.append(~torch.isfinite(x).all())
    if x.shape[1] < spec.obs_max:
        x = F.pad(x, (0, spec.obs_max - x.shape[1]))  # [B, obs_max]
    if rules.padding is not None:
        bad.append(((x != 0) & rules.padding.index_select(0, rows(idx))).any())
    h = None
    if state is not None:
        h = _tensor(state, dev)
        if not spec.recurrent or h is None or tuple(h.shape) != (B, spec.hidden):
            return None
        h = h.to(torch.float32)
        bad.append(~torch.isfinite(h).all())
    r = None
    if reset is not None:
        r = _bools(_tensor(reset, dev), bad)
        if r is None or tuple(r.shape) != (B,):
            return None
    a = None
    if avail is not None:
        a = _bools(_tensor(avail, dev), bad)
        if spec.action != "categorical" or a is None or a.dim() != 2 or a.shape[0] != B \
                or not _width_ok(table, "avail", idx, a.shape[1]):
            return None
        if a.shape[1] < spec.act_max:
            a = F.pad(a, (0, spec.act_max - a.shape[1]))  # padded with False
        if rules.actions is not None:  # actions past a row's act_dim do not exist: read as unavailable
            a = a & rules.actions.index_select(0, rows(idx))
        bad.append(~a.any(1).all())
    if bool(torch.stack(bad).any()):  # THE read-back of this call (deliberate, see the module doc)
        return None
    return Inputs(idx, x.detach(), None if h is None else h.detach(), r, a)


def _width_ok(table: AgentTable, name: str, idx: np.ndarray, width: int) -> bool:
    """The protocol's width rule (host data only: the width and the rows' agents)."""
    try:
        protocol.check_width(table, name, idx, width)
    except InputError:
        return False
    return True


def _tensor(value, device: torch.device) -> Tensor | None:
    """An input as a tensor on `device`: a tensor there as it is, host data copied there; None for a
    form the protocol should judge (non-numeric, ragged, another accelerator, an exotic dtype)."""
    if isinstance(value, Tensor):
        if value.dtype not in _NUMERIC or value.device.type not in ("cpu", device.type):
            return None
        return _to(value.detach(), device)
    try:
        a = np.asarray(value)
    except (ValueError, TypeError):
        return None
    if a.dtype.kind not in "biuf" or (a.dtype.kind == "u" and a.dtype.itemsize > 1):
        return None
    return _upload(a, device)


def _bools(t: Tensor | None, bad: list) -> Tensor | None:
    """Booleans, or numbers that must all be 0 or 1 (checked on the device: appended to `bad`)."""
    if t is None or t.dtype == torch.bool:
        return t
    bad.append(~((t == 0) | (t == 1)).all())
    return t != 0


def _upload(a: np.ndarray | None, device: torch.device) -> Tensor | None:
    """A host array on `device` (None stays None; on the CPU, a view of it)."""
    if a is None:
        return None
    if not a.flags.writeable or (a.strides and min(a.strides) < 0):
        a = a.copy()  # torch.from_numpy wants a writable array with non-negative strides
    return _to(torch.from_numpy(a), device)


def _to(t: Tensor, device: torch.device) -> Tensor:
    """A tensor on `device`. A copy from pageable host memory is made non_blocking: it is staged before
    this returns (the caller may reuse the memory at once) and does not wait for work already queued on
    the GPU, as a blocking copy does (a synchronisation per input). A pinned source is copied blocking:
    an asynchronous copy would race with the caller's next write into it."""
    if device.type == "cpu" or t.device.type != "cpu":
        return t.to(device)
    return t.to(device, non_blocking=not t.is_pinned())
