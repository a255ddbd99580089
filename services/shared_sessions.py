"""Recurrent session state shared by every worker process: SQLite (WAL) in the state directory.

Same interface as `lorasa_serve.sessions.SessionStore` (get / put / reset), used when the server runs
several workers, because consecutive requests of one session may land on different workers. One
connection per process, used only by that process's batcher thread. Steps of one session must be
sequential (a client waits for step t's answer before sending step t+1, as an environment loop does);
the store then always holds the latest state. Bounded: the least recently used sessions are evicted.
"""
from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

SCHEMA = """
CREATE TABLE IF NOT EXISTS sess (session TEXT PRIMARY KEY, touched REAL NOT NULL);
CREATE INDEX IF NOT EXISTS sess_touched ON sess (touched);
CREATE TABLE IF NOT EXISTS state (session TEXT NOT NULL, agent TEXT NOT NULL, h BLOB NOT NULL,
                                  PRIMARY KEY (session, agent));
"""


class SharedSessionStore:
    def __init__(self, path: str | Path, hidden: int, max_sessions: int):
        self.hidden = hidden
        self.max_sessions = max_sessions
        self.evictions = 0
        self._db = sqlite3.connect(str(path), timeout=30.0, isolation_level=None,
                                   check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=OFF")  # state is a cache of a live episode, not data
        self._db.executescript(SCHEMA)  # idempotent; several workers may run it at once

    def get(self, session_id: str, agent_ids: list[str]) -> tuple[Tensor, Tensor]:
        """-> (state [B, H], is_new [B] bool): zeros and True for (session, agent) never seen."""
        rows = dict(self._db.execute("SELECT agent, h FROM state WHERE session = ?", (session_id,)))
        state = np.zeros((len(agent_ids), self.hidden), dtype=np.float32)
        is_new = np.ones(len(agent_ids), dtype=bool)
        for i, a in enumerate(agent_ids):
            blob = rows.get(a)
            if blob is not None and len(blob) == 4 * self.hidden:
                state[i] = np.frombuffer(blob, dtype=np.float32)
                is_new[i] = False
        return torch.from_numpy(state), torch.from_numpy(is_new)

    def put(self, session_id: str, agent_ids: list[str], state: Tensor) -> None:
        """Store rows of `state` [B, H]; evicts the least recently used sessions past the bound."""
        rows = state.detach().to("cpu", torch.float32).numpy()
        with self._tx():
            new = self._db.execute("SELECT 1 FROM sess WHERE session = ?", (session_id,)).fetchone() is None
            self._db.execute("INSERT OR REPLACE INTO sess VALUES (?, ?)", (session_id, time.time()))
            self._db.executemany("INSERT OR REPLACE INTO state VALUES (?, ?, ?)",
                                 [(session_id, a, rows[i].tobytes()) for i, a in enumerate(agent_ids)])
            if new:
                self._evict()

    def reset(self, session_id: str) -> bool:
        with self._tx():
            self._db.execute("DELETE FROM state WHERE session = ?", (session_id,))
            return self._db.execute("DELETE FROM sess WHERE session = ?", (session_id,)).rowcount > 0

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM sess").fetchone()[0]

    def _evict(self) -> None:
        over = len(self) - self.max_sessions
        if over <= 0:
            return
        old = [r[0] for r in self._db.execute("SELECT session FROM sess ORDER BY touched LIMIT ?", (over,))]
        self._db.executemany("DELETE FROM state WHERE session = ?", [(s,) for s in old])
        self._db.executemany("DELETE FROM sess WHERE session = ?", [(s,) for s in old])
        self.evictions += len(old)

    def _tx(self):
        return _Transaction(self._db)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error): one writer at a time across processes."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, *_):
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
        return False
