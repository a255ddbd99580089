"""Adapter sync: the adapter versions a worker serves, kept in step with the state backend.

The one owner of `ready` (a sync with the backend succeeded: a new worker never serves stale
adapters), `state_error` (why the last check failed), the versions applied, the load failures and the
merged flags applied; everything else reads them through read-only views.

A check reads the backend's generation (one `stat`, or one Redis MGET, timed as
`lorasa_state_check_seconds`) and, when it moved, reads what was published since and loads it (the
blobs are read before the engine lock is taken; loads and merges hold it, so a forward and the
versions it reports always agree). Where checks run (services/check_runner.py): before every batcher
cycle for the local state dir; on a thread of their own for Redis, so stateless requests never wait on
the network. If the backend is unreachable, stateless requests keep being served with the adapters
last applied, session steps fail at once with StateUnavailable (503), and the check is retried at most
once per RETRY_S until it succeeds. An idle worker checks once a second, so it notices a Redis that
restarted empty and re-seeds it quickly; a process that never synced with this Redis waits
SEED_GRACE_S for such a server before seeding it itself (versions never go backwards).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

from lorasa_serve import Engine
from lorasa_serve.artifacts import adapter_bytes
from lorasa_serve.backend import ActBackend

from . import metrics
from .check_runner import BackgroundChecks, InlineChecks
from .config import ServiceConfig
from .state import Published, StateBackend, StateConfigError, StateUnavailable

log = logging.getLogger("lorasa.service")
RETRY_S = 1.0  # after a failed check, the backend is retried at most this often
SEED_GRACE_S = 3.0  # a fresh process waits this long (> 2 idle checks) for a server that served a lost Redis
LOAD_RETRY_S = 5.0  # an adapter version that failed to load is retried at most this often


@dataclass(frozen=True)
class LoadFailure:
    version: int
    retry_at: float  # monotonic
    error: str


class SeedWait(StateUnavailable):
    """A never-synced worker waits for a server that served the (empty) backend to re-seed it: on a
    first deployment that is normal, so it is logged at INFO, not WARNING."""


class NotSwappable(RuntimeError):
    """Adapters cannot be swapped or merged: the server acts through a backend other than `Engine`."""


class AdapterSync:
    def __init__(self, cfg: ServiceConfig, backend: ActBackend, state: StateBackend, engine_lock: threading.RLock):
        """engine_lock: held for every use of `backend` (cycles, adapter loads)."""
        self.cfg, self.state = cfg, state
        self.spec = backend.spec
        self._backend_name = type(backend).__name__
        self._engine = backend if isinstance(backend, Engine) else None  # only an Engine swaps adapters
        self._lock = engine_lock
        self._applied = {a: 1 for a in self.spec.agent_ids}  # global version served per agent
        self.versions: Mapping[str, int] = MappingProxyType(self._applied)
        self._failures: dict[str, LoadFailure] = {}  # agent -> the published version it cannot load
        self.load_failures: Mapping[str, LoadFailure] = MappingProxyType(self._failures)
        self._ready = False  # True after the first successful sync with the backend
        self._state_error: str | None = None  # why the last check with the backend failed
        self._retry_at = 0.0  # monotonic time of the next check after a failed one
        self._synced = False  # a sync with this backend succeeded (this process may re-seed it)
        self._seed_wait = False  # the last failed sync was a first start's wait for a re-seed (SeedWait)
        self._lost_since: float | None = None  # fresh process: when it first saw the backend lost
        self._seen_gen: object = None  # never seen: the first sync loads everything published
        self._merged: set[str] = set()  # the published merged flags applied
        self._checks = InlineChecks(self._check, engine_lock) if state.local_check else \
            BackgroundChecks(self._check, lambda: self._state_error is not None, state.description)
        self.inline_ok = self._checks.inline_ok  # a check never waits on the network: the fast path may run
        self.idle_check_s = self._checks.idle_check_s  # how often an idle batcher still runs a cycle
        for a, v in self._applied.items():
            metrics.adapter_version.labels(agent_id=a).set(v)

    @property
    def ready(self) -> bool:
        return self._ready and self._checks.stopped is None

    @property
    def state_error(self) -> str | None:
        return self._checks.stopped or self._state_error

    def start(self) -> None:
        """The first sync, on the calling thread, then the checks (their thread, for Redis). Only a
        configuration error (wrong backbone...) raises; otherwise a failure leaves the worker not ready
        (`state_error` says why) and is retried."""
        self._first_sync()
        self._checks.start()

    def _first_sync(self) -> None:
        try:
            self._sync()
            self._ready = True
        except StateConfigError:
            raise
        except Exception as e:  # unreachable, or transient (a blob pruned meanwhile...): retried
            self._state_error, self._retry_at = _reason(e), time.monotonic() + RETRY_S
            self._seed_wait = isinstance(e, SeedWait)
            level = logging.INFO if self._seed_wait else logging.WARNING  # a first start waits
            log.log(level, "state sync failed at start (not ready, retrying): %s", self._state_error)

    def before_cycle(self) -> None:
        """Before every cycle: on the batcher thread without the engine lock, on the event loop (the
        fast path, local state dir only) with it held (see services/check_runner.py)."""
        self._checks.before_cycle()

    def refresh(self, timeout: float) -> bool:
        """Check the backend now (even while backed off: after a publish) and wait until it is applied;
        -> whether that finished within `timeout`. From an HTTP handler's thread, never the event loop."""
        return self._checks.refresh(timeout)

    def down_reason(self) -> str | None:
        """Why session steps should fail at once, without a call that would wait on the network: Redis is
        known down, or stalled now. None for the local state dir: its session store does not depend on
        the check, and a session call that fails there fails at once on its own."""
        if self.inline_ok:
            return None
        return self.state_error or self._checks.silence()

    # --- the check -----------------------------------------------------------------------------
    def _check(self, force: bool = False) -> None:
        """Sync with the backend; failures are remembered, never raised. After a failure the backend is
        retried at most once per RETRY_S (a dead link must not stall batches), unless `force`."""
        if not force and self._state_error is not None and time.monotonic() < self._retry_at:
            return
        try:
            self._sync()
            if self._state_error is not None:  # after a seeding wait at start (normal): info only
                log.log(logging.INFO if self._seed_wait else logging.WARNING, "state backend reachable again: %s",
                        self.state.description)
            self._seed_wait = False
            self._ready, self._state_error = True, None
        except SeedWait as e:  # a first deployment: waiting SEED_GRACE_S for a server that served it
            self._seed_wait = True
            self._state_error, self._retry_at = str(e), time.monotonic() + RETRY_S
        except StateUnavailable as e:
            if self._state_error != str(e):
                log.error("state backend unavailable (serving the adapters last applied): %s", e)
            self._state_error, self._retry_at = str(e), time.monotonic() + RETRY_S
            metrics.state_unavailable.labels(op="check").inc()
        except Exception as e:
            if not self._synced:  # never synced (start): stay not ready, retried like a dead link
                if self._state_error != _reason(e):
                    log.warning("state sync failed (not ready, retrying): %s", _reason(e))
                self._state_error, self._retry_at = _reason(e), time.monotonic() + RETRY_S
            else:  # keep serving the adapters we have
                log.error("state sync failed (still serving the previous adapters): %s", e)

    def _sync(self) -> None:
        """Load what was published since the last sync. The generation is read before what it covers,
        so a publish in between is caught by the next check. If the backend holds older versions than
        this worker serves (Redis restarted empty), re-seed it from ours first (`_reseed`)."""
        gen = self._generation()
        now = time.monotonic()
        retry_load = min((f.retry_at for f in self._failures.values()), default=float("inf"))
        if gen == self._seen_gen and self._synced and now < retry_load:
            return
        pub = self.state.published()
        if pub.lost or any(pub.version(a) < v for a, v in self._applied.items()):
            gen, pub = self._reseed(pub, now)
        blobs = self._fetch(pub, now)  # network I/O: before the engine lock
        with self._lock:
            self._load(pub, blobs, now)
            self._apply_merged(pub)
        self._seen_gen = gen
        if self._failures and not self._synced:  # a new worker never serves older adapters
            raise RuntimeError("cannot load the published adapters: " + "; ".join(
                f"{a} v{f.version}: {f.error}" for a, f in sorted(self._failures.items())))
        self._synced = True

    def _reseed(self, pub: Published, now: float) -> tuple[object, Published]:
        """The backend lost (or rolled back) what it published: seed it with the versions this worker
        serves -> its generation and what it publishes now. A process that never synced with it waits
        SEED_GRACE_S first (SeedWait) for a server that did (whose versions may be newer than ours)."""
        if pub.lost and not self._synced:
            self._lost_since = now if self._lost_since is None else self._lost_since
            if now - self._lost_since < SEED_GRACE_S:
                raise SeedWait(f"{self.state.description} has no published state: waiting for a "
                               "server that served it to re-seed it")
            log.info("%s: no server re-seeded it within %g s (a first deployment, or every server that "
                     "served it is gone)", self.state.description, SEED_GRACE_S)
        # a first deployment seeds an empty backend (info); a backend that lost or rolled back the
        # versions this worker had synced with is worth a warning
        log.log(logging.WARNING if self._synced else logging.INFO,
                "%s %s: seeding it with the versions this worker serves %s", self.state.description,
                "has no published state (new, or restarted without its data)" if pub.lost
                else "holds older versions than this worker serves", dict(self._applied))
        self.state.reseed(dict(self._applied), self.served_adapter, set(self._merged))
        return self._generation(), self.state.published()

    def _generation(self) -> object:
        """The backend's generation: the cost of a check (one stat / one Redis MGET), timed."""
        t0 = time.perf_counter()
        with self._checks.reading():
            gen = self.state.generation()
        metrics.state_check_seconds.observe(time.perf_counter() - t0)
        return gen

    def _fetch(self, pub: Published, now: float) -> dict[str, tuple[int, bytes | Exception]]:
        """agent -> (the newer published version to load now, its blob or why it cannot be read). A
        version that failed is retried at most every LOAD_RETRY_S; a newer one at once. Raises
        StateUnavailable (the whole check fails) but never for one bad or pruned blob."""
        out: dict[str, tuple[int, bytes | Exception]] = {}
        for agent, v in pub.versions.items():
            if agent not in self._applied or v <= self._applied[agent]:
                continue
            fail = self._failures.get(agent)
            if fail is not None and fail.version >= v and now < fail.retry_at:
                continue
            if self._engine is None:
                out[agent] = (v, NotSwappable(f"this server acts through {self._backend_name} "
                                              f"(LORASA_BACKEND={self.cfg.backend}), which cannot load adapters"))
                continue
            try:
                out[agent] = (v, self.state.adapter_blob(agent, v))
            except StateUnavailable:
                raise
            except Exception as e:  # a bad or pruned blob: keep serving the version we have
                out[agent] = (v, e)
        return out

    def _load(self, pub: Published, blobs: dict[str, tuple[int, bytes | Exception]], now: float) -> None:
        """Load the blobs fetched (under the engine lock). One that fails to load is remembered in
        `load_failures` (counted, logged, shown in /v1/agents); the other agents load regardless."""
        for agent, v in pub.versions.items():  # failures of versions superseded or served meanwhile
            fail = self._failures.get(agent)
            if fail is not None and agent in self._applied and (v <= self._applied[agent] or fail.version < v):
                del self._failures[agent]
        for agent, (v, blob) in blobs.items():
            try:
                if isinstance(blob, Exception):
                    raise blob
                self._engine.load_adapter(blob, agent)
            except Exception as e:  # a bad or pruned blob: keep serving the version we have
                self._failures[agent] = LoadFailure(v, now + LOAD_RETRY_S, f"{type(e).__name__}: {e}")
                metrics.adapter_load_failures.labels(agent_id=agent).inc()
                log.error("cannot load adapter %r v%d (serving v%d, retry in %g s): %s", agent, v,
                          self._applied[agent], LOAD_RETRY_S, self._failures[agent].error)
                continue
            self._failures.pop(agent, None)
            self._applied[agent] = v
            metrics.adapter_version.labels(agent_id=agent).set(v)
            metrics.adapter_swaps.labels(agent_id=agent).inc()

    def _apply_merged(self, pub: Published) -> None:
        """Merge and unmerge so that the published merged flags are the ones applied."""
        want = {a for a in pub.merged if a in self._applied} if self._engine is not None else set()
        if want - self._merged:
            self._engine.merge(sorted(want - self._merged))
        if self._merged - want:
            self._engine.unmerge(sorted(self._merged - want))
        self._merged = want

    def served_adapter(self, agent_id: str) -> bytes:
        """The safetensors bytes of the adapter this worker serves for `agent_id` (for re-seeding)."""
        with self._lock:
            tensors = {n: t.cpu() for n, t in self._engine.adapter(agent_id).items()}
        return adapter_bytes(self.spec, agent_id, tensors)


def _reason(e: Exception) -> str:
    return str(e) if isinstance(e, StateUnavailable) else f"{type(e).__name__}: {e}"
