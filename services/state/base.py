"""The serving-state boundary: what every worker and replica shares, behind one interface.

State = adapter blobs by (agent, version), one monotonic version counter per agent (the shipped
adapter is version 1, every upload adds at least 1), the merged flags, and sessions (recurrent state
per (session, agent)). Two implementations pass the same tests (tests/test_state_backends.py):
`local.LocalState` (a state directory, default) and `redis.RedisState` (LORASA_REDIS_URL).

How a change reaches every worker: a publish bumps a *generation*; each worker reads it once per
batch (`generation()`: one `stat` locally, one `MGET` on Redis) and, when it moved, reads what was
`published()` and loads the newer blobs before serving that batch.

Sessions: a step opens the session (`open_steps`: takes a lease, reads its state), the engine runs,
then `close_steps` writes the new state and releases the lease, in that order, as separate calls, so
nothing is stored for a step whose outputs were rejected. A second step of a session whose lease is
held gets `SessionBusy` (HTTP 409): concurrent steps of one session are refused, never
last-writer-wins. Leases expire after `lease_s` so a crashed worker never blocks a session. Each
opened step says whether the session had stored state (`SessionStep.resumed`; the responses'
`session_state`), so a session whose state was lost (expired, evicted, or the backend lost it) is
never continued from zeros unsaid.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, Protocol
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from lorasa_serve.errors import DigestMismatchError
from lorasa_serve.protocol import SESSION_NEW, SESSION_RESUMED

MAX_BLOB_BYTES = 1 << 30  # a stored adapter blob is read only if it is at most this big


class StateUnavailable(RuntimeError):
    """The state backend cannot be reached now (HTTP 503 with Retry-After); retry later."""


class StateOutcomeUnknown(StateUnavailable):
    """The backend failed after a change may have been made: a session step's new state being stored
    (`close_steps`), or a publish whose answer was lost (it may go live when a stalled Redis resumes,
    the message says so). HTTP 503 without `X-Lorasa-Retry-Safe` (re-sending could apply it twice)."""


class StateConfigError(RuntimeError):
    """The state backend is unusable as configured (wrong backbone, bad URL): the server cannot start."""


class SessionBusy(RuntimeError):
    """Another step of this session is in flight (HTTP 409)."""


@dataclass(frozen=True)
class Published:
    versions: dict[str, int] = field(default_factory=dict)  # agent -> latest version (absent: 1)
    merged: frozenset[str] = frozenset()
    lost: bool = False  # the backend lost its data (Redis restarted empty): servers re-seed it

    def version(self, agent_id: str) -> int:
        return self.versions.get(agent_id, 1)


@dataclass(frozen=True)
class SessionLimits:
    ttl_s: float = 3600.0  # a session untouched this long is forgotten
    max_sessions: int = 10_000  # count bound (least recently used evicted first)
    max_bytes: int = 256 << 20  # bound on the bytes of state held (least recently used evicted first)
    lease_s: float = 30.0  # a step holds its session at most this long


@dataclass
class SessionStep:
    """An open step of one session: its lease is held until `close_steps`."""
    session_id: str
    agent_ids: list[str]
    token: str
    state: np.ndarray  # [n, H] float32: stored state, zeros where is_new
    is_new: np.ndarray  # [n] bool
    resumed: bool  # the session had stored state (for any agent) when this step opened it

    @property
    def session_state(self) -> str:
        """What the response says (ActResult.session_state): "resumed", or "new" when the session had no
        stored state: its first step, or it expired, was evicted or reset, or the backend lost it."""
        return SESSION_RESUMED if self.resumed else SESSION_NEW


class StateBackend(Protocol):
    description: str  # for logs; never contains a password
    local_check: bool  # generation() is a local file stat, never a network round trip: services/check_runner.py

    # --- adapters and merged flags ---
    def generation(self) -> object:
        """Cheap (once per batch): changes whenever something is published. Raises StateUnavailable."""
    def published(self) -> Published: ...
    def adapter_blob(self, agent_id: str, version: int) -> bytes:
        """The exact bytes published as (agent, version), verified against the sha256 recorded when
        they were published (DigestMismatchError otherwise); immutable once published."""
    def publish_adapter(self, agent_id: str, data: bytes) -> int:
        """Store already validated adapter bytes, then make them the agent's newest version. Raises
        StateUnavailable only when nothing became visible (safe to retry); StateOutcomeUnknown when it
        may have been (or was) published: never an error for an upload that goes live later unsaid."""
    def publish_merged(self, agent_ids: list[str], merge: bool) -> tuple[str, ...]:
        """The same two outcomes as publish_adapter."""
    def reseed(self, versions: dict[str, int], blob: Callable[[str], bytes], merged: set[str]) -> None:
        """Make sure the backend publishes at least `versions` (after it lost its data): for each agent
        whose published version is lower, store `blob(agent)` at our version. Never lowers a version."""

    # --- sessions ---
    def open_steps(self, items: list[tuple[str, list[str]]]) -> list[SessionStep | SessionBusy]: ...
    def close_steps(self, steps: list[tuple[SessionStep, np.ndarray | None]]) -> list[bool]:
        """Write each step's new state [n, H] (None: release only); False where the lease was lost
        (expired, or the session was reset meanwhile): nothing was written for that step."""
    def reset_session(self, session_id: str) -> bool: ...
    def session_stats(self) -> dict[str, int]:
        """{"sessions": count, "bytes": bytes of state held}. The service never calls it: it is what the
        tests (the eviction bounds) and benchmarks/session_eviction.py read the backends' sessions with."""
    def close(self) -> None: ...


def rows_to_blobs(agent_ids: list[str], state: np.ndarray) -> list[tuple[str, bytes]]:
    """state [n, H] -> one float32 blob per agent (always a copy of that row only)."""
    rows = np.ascontiguousarray(state, dtype=np.float32)
    return [(a, rows[i].tobytes()) for i, a in enumerate(agent_ids)]


def blobs_to_rows(agent_ids: list[str], blobs: dict[str, bytes], hidden: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (state [n, H] float32, is_new [n] bool); a missing or mis-sized blob counts as new."""
    state = np.zeros((len(agent_ids), hidden), dtype=np.float32)
    is_new = np.ones(len(agent_ids), dtype=bool)
    for i, a in enumerate(agent_ids):
        b = blobs.get(a)
        if b is not None and len(b) == 4 * hidden:
            state[i] = np.frombuffer(b, dtype=np.float32)
            is_new[i] = False
    return state, is_new


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def verified(data: bytes, want: str | None, source: str) -> bytes:
    """`data` if its sha256 is the one recorded when it was published, else DigestMismatchError
    (a load error: the worker keeps serving its previous version, /v1/agents shows it)."""
    if not want:
        raise DigestMismatchError(source, "no sha256 was recorded for this blob: it cannot be verified")
    got = digest(data)
    if got != want:
        raise DigestMismatchError(source, f"sha256 {got[:12]} differs from the {want[:12]} recorded when it "
                                          "was published: the stored blob was modified or corrupted")
    return data


def redact(url: str) -> str:
    """The URL with its password (and user name) replaced, for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=f"***@{host}"))
