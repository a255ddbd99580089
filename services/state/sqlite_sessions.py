"""The local backend's session store: one SQLite database in the state dir, shared by the workers.

    sessions.sqlite -> sessions/<random>.sqlite   a symlink to the live database (WAL mode)

Tables: `sess` (one row per session: last use, bytes, the lease of the step in flight), `state` (one
float32 row per (session, agent)) and `stats` (count and bytes, kept by triggers: eviction is O(log n)).

Why a symlink: SQLite names a database's `-wal` and `-shm` files after the file it opened (the symlink's
target), and a connection deletes its `-wal`/`-shm` *by name* when it closes last. Every database this
store starts therefore gets a name of its own, so a connection left on an old one can never delete or
reuse the log of the live one.

Faults (each answered StateUnavailable: HTTP 503 with Retry-After; stateless serving is unaffected):
* Opening fails (read-only or full disk, ...): every session call tries again; the server stays ready.
* `sessions.sqlite` deleted or replaced while serving (the identity, st_dev/st_ino, of what it names
  changed): before each transaction a worker compares it with the database it has open, and moves to
  what the path names now (a new empty store when nothing is there), so workers never split between
  two files. A file put there by hand is used as is (moved under `sessions/` and linked).
* A corrupt database (SQLITE_CORRUPT / SQLITE_NOTADB, at open or while serving): the worker that finds
  it logs an error, starts an empty database and repoints the symlink (the others follow at their next
  transaction); the call that found it answers 503, retry-safe.
In every case the sessions that were lost are reported: their next step answers `session_state: "new"`.
Old databases are deleted once no process has them open. The write-ahead log is bounded: checkpoints
every WAL_CHECKPOINT_PAGES pages, truncated back to WAL_LIMIT_BYTES (a small state volume never fills
with SQLite's own log).
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import secrets
import sqlite3
import stat
import struct
import sys
import time
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Callable

import numpy as np

from .base import SessionBusy, SessionLimits, SessionStep, StateUnavailable, blobs_to_rows, rows_to_blobs

log = logging.getLogger("lorasa.service")

SESSIONS_DB = "sessions.sqlite"  # the symlink
STORES_DIR = "sessions"  # the databases it may point to
WAL_CHECKPOINT_PAGES = 128  # autocheckpoint after this many WAL pages (4 KiB each)
WAL_LIMIT_BYTES = 1 << 20  # a reset WAL is truncated back to this size
_SIDECARS = ("-wal", "-shm", "-journal")
_SHARED = (0x40000000 + 2, 510)  # SQLite's SHARED lock bytes: held by every open WAL-mode connection
_FLOCK = "hhqqi4x"  # struct flock (Linux, 64-bit off_t): l_type, l_whence, l_start, l_len, l_pid

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


class Corrupt(StateUnavailable):
    """The session database is corrupt: it was replaced by an empty one; retry."""


class SqliteSessions:
    def __init__(self, root: Path, hidden: int, limits: SessionLimits,
                 locked: Callable[[], AbstractContextManager]):
        """root: the state dir; locked: the state dir's flock (StateUnavailable on a file-system error).
        Opening failures are not raised here: session calls answer them (and retry) until it opens."""
        self.root, self.hidden, self.limits, self._locked = Path(root), hidden, limits, locked
        self.link = self.root / SESSIONS_DB
        self._db: sqlite3.Connection | None = None
        self._db_id: tuple[int, int] | None = None  # (st_dev, st_ino) of the database self._db has open
        try:
            self._connect()
        except StateUnavailable as e:
            log.warning("session store not available yet (session requests answer 503 until it is): %s", e)

    # --- the session operations ------------------------------------------------------------------
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
                out.append(SessionStep(sid, agents, token, *blobs_to_rows(agents, blobs, self.hidden),
                                       resumed=bool(blobs)))
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
        with self._tx() as db:
            n, b = db.execute("SELECT COUNT(*), COALESCE(SUM(nbytes), 0) FROM sess WHERE touched >= ?",
                              (time.time() - self.limits.ttl_s,)).fetchone()
        return {"sessions": n, "bytes": b}

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _evict(self, db: sqlite3.Connection, now: float) -> None:
        """Drop expired sessions, then the least recently used while over the count or byte bound
        (a session with a step in flight is never evicted). O(log n) per dropped or skipped session:
        the count and bytes come from `stats` (kept by triggers), candidates from the `touched` index
        in order, read lazily (never every session)."""
        free = "(lease IS NULL OR lease_until < ?)"
        order = "FROM sess INDEXED BY sess_touched"
        gone = [r[0] for r in db.execute(f"SELECT session {order} WHERE touched < ? AND {free} LIMIT 1024",
                                         (now - self.limits.ttl_s, now))]
        _drop(db, gone)
        n, total = db.execute("SELECT n, bytes FROM stats").fetchone()
        if n <= self.limits.max_sessions and total <= self.limits.max_bytes:
            return
        over = []
        for sid, nb in db.execute(f"SELECT session, nbytes {order} WHERE {free} ORDER BY touched", (now,)):
            if n <= self.limits.max_sessions and total <= self.limits.max_bytes or n <= 1:
                break
            over.append(sid)
            n, total = n - 1, total - nb
        _drop(db, over)

    # --- transactions ------------------------------------------------------------------------------
    @contextmanager
    def _tx(self):
        """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error) on the database `sessions.sqlite` names now:
        one writer at a time across processes. SQLite's own errors (disk full, read-only, locked past
        the timeout) are StateUnavailable; a corrupt database is replaced by an empty one (Corrupt)."""
        db = self._current()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except sqlite3.Error as e:
            if db.in_transaction:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            if _is_corrupt(e):
                self._replace_corrupt(e)
            raise StateUnavailable(f"{self.link}: {type(e).__name__}: {e}") from None

    def _current(self) -> sqlite3.Connection:
        """The open connection, after moving to another database if `sessions.sqlite` names another
        one now (deleted, replaced, or a corrupt one replaced by another worker), or opening it."""
        if self._db is not None and _identity(self.link) == self._db_id:
            return self._db
        if self._db is not None:
            log.warning("%s names another database now (deleted or replaced while serving, or a corrupt one "
                        "replaced): moving to it (sessions only the old one held are lost: their next steps "
                        "report session_state 'new')", self.link)
            self.close()
        self._connect()
        return self._db

    # --- opening, replacing, cleaning up -------------------------------------------------------------
    def _connect(self) -> None:
        """Open the database `sessions.sqlite` names (creating an empty one when it names none), under
        the state dir's flock: workers starting together set it up one at a time."""
        with self._locked():
            try:
                path = self._live_store() or self._new_store()
                try:
                    db = _open(path)
                except sqlite3.DatabaseError as e:
                    if not _is_corrupt(e):
                        raise
                    log.error("session store %s is corrupt (%s): starting an empty one; its sessions are lost "
                              "(their next steps report session_state 'new')", path, e)
                    db = _open(self._new_store())
            except sqlite3.Error as e:
                raise StateUnavailable(f"{self.link}: cannot open the session store: {type(e).__name__}: "
                                       f"{e}") from None
            self._db, self._db_id = db, _identity(self.link)
            self._remove_old_stores()

    def _replace_corrupt(self, error: sqlite3.Error) -> None:
        """Start an empty database in place of the corrupt one this worker has open (unless another
        worker did already), then raise Corrupt (this call fails; the next one uses the new store)."""
        old_id = self._db_id
        self.close()
        with self._locked():
            if _identity(self.link) == old_id:
                log.error("session store %s is corrupt (%s): starting an empty one; its sessions are lost "
                          "(their next steps report session_state 'new')", os.path.realpath(self.link), error)
                self._new_store()
        raise Corrupt(f"{self.link} was corrupt ({error}) and was replaced by an empty session store: "
                      "retry (the sessions it held are lost)")

    def _live_store(self) -> Path | None:
        """The link to open, if `sessions.sqlite` names a regular file (one put there by hand is first
        moved under sessions/ with its log, and linked); None when it names nothing usable."""
        try:
            st = os.lstat(self.link)
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(st.st_mode):
            return self.link if _identity(self.link) is not None and os.path.isfile(self.link) else None
        if not stat.S_ISREG(st.st_mode):
            return None
        if _held(self.link):
            raise StateUnavailable(f"{self.link} is a plain file another process has open (a server of an "
                                   "older version on this state dir?): stop it first")
        store = self._store_name()
        for suffix in ("-wal", ""):  # the log first: the database never appears without it
            if os.path.exists(f"{self.link}{suffix}"):
                os.replace(f"{self.link}{suffix}", f"{store}{suffix}")
        _unlink(Path(f"{self.link}-shm"))
        _relink(self.link, store)
        return self.link

    def _new_store(self) -> Path:
        """Point `sessions.sqlite` at a new, empty database file of its own name; -> the link."""
        store = self._store_name()
        store.touch()
        try:
            _relink(self.link, store)
        except BaseException:
            _unlink(store)  # (a failure retried on every call must not leave a file each time)
            raise
        return self.link

    def _store_name(self) -> Path:
        (self.root / STORES_DIR).mkdir(exist_ok=True)
        return self.root / STORES_DIR / f"{secrets.token_hex(8)}.sqlite"

    def _remove_old_stores(self) -> None:
        """Delete the databases (and their logs) under sessions/ that are not the live one and that no
        process has open any more (best effort: one still open is deleted at a later connect)."""
        live = os.path.realpath(self.link)
        for f in (self.root / STORES_DIR).glob("*.sqlite"):
            if str(f.resolve()) == live or _held(f):
                continue
            for suffix in ("", *_SIDECARS):
                _unlink(Path(f"{f}{suffix}"))


def _open(path: Path) -> sqlite3.Connection:
    """A connection in WAL mode with the schema and a bounded log (raises sqlite3 errors)."""
    db = sqlite3.connect(str(path), timeout=30.0, isolation_level=None, check_same_thread=False)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=OFF")  # state of live episodes, not data of record
        db.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
        db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES}")
        if db.execute("SELECT COUNT(*) FROM sqlite_master WHERE name = 'sess'").fetchone()[0]:
            cols = {r[1] for r in db.execute("PRAGMA table_info(sess)")}
            if "lease" not in cols:  # a sessions file from before leases: sessions are disposable
                db.executescript("DROP TABLE sess; DROP TABLE IF EXISTS state;")
        db.executescript(SCHEMA)  # idempotent
        if db.execute("SELECT COUNT(*) FROM stats").fetchone()[0] == 0:  # new, or from before it
            db.execute("INSERT INTO stats SELECT 0, COUNT(*), COALESCE(SUM(nbytes), 0) FROM sess")
    except BaseException:
        db.close()
        raise
    return db


def _drop(db: sqlite3.Connection, sessions: list[str]) -> None:
    db.executemany("DELETE FROM state WHERE session = ?", [(s,) for s in sessions])
    db.executemany("DELETE FROM sess WHERE session = ?", [(s,) for s in sessions])


def _is_corrupt(e: sqlite3.Error) -> bool:
    name = getattr(e, "sqlite_errorname", "") or ""
    return name.startswith("SQLITE_CORRUPT") or name == "SQLITE_NOTADB"


def _identity(path: Path) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file at `path` (symlinks followed), None if there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _held(path: Path) -> bool:
    """Another process has this SQLite database open (in WAL mode: it holds a SHARED lock). Never
    call it on a database this process has open: closing any descriptor of a file drops this
    process's POSIX locks on it. Elsewhere than Linux (another struct flock layout): always True."""
    if not sys.platform.startswith("linux"):
        return True
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        probe = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, *_SHARED, 0)
        return struct.unpack(_FLOCK, fcntl.fcntl(fd, fcntl.F_GETLK, probe))[0] != fcntl.F_UNLCK
    except OSError:
        return True  # cannot tell: keep it
    finally:
        os.close(fd)


def _relink(link: Path, store: Path) -> None:
    """Atomically make `link` a relative symlink to `store`."""
    tmp = link.with_name(f".{link.name}.{secrets.token_hex(4)}")
    os.symlink(os.path.relpath(store, link.parent), tmp)
    try:
        os.replace(tmp, link)
    except OSError as e:
        _unlink(tmp)
        raise StateUnavailable(f"{link}: cannot make it a link to the session store {store.name}: "
                               f"{type(e).__name__}: {e.strerror or e}") from None


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError as e:
        if e.errno != errno.ENOENT:
            log.warning("cannot remove %s: %s", path, e.strerror or e)
