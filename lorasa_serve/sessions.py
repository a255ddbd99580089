"""Recurrent state per (session, agent) for callers that do not keep it (HTTP clients).

Bounded: at most `max_sessions` sessions live; the least recently used one is evicted first.
Thread-safe: one lock around the ordered dict; tensors are replaced, never mutated in place.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import torch
from torch import Tensor


class SessionStore:
    def __init__(self, hidden: int, max_sessions: int = 10_000, device: str | torch.device = "cpu"):
        if max_sessions < 1:
            raise ValueError("max_sessions must be >= 1")
        self.hidden = hidden
        self.max_sessions = max_sessions
        self.device = torch.device(device)
        self._lock = threading.Lock()
        self._sessions: OrderedDict[str, dict[str, Tensor]] = OrderedDict()
        self.evictions = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def __contains__(self, session_id: str) -> bool:
        with self._lock:
            return session_id in self._sessions

    def get(self, session_id: str, agent_ids: list[str]) -> tuple[Tensor, Tensor]:
        """-> (state [B, H], is_new [B] bool): zeros and True for (session, agent) never seen."""
        zero = torch.zeros(self.hidden, device=self.device)
        with self._lock:
            sess = self._sessions.get(session_id)
            if sess is not None:
                self._sessions.move_to_end(session_id)
            rows = [sess.get(a) if sess is not None else None for a in agent_ids]
        state = torch.stack([zero if r is None else r for r in rows]) if rows else \
            torch.zeros(0, self.hidden, device=self.device)
        is_new = torch.tensor([r is None for r in rows], dtype=torch.bool, device=self.device)
        return state, is_new

    def put(self, session_id: str, agent_ids: list[str], state: Tensor) -> None:
        """Store rows of `state` [B, H]; creates the session, evicting the LRU one if full."""
        rows = state.detach()
        with self._lock:
            sess = self._sessions.get(session_id)
            if sess is None:
                while len(self._sessions) >= self.max_sessions:
                    self._sessions.popitem(last=False)
                    self.evictions += 1
                sess = self._sessions[session_id] = {}
            else:
                self._sessions.move_to_end(session_id)
            for i, a in enumerate(agent_ids):
                sess[a] = rows[i]

    def reset(self, session_id: str) -> bool:
        """Forget a session; True if it existed."""
        with self._lock:
            return self._sessions.pop(session_id, None) is not None

    def clear(self) -> None:
        with self._lock:
            self._sessions.clear()

    def session_ids(self) -> list[str]:
        with self._lock:
            return list(self._sessions)
