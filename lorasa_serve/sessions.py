"""Recurrent state per (session, agent) for in-process callers that do not keep it (`Engine.act_session`).

Bounded three ways: at most `max_sessions` sessions, at most `max_bytes` bytes of stored state, and a
session untouched for `ttl_s` seconds is forgotten; past a bound the least recently used session is
evicted first (the one just written is always kept). Stored rows are copies with their own storage
(a view of one row of a batch's output would keep the whole batch tensor alive), so `nbytes` is the
memory the store really holds. Thread-safe: one lock around the ordered dict; tensors are replaced,
never mutated in place.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict

import torch
from torch import Tensor


class SessionStore:
    def __init__(self, hidden: int, max_sessions: int = 10_000, device: str | torch.device = "cpu",
                 max_bytes: int = 256 << 20, ttl_s: float | None = None):
        if max_sessions < 1 or max_bytes < 1:
            raise ValueError("max_sessions and max_bytes must be >= 1")
        if ttl_s is not None and ttl_s <= 0:
            raise ValueError("ttl_s must be > 0 (or None: no expiry)")
        self.hidden = hidden
        self.max_sessions, self.max_bytes, self.ttl_s = max_sessions, max_bytes, ttl_s
        self.device = torch.device(device)
        self._lock = threading.Lock()
        self._sessions: OrderedDict[str, dict[str, Tensor]] = OrderedDict()  # least recently used first
        self._touched: dict[str, float] = {}
        self._bytes: dict[str, int] = {}
        self.nbytes = 0  # bytes of state held (sum over stored rows)
        self.evictions = 0

    def __len__(self) -> int:
        with self._lock:
            self._expire(time.monotonic())
            return len(self._sessions)

    def __contains__(self, session_id: str) -> bool:
        with self._lock:
            self._expire(time.monotonic())
            return session_id in self._sessions

    def get(self, session_id: str, agent_ids: list[str]) -> tuple[Tensor, Tensor]:
        """-> (state [B, H], is_new [B] bool): zeros and True for (session, agent) never seen."""
        zero = torch.zeros(self.hidden, device=self.device)
        with self._lock:
            now = time.monotonic()
            self._expire(now)
            sess = self._sessions.get(session_id)
            if sess is not None:
                self._sessions.move_to_end(session_id)
                self._touched[session_id] = now
            rows = [sess.get(a) if sess is not None else None for a in agent_ids]
        state = torch.stack([zero if r is None else r for r in rows]) if rows else \
            torch.zeros(0, self.hidden, device=self.device)
        is_new = torch.tensor([r is None for r in rows], dtype=torch.bool, device=self.device)
        return state, is_new

    def put(self, session_id: str, agent_ids: list[str], state: Tensor) -> None:
        """Store copies of the rows of `state` [B, H]; evicts least recently used sessions past a bound."""
        rows = state.detach().to(self.device).clone()  # [B, H] own storage, B rows only
        copies = list(rows.unbind(0)) if len(agent_ids) == 1 else [r.clone() for r in rows]
        with self._lock:
            now = time.monotonic()
            self._expire(now)
            sess = self._sessions.setdefault(session_id, {})
            self._sessions.move_to_end(session_id)
            self._touched[session_id] = now
            for a, row in zip(agent_ids, copies):
                sess[a] = row
            size = sum(t.untyped_storage().nbytes() for t in sess.values())
            self.nbytes += size - self._bytes.get(session_id, 0)
            self._bytes[session_id] = size
            while len(self._sessions) > 1 and (len(self._sessions) > self.max_sessions
                                                or self.nbytes > self.max_bytes):
                self._drop(next(iter(self._sessions)))
                self.evictions += 1

    def reset(self, session_id: str) -> bool:
        """Forget a session; True if it existed."""
        with self._lock:
            if session_id not in self._sessions:
                return False
            self._drop(session_id)
            return True

    def session_ids(self) -> list[str]:
        with self._lock:
            self._expire(time.monotonic())
            return list(self._sessions)

    def _expire(self, now: float) -> None:
        if self.ttl_s is None:
            return
        while self._sessions:
            oldest = next(iter(self._sessions))
            if now - self._touched[oldest] < self.ttl_s:
                return
            self._drop(oldest)

    def _drop(self, session_id: str) -> None:
        del self._sessions[session_id]
        del self._touched[session_id]
        self.nbytes -= self._bytes.pop(session_id)
