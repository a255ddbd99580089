"""The `act` interface every backend implements (`Engine`: torch; `OnnxEngine`: onnxruntime).

Code that only acts (the benchmarks, `lorasa-eval`, the exporters' verification) takes an
`ActBackend`, so any backend can be swapped in. Both backends check their inputs with
`lorasa_serve.protocol` (as the service does): the same bad input gives the same typed error from
either; `act_checked` takes a request that protocol already checked (no second check).
"""
from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from .protocol import ActRequest, ActResult
from .spec import PolicySpec


@runtime_checkable
class ActBackend(Protocol):
    """Mixed-batch acting over one policy: any rows from any agents, in any order."""

    @property
    def spec(self) -> PolicySpec: ...

    @property
    def agent_ids(self) -> list[str]: ...

    def agent_index(self, agent_ids: Sequence[str]) -> np.ndarray:
        """Agent ids -> integer indices [B] that `act` accepts in place of ids."""
        ...

    def forward(self, agent_ids, obs, state=None, reset=None) -> tuple[Tensor, Tensor | None]:
        """Raw head [B, act_max] (Gaussian means or logits) and next state [B, H] (or None)."""
        ...

    def act(self, agent_ids, obs, state=None, reset=None, avail=None, *, deterministic: bool = True,
            generator: torch.Generator | None = None) -> ActResult:
        """agent_ids [B] (ids or indices); obs [B, W] (W: the rows' widest obs_dim .. obs_max); state
        [B, H] or None (zeros); reset [B] bool; avail [B, W'] (the rows' widest act_dim .. act_max;
        Categorical only) -> actions, log-probs, next state."""
        ...

    def act_checked(self, req: ActRequest, *, generator: torch.Generator | None = None) -> ActResult:
        """`act` on a request `lorasa_serve.protocol.check_act` made (no second check)."""
        ...
