"""Shared adapter overlay: how a hot swap reaches every worker process.

The state directory (shared by all workers of a server, or by several replicas on a shared volume):

    manifest.json                         {"format": 1, "backbone_fingerprint": ..., "merged": [...],
                                           "adapters": {agent_id: {"version": v, "file": ..., "sha256": ...}}}
    adapters/<agent_id>.v<version>.safetensors   immutable; never rewritten once named in the manifest
    generation                            one byte appended per publish (its size only grows)
    .lock                                 flock held by a publisher during read-modify-write

Publishing (any worker, after full validation): write the adapter file, then atomically replace the
manifest, under an exclusive flock so concurrent uploads get distinct versions. Readers take no lock:
they see either the old or the new manifest, and every file it names is complete. Workers compare
the manifest's (inode, mtime_ns, size) before each batch (one `stat`), and on change load what moved.
Versions are global (manifest) numbers: the shipped adapter is version 1, each upload adds 1.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from lorasa_serve.artifacts import atomic_write
from lorasa_serve.spec import check_agent_id

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
KEEP_VERSIONS = 3  # adapter files kept per agent (older ones are deleted when publishing)


class OverlayError(RuntimeError):
    """The state directory belongs to another backbone or its manifest is unreadable."""


@dataclass(frozen=True)
class Manifest:
    fingerprint: str
    adapters: dict[str, dict] = field(default_factory=dict)  # agent -> {"version", "file", "sha256"}
    merged: tuple[str, ...] = ()

    def version(self, agent_id: str) -> int:
        entry = self.adapters.get(agent_id)
        return 1 if entry is None else int(entry["version"])

    def to_json(self) -> str:
        return json.dumps({"format": MANIFEST_FORMAT, "backbone_fingerprint": self.fingerprint,
                           "adapters": self.adapters, "merged": list(self.merged)}, indent=1)


class Overlay:
    def __init__(self, state_dir: str | Path, fingerprint: str):
        self.root = Path(state_dir)
        (self.root / "adapters").mkdir(parents=True, exist_ok=True)
        self.fingerprint = fingerprint
        self._seen = -1  # generation size at the last read
        self.read()  # fail fast on a state dir made for another backbone

    # --- reading (every worker, every batch) ---------------------------------------------------
    def changed(self) -> bool:
        """Cheap: one stat. True when something was published since the last `read`."""
        return self._generation() != self._seen

    def read(self) -> Manifest:
        gen = self._generation()  # before reading: a publish in between is caught next time
        path = self.root / MANIFEST
        if not path.exists():
            self._seen = gen
            return Manifest(self.fingerprint)
        try:
            d = json.loads(path.read_text())
            m = Manifest(d["backbone_fingerprint"], dict(d["adapters"]), tuple(d["merged"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise OverlayError(f"{path}: unreadable manifest: {e}") from None
        if m.fingerprint != self.fingerprint:
            raise OverlayError(f"{path} was written for backbone {m.fingerprint[:12]}, this policy's "
                               f"is {self.fingerprint[:12]}: use another LORASA_STATE_DIR")
        self._seen = gen
        return m

    def invalidate(self) -> None:
        """Forget the last read: the next `changed()` is True (retry after a failed sync)."""
        self._seen = -1

    def adapter_path(self, manifest: Manifest, agent_id: str) -> Path:
        return self.root / manifest.adapters[agent_id]["file"]

    # --- publishing (the worker that received an admin call) ------------------------------------
    def publish_adapter(self, agent_id: str, data: bytes) -> int:
        """Write an already validated adapter and bump its version; returns the new version."""
        check_agent_id(agent_id)
        with self._locked():
            m = self.read()
            version = m.version(agent_id) + 1
            rel = f"adapters/{agent_id}.v{version}.safetensors"
            atomic_write(self.root / rel, data)
            entry = {"version": version, "file": rel, "sha256": hashlib.sha256(data).hexdigest()}
            self._write(Manifest(m.fingerprint, {**m.adapters, agent_id: entry}, m.merged))
            self._prune(agent_id, version)
            return version

    def publish_merged(self, agent_ids: list[str], merge: bool) -> tuple[str, ...]:
        with self._locked():
            m = self.read()
            merged = set(m.merged) | set(agent_ids) if merge else set(m.merged) - set(agent_ids)
            self._write(Manifest(m.fingerprint, m.adapters, tuple(sorted(merged))))
            return tuple(sorted(merged))

    def _write(self, m: Manifest) -> None:
        atomic_write(self.root / MANIFEST, m.to_json().encode())
        with open(self.root / "generation", "ab") as f:
            f.write(b".")

    def _prune(self, agent_id: str, version: int) -> None:
        for v in range(max(1, version - 2 * KEEP_VERSIONS), version - KEEP_VERSIONS + 1):
            (self.root / f"adapters/{agent_id}.v{v}.safetensors").unlink(missing_ok=True)

    @contextmanager
    def _locked(self):
        with open(self.root / ".lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _generation(self) -> int:
        try:
            return os.stat(self.root / "generation").st_size
        except FileNotFoundError:
            return 0
