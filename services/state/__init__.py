"""Serving state behind one interface (base.StateBackend): local state dir (default) or Redis."""
from __future__ import annotations

from .base import (Published, SessionBusy, SessionLimits, SessionStep, StateBackend, StateConfigError,
                   StateUnavailable)

__all__ = ["Published", "SessionBusy", "SessionLimits", "SessionStep", "StateBackend", "StateConfigError",
           "StateUnavailable", "open_backend"]


def open_backend(redis_url: str, state_dir: str, fingerprint: str, hidden: int,
                 limits: SessionLimits) -> StateBackend:
    """Redis when `redis_url` is set (nothing is kept in `state_dir` then), else the local state dir.
    Opening never touches the network: an unreachable Redis shows up as StateUnavailable on first use."""
    if redis_url:
        from .redis_backend import RedisState
        return RedisState(redis_url, fingerprint, hidden, limits)
    from .local_backend import LocalState
    return LocalState(state_dir, fingerprint, hidden, limits)
