"""The local state backend (default): a state directory shared by the workers of one server.

    manifest.json                         {"format": 1, "backbone_fingerprint": ..., "merged": [...],
                                           "adapters": {agent_id: {"version": v, "file": ..., "sha256": ...}}}
    adapters/<agent_id>.v<version>.safetensors   immutable; written before the manifest names it
    generation                            one byte appended per publish (its size only grows)
    .lock                                 flock held by a publisher during read-modify-write
    sessions.sqlite                       sessions (WAL): state rows, LRU/TTL/byte bounds, step leases;
                                          `stats` (count, bytes: kept by triggers) makes eviction O(log n)

Every adapter file read back is checked against the manifest's sha256 (a mismatch is a load error:
the worker keeps its previous version). If sessions.sqlite is deleted or replaced while serving (its
st_dev/st_ino change), session calls fail closed with StateUnavailable (503) rather than split.

Publishing: under an exclusive flock, write the adapter file, then atomically replace the manifest
(readers take no lock: every file the manifest names is complete), then grow `generation`. A worker
compares the generation's size once per batch (one `stat`); a new worker starts from "never seen", so
its first sync loads everything the directory has published (a restart or respawn serves the uploads).
Not for network file systems (flock, SQLite): use Redis for replicas on several hosts.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np

from lorasa_serve.artifacts import atomic_write
from lorasa_serve.files import read_file
from lorasa_serve.spec import check_agent_id

from .base import (MAX_BLOB_BYTES, Published, SessionBusy, SessionLimits, SessionStep, StateConfigError,
                   StateUnavailable, blobs_to_rows, digest, rows_to_blobs, verified)

log = logging.getLogger("lorasa.service")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
KEEP_VERSIONS = 3  # adapter files kept per agent (older ones are deleted when publishing)

SCHEMA = """
CREATE TABLE IF NOT EXISTS sess (session TEXT PRIMARY KEY, touched REAL NOT NULL, nbytes INTEGER NOT NULL,
                                 lease TEXT, lease_until REAL);
CREATE INDEX IF NOT EXISTS sess_touched ON sess (touched);
CREATE TABLE IF NOT EXISTS state (session TEXT NOT NULL, agent TEXT NOT NULL, h BLOB NOT NULL,
                                  PRIMARY KEY (session, agent));
CREATE TABLE IF NOT EXISTS stats (id INTEGER PRIMARY KEY CHECK (id = 0), n INTEGER NOT NULL,
                                  bytes INTEGER NOT NULL);
CREATE TRIGGER IF NOT EXISTS sess_ins AFTER INSERT ON sess BEGIN
  UPDATE stats SET n = n + 1, bytes = bytes + NEW.nbytes; END;
CREATE TRIGGER IF NOT EXISTS sess_del AFTER DELETE ON sess BEGIN
  UPDATE stats SET n = n - 1, bytes = bytes - OLD.nbytes; END;
CREATE TRIGGER IF NOT EXISTS sess_upd AFTER UPDATE OF nbytes ON sess BEGIN
  UPDATE stats SET bytes = bytes + NEW.nbytes - OLD.nbytes; END;
"""
SESSIONS_DB = "sessions.sqlite"


class LocalState:
    local_check = True  # generation() is one stat

    def __init__(self, state_dir: str | Path, fingerprint: str, hidden: int, limits: SessionLimits):
        self.root = Path(state_dir)
        (self.root / "adapters").mkdir(parents=True, exist_ok=True)
        self.fingerprint, self.hidden, self.limits = fingerprint, hidden, limits
        self.description = f"local state dir {self.root}"
        self._manifest()  # fail fast on a state dir made for another backbone
        self._db_path = self.root / SESSIONS_DB
        self._db: sqlite3.Connection | None = None  # None: sessions.sqlite could not be opened (yet)
        self._db_id: tuple[int, int] | None = None  # the file this connection writes to
        try:
            self._open_db()
        except StateUnavailable as e:  # session calls answer it (503) and try again; adapters are unaffected
            log.error("%s (session requests answer 503 until it can be opened; stateless requests are "
                      "served)", e)

    def _open_db(self) -> None:
        """Open sessions.sqlite (WAL, schema); StateUnavailable when it cannot be (a file that is not a
        database, a state dir it cannot be created in, ...)."""
        db = None
        try:
            with self._locked():  # workers start together: WAL and schema set-up one at a time (else "locked")
                db = sqlite3.connect(str(self._db_path), timeout=30.0, isolation_level=None,
                                     check_same_thread=False)
                db_id = _identity(self._db_path)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=OFF")  # state of live episodes, not data of record
                if db.execute("SELECT COUNT(*) FROM sqlite_master WHERE name = 'sess'").fetchone()[0]:
                    cols = {r[1] for r in db.execute("PRAGMA table_info(sess)")}
                    if "lease" not in cols:  # a sessions file from before leases: sessions are disposable
                        db.executescript("DROP TABLE sess; DROP TABLE IF EXISTS state;")
                db.executescript(SCHEMA)  # idempotent; several workers may run it at once
                if db.execute("SELECT COUNT(*) FROM stats").fetchone()[0] == 0:  # new, or from before it
                    db.execute("INSERT INTO stats SELECT 0, COUNT(*), COALESCE(SUM(nbytes), 0) FROM sess")
        except (sqlite3.Error, StateUnavailable) as e:
            if db is not None:
                db.close()
            raise StateUnavailable(f"{self._db_path}: the session store cannot be opened: "
                                   f"{type(e).__name__}: {e}") from None
        self._db, self._db_id = db, db_id

    # --- adapters -------------------------------------------------------------------------------
    def generation(self) -> int:
        try:
            return os.stat(self.root / "generation").st_size
        except FileNotFoundError:
            return 0

    def published(self) -> Published:
        m = self._manifest()
        return Published({a: int(e["version"]) for a, e in m["adapters"].items()}, frozenset(m["merged"]))

    def adapter_blob(self, agent_id: str, version: int) -> bytes:
        entry = self._manifest()["adapters"].get(agent_id, {})
        path = self.root / _adapter_file(agent_id, version)
        if int(entry.get("version", 1)) != version:  # superseded since `published()`: read again next check
            raise KeyError(f"adapter {agent_id!r} v{version} is no longer the published one in {self.root}")
        return verified(read_file(path, MAX_BLOB_BYTES), entry.get("sha256"), str(path))

    def publish_adapter(self, agent_id: str, data: bytes) -> int:
        check_agent_id(agent_id)
        with self._locked():
            m = self._manifest()
            version = int(m["adapters"].get(agent_id, {}).get("version", 1)) + 1
            self._put_adapter(m, agent_id, version, data)
            self._write(m)
            for v in range(max(1, version - 2 * KEEP_VERSIONS), version - KEEP_VERSIONS + 1):
                (self.root / _adapter_file(agent_id, v)).unlink(missing_ok=True)
            return version

    def publish_merged(self, agent_ids: list[str], merge: bool) -> tuple[str, ...]:
        with self._locked():
            m = self._manifest()
            merged = set(m["merged"]) | set(agent_ids) if merge else set(m["merged"]) - set(agent_ids)
            m["merged"] = sorted(merged)
            self._write(m)
            return tuple(m["merged"])

    def reseed(self, versions: dict[str, int], blob: Callable[[str], bytes], merged: set[str]) -> None:
        with self._locked():
            m = self._manifest()
            behind = [a for a, v in versions.items()
                      if v > int(m["adapters"].get(a, {}).get("version", 1))]
            for a in behind:
                self._put_adapter(m, a, versions[a], blob(a))
            if behind:
                self._write(m)

    def _put_adapter(self, m: dict, agent_id: str, version: int, data: bytes) -> None:
        rel = _adapter_file(agent_id, version)
        atomic_write(self.root / rel, data)
        m["adapters"][agent_id] = {"version": version, "file": rel, "sha256": digest(data)}

    def _manifest(self) -> dict:
        path = self.root / MANIFEST
        if not path.exists():
            return {"adapters": {}, "merged": []}
        try:
            d = json.loads(path.read_text())
            m = {"fp": d["backbone_fingerprint"], "adapters": dict(d["adapters"]), "merged": list(d["merged"])}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise StateConfigError(f"{path}: unreadable manifest: {e}") from None
        if m.pop("fp") != self.fingerprint:
            raise StateConfigError(f"{path} was written for backbone {d['backbone_fingerprint'][:12]}, this "
                                   f"policy's is {self.fingerprint[:12]}: use another LORASA_STATE_DIR")
        return m

    def _write(self, m: dict) -> None:
        atomic_write(self.root / MANIFEST, json.dumps(
            {"format": MANIFEST_FORMAT, "backbone_fingerprint": self.fingerprint, "adapters": m["adapters"],
             "merged": m["merged"]}, indent=1).encode())
        with open(self.root / "generation", "ab") as f:
            f.write(b".")

    @contextmanager
    def _locked(self):
        """The publishers' flock. A file-system error inside (disk full, read-only) is StateUnavailable
        (503 with Retry-After): the manifest is replaced atomically, so nothing half-written is published."""
        try:
            with open(self.root / ".lock", "a+") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)
        except OSError as e:
            raise StateUnavailable(f"{self.root}: {type(e).__name__}: {e.strerror or e}") from None

    # --- sessions -------------------------------------------------------------------------------
    def open_steps(self, items: list[tuple[str, list[str]]]) -> list[SessionStep | SessionBusy]:
        now, out = time.time(), []
        with self._tx() as db:
            for sid, agents in items:
                row = db.execute("SELECT touched, lease, lease_until FROM sess WHERE session = ?",
                                 (sid,)).fetchone()
                if row is not None and row[1] is not None and row[2] > now:
                    out.append(SessionBusy(f"session {sid!r} has another step in flight"))
                    continue
                if row is not None and row[0] < now - self.limits.ttl_s:  # expired: starts afresh
                    db.execute("DELETE FROM state WHERE session = ?", (sid,))
                    db.execute("UPDATE sess SET nbytes = 0 WHERE session = ?", (sid,))
                token = secrets.token_hex(8)
                if row is None:
                    db.execute("INSERT INTO sess VALUES (?, ?, 0, ?, ?)",
                               (sid, now, token, now + self.limits.lease_s))
                else:
                    db.execute("UPDATE sess SET lease = ?, lease_until = ? WHERE session = ?",
                               (token, now + self.limits.lease_s, sid))
                blobs = dict(db.execute("SELECT agent, h FROM state WHERE session = ?", (sid,)))
                out.append(SessionStep(sid, agents, token, *blobs_to_rows(agents, blobs, self.hidden)))
        return out

    def close_steps(self, steps: list[tuple[SessionStep, np.ndarray | None]]) -> list[bool]:
        now, ok = time.time(), []
        with self._tx() as db:
            for step, state in steps:
                row = db.execute("SELECT lease, nbytes FROM sess WHERE session = ?",
                                 (step.session_id,)).fetchone()
                if row is None or row[0] != step.token:
                    ok.append(False)
                    continue
                if state is not None:
                    db.executemany("INSERT OR REPLACE INTO state VALUES (?, ?, ?)",
                                   [(step.session_id, a, b) for a, b in rows_to_blobs(step.agent_ids, state)])
                    nbytes = db.execute("SELECT COALESCE(SUM(LENGTH(h)), 0) FROM state WHERE session = ?",
                                        (step.session_id,)).fetchone()[0]
                    db.execute("UPDATE sess SET touched = ?, nbytes = ?, lease = NULL WHERE session = ?",
                               (now, nbytes, step.session_id))
                elif row[1] == 0:  # a new session whose first step failed: forget it
                    db.execute("DELETE FROM sess WHERE session = ?", (step.session_id,))
                else:
                    db.execute("UPDATE sess SET lease = NULL WHERE session = ?", (step.session_id,))
                ok.append(True)
            self._evict(db, now)
        return ok

    def reset_session(self, session_id: str) -> bool:
        with self._tx() as db:
            db.execute("DELETE FROM state WHERE session = ?", (session_id,))
            return db.execute("DELETE FROM sess WHERE session = ?", (session_id,)).rowcount > 0

    def session_stats(self) -> dict[str, int]:
        with self._tx():
            n, b = self._db.execute("SELECT COUNT(*), COALESCE(SUM(nbytes), 0) FROM sess WHERE touched >= ?",
                                    (time.time() - self.limits.ttl_s,)).fetchone()
        return {"sessions": n, "bytes": b}

    def _evict(self, db: sqlite3.Connection, now: float) -> None:
        """Drop expired sessions, then the least recently used while over the count or byte bound
        (a session with a step in flight is never evicted). O(log n) per dropped or skipped session:
        the count and bytes come from `stats` (kept by triggers), candidates from the `touched` index
        in order, read lazily (never every session)."""
        free = "(lease IS NULL OR lease_until < ?)"
        order = "FROM sess INDEXED BY sess_touched"
        gone = [r[0] for r in db.execute(f"SELECT session {order} WHERE touched < ? AND {free} LIMIT 1024",
                                         (now - self.limits.ttl_s, now))]
        self._drop(db, gone)
        n, total = db.execute("SELECT n, bytes FROM stats").fetchone()
        if n <= self.limits.max_sessions and total <= self.limits.max_bytes:
            return
        over = []
        for sid, nb in db.execute(f"SELECT session, nbytes {order} WHERE {free} ORDER BY touched", (now,)):
            if n <= self.limits.max_sessions and total <= self.limits.max_bytes or n <= 1:
                break
            over.append(sid)
            n, total = n - 1, total - nb
        self._drop(db, over)

    @staticmethod
    def _drop(db: sqlite3.Connection, sessions: list[str]) -> None:
        db.executemany("DELETE FROM state WHERE session = ?", [(s,) for s in sessions])
        db.executemany("DELETE FROM sess WHERE session = ?", [(s,) for s in sessions])

    @contextmanager
    def _tx(self):
        """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error): one writer at a time across processes.
        SQLite's own errors (disk full, read-only, a corrupt file, locked past the timeout) are
        StateUnavailable (503 with Retry-After): the next call tries again."""
        self._check_db()
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.Error as e:
            if self._db.in_transaction:
                try:
                    self._db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            raise StateUnavailable(f"{self._db_path}: {type(e).__name__}: {e}") from None

    def _check_db(self) -> None:
        """Fail closed when sessions.sqlite was deleted or replaced under this connection (it would go
        on writing to a file no other worker reads, while a respawned worker opens a new one: lost
        updates and sessions that diverge, all answered 200). Every session call is then a 503 until
        the server is restarted (sessions are disposable; stateless requests are not affected). One that
        could not be opened (at start) is tried again: every session call is a 503 until it opens."""
        if self._db is None:
            self._open_db()
            return
        if _identity(self._db_path) != self._db_id:
            raise StateUnavailable(f"{self._db_path} was deleted or replaced while serving; session requests "
                                   "fail until the server is restarted")

    def close(self) -> None:
        if self._db is not None:
            self._db.close()


def _identity(path: Path) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file at `path`, None if there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _adapter_file(agent_id: str, version: int) -> str:
    return f"adapters/{agent_id}.v{version}.safetensors"
