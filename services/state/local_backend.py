"""The local state backend (default): a state directory shared by the workers of one server.

    manifest.json                         {"format": 1, "backbone_fingerprint": ..., "merged": [...],
                                           "adapters": {agent_id: {"version": v, "file": ..., "sha256": ...}}}
    adapters/<agent_id>.v<version>.safetensors   immutable; written before the manifest names it
    generation                            one byte appended per publish (its size only grows)
    .lock                                 flock held by a publisher during read-modify-write
    sessions.sqlite -> sessions/<id>.sqlite      sessions (sqlite_sessions.py: SQLite, WAL)

Every adapter file read back is checked against the manifest's sha256 (a mismatch is a load error:
the worker keeps its previous version). A manifest that cannot be read (corrupt, not a regular file,
over MAX_MANIFEST_BYTES) is StateUnavailable (503 with Retry-After; workers keep serving what they
applied) until it is fixed; only a manifest written for another backbone is a StateConfigError.

Publishing: under an exclusive flock, write the adapter file, then atomically replace the manifest
(readers take no lock: every file the manifest names is complete), then grow `generation`. A failure
before the manifest is replaced changed nothing (StateUnavailable: safe to retry); one after it (the
generation could not be grown) is StateOutcomeUnknown: the version is published, and running workers
may only notice it at the next publish. A worker compares the generation's size once per batch (one
`stat`); a new worker starts from "never seen", so its first sync loads everything the directory has
published (a restart or respawn serves the uploads).
Not for network file systems (flock, SQLite): use Redis for replicas on several hosts.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np

from lorasa_serve.artifacts import atomic_write
from lorasa_serve.errors import CorruptFileError
from lorasa_serve.files import read_file
from lorasa_serve.spec import check_agent_id

from .base import (MAX_BLOB_BYTES, Published, SessionBusy, SessionLimits, SessionStep, StateConfigError,
                   StateOutcomeUnknown, StateUnavailable, digest, verified)
from .sqlite_sessions import SqliteSessions

log = logging.getLogger("lorasa.service")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
MAX_MANIFEST_BYTES = 16 << 20  # a manifest is read only if it is at most this big
KEEP_VERSIONS = 3  # adapter files kept per agent (older ones are deleted when publishing)


class LocalState:
    local_check = True  # generation() is one stat

    def __init__(self, state_dir: str | Path, fingerprint: str, hidden: int, limits: SessionLimits):
        """Only a state dir made for another backbone raises (StateConfigError): file-system faults
        (read-only, full, a corrupt manifest or session store) are answered by the calls that need
        them (StateUnavailable), which retry until they are fixed."""
        self.root = Path(state_dir)
        self.fingerprint, self.hidden, self.limits = fingerprint, hidden, limits
        self.description = f"local state dir {self.root}"
        try:
            (self.root / "adapters").mkdir(parents=True, exist_ok=True)
        except OSError:  # read-only or full: publishing answers it (atomic_write makes the dir)
            pass
        try:
            self._manifest()  # fail fast on a state dir made for another backbone
        except StateUnavailable:  # unreadable now: the runtime's sync reports it and retries
            pass
        self.sessions = SqliteSessions(self.root, hidden, limits, self._locked)

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
            self._commit(m, f"adapter v{version} of {agent_id!r}")
            self._prune(agent_id, version)
            return version

    def publish_merged(self, agent_ids: list[str], merge: bool) -> tuple[str, ...]:
        with self._locked():
            m = self._manifest()
            merged = set(m["merged"]) | set(agent_ids) if merge else set(m["merged"]) - set(agent_ids)
            m["merged"] = sorted(merged)
            self._commit(m, f"the merged flags {m['merged']}")
            return tuple(m["merged"])

    def reseed(self, versions: dict[str, int], blob: Callable[[str], bytes], merged: set[str]) -> None:
        with self._locked():
            m = self._manifest()
            behind = [a for a, v in versions.items()
                      if v > int(m["adapters"].get(a, {}).get("version", 1))]
            for a in behind:
                self._put_adapter(m, a, versions[a], blob(a))
            if behind:
                self._commit(m, f"the re-seeded versions {versions}")

    def _put_adapter(self, m: dict, agent_id: str, version: int, data: bytes) -> None:
        rel = _adapter_file(agent_id, version)
        atomic_write(self.root / rel, data)
        m["adapters"][agent_id] = {"version": version, "file": rel, "sha256": digest(data)}

    def _prune(self, agent_id: str, version: int) -> None:
        """Delete the adapter files older than the KEEP_VERSIONS newest (best effort: the upload is
        published; a file left here is deleted by a later upload's pruning)."""
        for v in range(max(1, version - 2 * KEEP_VERSIONS), version - KEEP_VERSIONS + 1):
            try:
                (self.root / _adapter_file(agent_id, v)).unlink(missing_ok=True)
            except OSError as e:
                log.warning("cannot delete an old adapter file: %s", e)

    def _manifest(self) -> dict:
        """{"adapters": {agent: {"version", "file", "sha256"}}, "merged": [...]}; StateUnavailable when
        it cannot be read or is malformed, StateConfigError when it was written for another backbone."""
        path = self.root / MANIFEST
        if not os.path.lexists(path):
            return {"adapters": {}, "merged": []}
        try:
            d = json.loads(read_file(path, MAX_MANIFEST_BYTES))
            fp, adapters, merged = d["backbone_fingerprint"], dict(d["adapters"]), list(d["merged"])
            if not isinstance(fp, str) or not all(isinstance(a, str) for a in merged) or not all(
                    isinstance(e, dict) and isinstance(e.get("version"), int) and e["version"] >= 1
                    for e in adapters.values()):
                raise ValueError("malformed fields")
        except (CorruptFileError, ValueError, KeyError, TypeError, RecursionError) as e:
            raise StateUnavailable(f"{path}: unreadable manifest (fix or restore it; the workers keep serving "
                                   f"what they applied): {type(e).__name__}: {str(e)[:200]}") from None
        if fp != self.fingerprint:
            raise StateConfigError(f"{path} was written for backbone {fp[:12]}, this policy's is "
                                   f"{self.fingerprint[:12]}: use another LORASA_STATE_DIR")
        return {"adapters": adapters, "merged": merged}

    def _commit(self, m: dict, what: str) -> None:
        """Replace the manifest atomically (a failure changed nothing), then grow the generation (a
        failure then is StateOutcomeUnknown: `what` is published, running workers may not notice it)."""
        atomic_write(self.root / MANIFEST, json.dumps(
            {"format": MANIFEST_FORMAT, "backbone_fingerprint": self.fingerprint, "adapters": m["adapters"],
             "merged": m["merged"]}, indent=1).encode())
        try:
            with open(self.root / "generation", "ab") as f:
                f.write(b".")
        except OSError as e:
            raise StateOutcomeUnknown(
                f"{what} was published ({self.root / MANIFEST} names it), but {self.root / 'generation'} could "
                f"not be grown ({type(e).__name__}: {e.strerror or e}): running workers may only apply it at "
                "the next publish or restart") from None

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

    # --- sessions: sqlite_sessions.SqliteSessions ----------------------------------------------------
    def open_steps(self, items: list[tuple[str, list[str]]]) -> list[SessionStep | SessionBusy]:
        return self.sessions.open_steps(items)

    def close_steps(self, steps: list[tuple[SessionStep, np.ndarray | None]]) -> list[bool]:
        return self.sessions.close_steps(steps)

    def reset_session(self, session_id: str) -> bool:
        return self.sessions.reset_session(session_id)

    def session_stats(self) -> dict[str, int]:
        return self.sessions.session_stats()

    def close(self) -> None:
        self.sessions.close()


def _adapter_file(agent_id: str, version: int) -> str:
    return f"adapters/{agent_id}.v{version}.safetensors"
