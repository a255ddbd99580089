"""The `act` interface every backend implements (`Engine`: torch; `OnnxEngine`: onnxruntime).

Code that only acts (the benchmarks, `lorasa-eval`, the exporters' verification) takes an
`ActBackend`, so any backend can be swapped in. Both backends check their inputs with
`lorasa_serve.validation`: the same bad input gives the same typed error from either.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from .spec import PolicySpec


@dataclass
class ActOutput:
    actions: Tensor  # Gaussian [B, act_max] float (zero past each agent's act_dim); Categorical [B] int64
    log_probs: Tensor  # [B]
    state: Tensor | None  # [B, hidden] next recurrent state (None for a feed-forward policy)
    versions: list[int] | None = None  # adapter version used for each row (act_session only)


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
            generator: torch.Generator | None = None) -> ActOutput:
        """agent_ids [B] (ids or indices); obs [B, <=obs_max]; state [B, H] or None (zeros);
        reset [B] bool; avail [B, <=act_max] (Categorical only) -> actions, log-probs, next state."""
        ...
