"""Per-worker runtime: the Engine, the state backend (services/state), and the micro-batcher.

One batcher thread owns every engine call and every session mutation in this process: HTTP handlers
enqueue validated `ActRequest`s (or control jobs) and await a future. Each cycle the thread (1) checks
the backend's generation (one `stat` or one Redis MGET, timed as `lorasa_state_check_seconds`) and
loads what was published since, (2) runs control jobs, (3) takes every queued request up to
`max_batch_rows` and runs ONE `Engine.act` per `deterministic` flag over all their rows: open the
sessions of the batch (lease + state), forward, then, as a separate step, store the new states of the
steps that succeeded and release the leases. Batches form adaptively: while a forward runs, new
requests queue up and go together into the next one; an idle server answers a lone request at once.
Fast path: a lone small stateless request (<= `inline_max_rows`, nothing queued, no cycle running, a
local state backend) runs that same cycle on the handler's thread instead, saving the thread hand-off;
the cycle lock keeps every engine call and sync serialised, so versions and errors are the batcher's.
If the backend is unreachable, stateless requests keep being served with the adapters last applied,
session steps fail with StateUnavailable (503), and the check is retried every batch (and every
second while idle) until it succeeds. An idle worker checks once a second, so it notices a Redis that
restarted empty and re-seeds it quickly; a process that never synced with this Redis waits
SEED_GRACE_S for such a server before seeding it itself (versions never go backwards).
A job is marked running when the batcher takes it: a request cancelled while queued (client gone,
timeout) is dropped before any lease is taken; once running it completes (state stored, lease freed)
and its answer is discarded.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from contextlib import contextmanager
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from lorasa_serve import Engine, LorasaError
from lorasa_serve.artifacts import adapter_bytes, fingerprint
from lorasa_serve.backend import ActBackend
from lorasa_serve.protocol import ActRequest, ActResult, AgentTable, BadRequest, concat

from . import metrics
from .config import ServiceConfig
from .state import (SessionBusy, SessionLimits, SessionStep, StateBackend, StateConfigError, StateUnavailable,
                    open_backend)
from .state.base import StateOutcomeUnknown

log = logging.getLogger("lorasa.service")
RETRY_S = 1.0  # after a failed check, the backend is retried at most this often
IDLE_CHECK_S = 1.0  # an idle worker checks the backend at least this often
SEED_GRACE_S = 3.0  # a fresh process waits this long (> 2 idle checks) for a server that served a lost Redis
LOAD_RETRY_S = 5.0  # an adapter version that failed to load is retried at most this often


@dataclass
class LoadFailure:
    version: int
    retry_at: float  # monotonic
    error: str


@dataclass
class _Job:
    req: ActRequest | None  # None: a control job
    fn: Callable[[], object] | None = None
    future: Future = field(default_factory=Future)


def session_limits(cfg: ServiceConfig) -> SessionLimits:
    return SessionLimits(ttl_s=cfg.session_ttl_s, max_sessions=cfg.max_sessions,
                         max_bytes=cfg.max_session_bytes, lease_s=cfg.timeout_s)


class SeedWait(StateUnavailable):
    """A never-synced worker waits for a server that served the (empty) backend to re-seed it: on a
    first deployment that is normal, so it is logged at INFO, not WARNING."""


class PolicyRuntime:
    def __init__(self, cfg: ServiceConfig, policy_dir: Path, state: StateBackend | None = None,
                 backend: ActBackend | None = None):
        """backend: what acts (default: from cfg, `open_act_backend`); only an `Engine` swaps adapters.
        state: the state backend (default: from cfg, Redis if LORASA_REDIS_URL else LORASA_STATE_DIR).
        An unreachable backend does not fail construction: `ready` stays False (with `state_error`
        saying why) until a sync succeeds, so a new worker never serves stale adapters."""
        self.cfg = cfg
        self.backend = backend or open_act_backend(cfg, policy_dir)  # every forward goes through it
        self.engine = self.backend if isinstance(self.backend, Engine) else None  # hot swap and merge
        self.spec = self.backend.spec
        self.table = AgentTable(self.spec)  # what the request parsers check against
        slots = self.backend.agent_index(self.spec.agent_ids)  # requests carry indices in the spec's order
        if not np.array_equal(slots, np.arange(len(slots))):
            raise RuntimeError(f"the backend's agent order {slots.tolist()} is not its spec's")
        self._agent_rows = [metrics.agent_rows.labels(agent_id=a) for a in self.spec.agent_ids]
        self.state = state or open_backend(cfg.redis_url, cfg.state_dir, self.spec.backbone_fingerprint,
                                           self.spec.hidden, session_limits(cfg))
        self.applied = {a: 1 for a in self.spec.agent_ids}  # global version served per agent
        self.ready = False  # True after the first successful sync with the backend
        self.state_error: str | None = None  # why the last check with the backend failed
        self._retry_at = 0.0  # monotonic time of the next check after a failed one
        self._synced = False  # a sync with this backend succeeded (this process may re-seed it)
        self._seed_wait = False  # the last failed sync was a first start's wait for a re-seed (SeedWait)
        self._lost_since: float | None = None  # fresh process: when it first saw the backend lost
        self.load_failures: dict[str, LoadFailure] = {}  # agent -> the published version it cannot load
        self._seen_gen: object = None  # never seen: the first sync loads everything published
        self._merged_pub: set[str] = set()
        self._fp_cache: dict[tuple[str, int], str] = {}
        self._queue: deque[_Job] = deque()
        self._inflight: set[str] = set()  # sessions with a step queued or running in this worker
        self._cv = threading.Condition()
        self._cycle_lock = threading.Lock()  # held for every cycle: the batcher's and the inline ones
        self._handling = 0  # act requests in this worker's HTTP handlers (see handling())
        for a, v in self.applied.items():
            metrics.adapter_version.labels(agent_id=a).set(v)
        try:
            self._sync()  # only a configuration error (wrong backbone...) fails the load
            self.ready = True
        except StateConfigError:
            raise
        except Exception as e:  # unreachable, or transient (a blob pruned meanwhile...): retried
            self.state_error, self._retry_at = _reason(e), time.monotonic() + RETRY_S
            self._seed_wait = isinstance(e, SeedWait)
            level = logging.INFO if self._seed_wait else logging.WARNING  # a first start waits
            log.log(level, "state sync failed at start (not ready, retrying): %s", self.state_error)
        self._stopped: str | None = None  # why the batcher thread ended (it should never)
        self._thread = threading.Thread(target=self._loop, name="lorasa-batcher", daemon=True)
        self._thread.start()

    # --- called from HTTP handlers -------------------------------------------------------------
    def submit(self, req: ActRequest) -> Future:
        """Raises SessionBusy if a step of the same session is already queued or running here (another
        worker or replica refuses it through the backend's lease instead)."""
        sid = req.session_id if self.spec.recurrent else None
        if sid is None:
            return self._inline(req) or self._put(_Job(req))
        with self._cv:
            if sid in self._inflight:
                raise SessionBusy(f"session {sid!r} has another step in flight")
            self._inflight.add(sid)
        try:
            fut = self._put(_Job(req))
        except StateUnavailable:  # the batcher thread stopped
            self._done(sid)
            raise
        fut.add_done_callback(lambda _: self._done(sid))
        return fut

    async def act(self, req: ActRequest) -> ActResult:
        """An HTTP handler's call (on the event loop, inside `handling()`): the request's result. A
        request the fast path could take yields to the loop once first, so that the handlers of requests
        that arrived with it check in (`handling`): then they all go to the batcher, which merges them."""
        if self._may_inline(req):
            await asyncio.sleep(0)
        fut = self.submit(req)  # done already when the fast path served it
        return fut.result() if fut.done() else await asyncio.wrap_future(fut)

    @contextmanager
    def handling(self) -> Iterator[None]:
        """An HTTP act handler's span (on the event loop thread), from before its body is read to its
        result: while another one is open, requests go to the batcher, which merges them (serial
        inline forwards would lose the batcher's overlap with the event loop)."""
        self._handling += 1
        try:
            yield
        finally:
            self._handling -= 1

    def _inline(self, req: ActRequest) -> Future | None:
        """The lone-request fast path: run one cycle for `req` on the calling thread and return its
        (done) future, or None when the batcher must take it: too many rows, another request being
        handled, a Redis backend (its check is a network round trip that must never block the event
        loop), something queued (it goes first), or a cycle running."""
        if not self._may_inline(req):
            return None
        if not self._cycle_lock.acquire(blocking=False):
            return None
        try:
            with self._cv:
                if self._queue or self._stopped is not None:
                    return None
            job = _Job(req)
            job.future.set_running_or_notify_cancel()
            try:
                self._cycle([job])
            except Exception as e:
                _fail_all([job], e, "an inline cycle failed")
            metrics.inline_requests.inc()
            return job.future
        finally:
            self._cycle_lock.release()

    def _may_inline(self, req: ActRequest) -> bool:
        return (req.n <= self.cfg.inline_max_rows and self._handling <= 1 and self.state.local_check
                and (req.session_id is None or not self.spec.recurrent))

    def _done(self, session_id: str) -> None:
        with self._cv:
            self._inflight.discard(session_id)

    def control(self, fn: Callable[[], object]) -> Future:
        """Run `fn` on the batcher thread (serialised with forwards), after a state sync."""
        return self._put(_Job(None, fn))

    def _put(self, job: _Job) -> Future:
        with self._cv:
            if self._stopped is not None:
                raise StateUnavailable(self._stopped)
            self._queue.append(job)
            self._cv.notify()
        return job.future

    # --- batcher thread ------------------------------------------------------------------------
    def _loop(self) -> None:
        """Cycles forever; a bug in a cycle answers that cycle's jobs with the error. Should the thread
        end anyway, the worker turns not ready and refuses new jobs (never hangs them)."""
        try:
            while True:
                jobs = self._take(IDLE_CHECK_S)
                with self._cycle_lock:
                    try:
                        self._cycle(jobs)
                    except Exception as e:
                        _fail_all(jobs, e, "a batcher cycle failed")
        finally:
            with self._cv:
                self._stopped = "the batcher thread of this worker stopped (see its log)"
                self.ready, self.state_error = False, self._stopped
                pending, self._queue = list(self._queue), deque()
            for job in pending:
                _answer(job.future, error=StateUnavailable(self._stopped))

    def _cycle(self, jobs: list[_Job]) -> None:
        self._check()
        for job in [j for j in jobs if j.req is None]:
            _run_into(job.future, job.fn)
        acts = [j for j in jobs if j.req is not None]
        for det in (True, False):
            group = [j for j in acts if j.req.deterministic == det
                     and (det or j.req.seed is None)]
            if group:
                self._serve_safely(group)
        for job in [j for j in acts if not j.req.deterministic and j.req.seed is not None]:
            self._serve_safely([job])  # seeded sampling: alone, with its own generator

    def _serve_safely(self, jobs: list[_Job]) -> None:
        """_serve, and a bug in it answers its jobs with the error instead of stopping the thread."""
        try:
            self._serve(jobs)
        except Exception as e:
            _fail_all(jobs, e, "serving a batch failed")

    def _take(self, timeout: float | None) -> list[_Job]:
        """Block for work (at most `timeout` s); then take queued jobs up to max_batch_rows, deferring a
        request whose (session, agent) is already in this batch (it needs the state the earlier one
        produces). A job cancelled while queued is dropped here; the jobs taken are marked running (no
        longer cancellable), before any of their sessions is leased."""
        with self._cv:
            if not self._queue:
                self._cv.wait(timeout)
            jobs, deferred, rows, seen = [], [], 0, set()
            while self._queue:
                job = self._queue[0]
                n = job.req.n if job.req else 0
                if jobs and rows + n > self.cfg.max_batch_rows:
                    break
                self._queue.popleft()
                keys = {(job.req.session_id, a) for a in job.req.agent_ids} \
                    if job.req and job.req.session_id is not None else set()
                if keys & seen:
                    deferred.append(job)
                    continue
                if not job.future.set_running_or_notify_cancel():
                    continue  # cancelled while queued (its done-callbacks already ran)
                seen |= keys
                jobs.append(job)
                rows += n
            self._queue.extendleft(reversed(deferred))
            return jobs

    def _serve(self, jobs: list[_Job]) -> None:
        """Open the batch's sessions, run the forward, then store the states of the steps that
        succeeded (a separate step: nothing is stored for a failed or rejected output)."""
        jobs, steps = self._open_sessions(jobs)
        outcomes = self._run(jobs, steps)
        self._close_sessions(outcomes, steps)

    def _run(self, jobs: list[_Job], steps: dict[int, SessionStep]) -> list[tuple[_Job, object]]:
        """-> (job, ActResult | exception) per job."""
        if not jobs:  # every request of the batch was refused when its session was opened
            return []
        try:
            results = self._forward([j.req for j in jobs], [steps.get(id(j)) for j in jobs])
        except Exception as e:  # should not happen after parsing: isolate the request that caused it
            if len(jobs) > 1:  # _forward has no side effects, so each request can run again alone
                return [out for job in jobs for out in self._run([job], steps)]
            if not isinstance(e, LorasaError):
                log.exception("forward failed")
            return [(jobs[0], e)]
        return list(zip(jobs, results))

    def _open_sessions(self, jobs: list[_Job]) -> tuple[list[_Job], dict[int, SessionStep]]:
        """Lease and read the session of every session request; a busy session's request fails with
        SessionBusy, all of them with StateUnavailable if the backend cannot be reached."""
        if not self.spec.recurrent:
            return jobs, {}
        sess = [j for j in jobs if j.req.session_id is not None]
        if not sess:
            return jobs, {}
        try:
            if self.state_error is not None:  # known down: fail fast, the next check retries
                raise StateUnavailable(self.state_error)
            opened = self.state.open_steps([(j.req.session_id, j.req.agent_ids) for j in sess])
        except StateUnavailable as e:
            metrics.state_unavailable.labels(op="session").inc()
            opened = [e] * len(sess)
        except Exception as e:  # unexpected (one bad item fails the whole transaction): isolate it
            log.exception("opening the sessions of a batch failed")
            opened = [self._one(self.state.open_steps, (j.req.session_id, j.req.agent_ids)) for j in sess] \
                if len(sess) > 1 else [e]
        steps, failed = {}, set()
        for job, step in zip(sess, opened):
            if isinstance(step, SessionStep):
                steps[id(job)] = step
            else:
                _answer(job.future, error=step)
                failed.add(id(job))
        return [j for j in jobs if id(j) not in failed], steps

    def _close_sessions(self, outcomes: list[tuple[_Job, object]], steps: dict[int, SessionStep]) -> None:
        """Store new states (ok outcomes) or only release leases (failures), then answer every job.
        A step whose state could not be stored is answered with the error, not with its outputs."""
        closing = [(job, out) for job, out in outcomes if id(job) in steps]
        if not closing:  # no session step in this batch: nothing to store or release (the local backend
            # drops expired sessions in the next close_steps: they only linger while no session steps)
            return _answer_all(outcomes, {})
        try:
            items = [(steps[id(job)], None if isinstance(out, BaseException) else out.state)
                     for job, out in closing]
            stored = self.state.close_steps(items)
        except StateUnavailable as e:
            metrics.state_unavailable.labels(op="session").inc()
            stored = [StateOutcomeUnknown(f"storing the session step failed, its state may or may not have "
                                          f"been stored: {e}")] * len(closing)
        except Exception as e:  # unexpected: store each step alone, so only the bad one fails
            log.exception("storing the sessions of a batch failed")
            stored = [self._one(self.state.close_steps, item) for item in items] if len(items) > 1 else [e]
        errors = {}
        for (job, out), ok in zip(closing, stored):
            if isinstance(ok, StateUnavailable) and not isinstance(ok, StateOutcomeUnknown):
                ok = StateOutcomeUnknown(f"storing the session step failed, its state may or may not have "
                                         f"been stored: {ok}")  # never marked safe to retry
            if isinstance(ok, BaseException):
                errors[id(job)] = ok
            elif not ok and not isinstance(out, BaseException):
                errors[id(job)] = SessionBusy(
                    f"session {job.req.session_id!r} was reset, or its step outlasted the "
                    f"{self.cfg.timeout_s:g} s lease, while this step ran: its state was not stored")
        _answer_all(outcomes, errors)

    @staticmethod
    def _one(batch_fn: Callable[[list], list], item: object) -> object:
        """batch_fn([item])[0], or the exception it raised."""
        try:
            return batch_fn([item])[0]
        except Exception as e:
            return e

    def _forward(self, reqs: list[ActRequest], steps: list[SessionStep | None]) -> list[ActResult | BadRequest]:
        """One Engine.act over the rows of every request (same `deterministic` flag). No side effects.
        Per request its ActResult, or a 422 BadRequest naming its rows whose output is NaN/inf (never
        stored: _close_sessions only releases the lease of a failed step)."""
        state = self._states(reqs, steps)  # [B, H] | None
        batch_req = concat(reqs, state, self.spec.act_max)  # checked when each request was parsed
        idx = batch_req.idx  # [B] agent indices (the backend's slots): a fresh array (a layout cache may keep it)
        seeded = batch_req.seed is not None and not batch_req.deterministic  # a lone seeded request
        gen = torch.Generator().manual_seed(batch_req.seed) if seeded else None
        out = self.backend.act_checked(batch_req, generator=gen)
        versions = np.asarray([self.applied[a] for a in self.spec.agent_ids], dtype=np.int64)[idx]  # [B]
        batch = {"requests": len(reqs), "rows": len(idx)}
        metrics.batch_rows.observe(len(idx))
        metrics.batch_requests.observe(len(reqs))
        for a, c in enumerate(np.bincount(idx, minlength=len(self._agent_rows)).tolist()):
            if c:
                self._agent_rows[a].inc(c)
        actions, logp = out.actions.cpu().numpy(), out.log_probs.cpu().numpy()
        h = None if out.state is None else out.state.cpu().numpy()  # [B, H]
        bad = _nonfinite_rows(actions, logp, h)  # [B] bool
        results: list[ActResult | BadRequest] = []
        lo = 0
        for r, step in zip(reqs, steps):
            hi = lo + r.n
            if bad[lo:hi].any():
                results.append(_nonfinite_error(np.flatnonzero(bad[lo:hi])))
            else:
                results.append(ActResult(actions[lo:hi], logp[lo:hi], None if h is None else h[lo:hi],
                                         versions[lo:hi], batch, None if step is None else step.session_state))
            lo = hi
        return results

    def _states(self, reqs: list[ActRequest], steps: list[SessionStep | None]) -> np.ndarray | None:
        """[B, H] float32: each request's session state, explicit state, or zeros (None: feed-forward)."""
        if not self.spec.recurrent:
            return None
        parts = []
        for r, step in zip(reqs, steps):
            if step is not None:
                parts.append(step.state)
            elif r.state is not None:
                parts.append(r.state)
            else:
                parts.append(np.zeros((r.n, self.spec.hidden), np.float32))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    # --- state sync (batcher thread, or __init__ before it starts) ------------------------------
    def _check(self) -> None:
        """Once per batch: sync with the backend, timed; failures are remembered, never raised. After
        a failure the backend is retried at most once per RETRY_S (a dead link must not stall batches)."""
        if self.state_error is not None and time.monotonic() < self._retry_at:
            return
        try:
            self._sync()
            if self.state_error is not None:  # after a seeding wait at start (normal): info only
                log.log(logging.INFO if self._seed_wait else logging.WARNING, "state backend reachable again: %s",
                        self.state.description)
            self._seed_wait = False
            self.ready, self.state_error = True, None
        except SeedWait as e:  # a first deployment: waiting SEED_GRACE_S for a server that served it
            self._seed_wait = True
            self.state_error, self._retry_at = str(e), time.monotonic() + RETRY_S
        except StateUnavailable as e:
            if self.state_error != str(e):
                log.error("state backend unavailable (serving the adapters last applied): %s", e)
            self.state_error, self._retry_at = str(e), time.monotonic() + RETRY_S
            metrics.state_unavailable.labels(op="check").inc()
        except Exception as e:
            if not self._synced:  # never synced (start): stay not ready, retried like a dead link
                if self.state_error != _reason(e):
                    log.warning("state sync failed (not ready, retrying): %s", _reason(e))
                self.state_error, self._retry_at = _reason(e), time.monotonic() + RETRY_S
            else:  # keep serving the adapters we have
                log.error("state sync failed (still serving the previous adapters): %s", e)

    def _sync(self) -> None:
        """Load what was published since the last sync. The generation is read before what it covers,
        so a publish in between is caught by the next check. If the backend holds older versions than
        this worker serves (Redis restarted empty), re-seed it from ours first; a process that never
        synced with it waits SEED_GRACE_S for a server that did (its versions may be newer than ours)."""
        t0 = time.perf_counter()
        gen = self.state.generation()  # the per-batch cost of the check: one stat / one Redis MGET
        metrics.state_check_seconds.observe(time.perf_counter() - t0)
        now = time.monotonic()
        retry_load = min((f.retry_at for f in self.load_failures.values()), default=float("inf"))
        if gen == self._seen_gen and self._synced and now < retry_load:
            return
        pub = self.state.published()
        if pub.lost and not self._synced:
            self._lost_since = now if self._lost_since is None else self._lost_since
            if now - self._lost_since < SEED_GRACE_S:
                raise SeedWait(f"{self.state.description} has no published state: waiting for a "
                               "server that served it to re-seed it")
            log.info("%s: no server re-seeded it within %g s (a first deployment, or every server that "
                     "served it is gone)", self.state.description, SEED_GRACE_S)
        if pub.lost or any(pub.version(a) < v for a, v in self.applied.items()):
            # a first deployment seeds an empty backend (info); a backend that lost or rolled back the
            # versions this worker had synced with is worth a warning
            log.log(logging.WARNING if self._synced else logging.INFO,
                    "%s %s: seeding it with the versions this worker serves %s", self.state.description,
                        "has no published state (new, or restarted without its data)" if pub.lost
                        else "holds older versions than this worker serves", self.applied)
            self.state.reseed(dict(self.applied), self._served_adapter, set(self._merged_pub))
            gen = self.state.generation()
            pub = self.state.published()
        self._load(pub, now)
        want = {a for a in pub.merged if a in self.applied} if self.engine is not None else set()
        if want - self._merged_pub:
            self.engine.merge(sorted(want - self._merged_pub))
        if self._merged_pub - want:
            self.engine.unmerge(sorted(self._merged_pub - want))
        self._merged_pub = want
        self._seen_gen = gen
        if self.load_failures and not self._synced:  # a new worker never serves older adapters
            raise RuntimeError("cannot load the published adapters: " + "; ".join(
                f"{a} v{f.version}: {f.error}" for a, f in sorted(self.load_failures.items())))
        self._synced = True

    def _load(self, pub, now: float) -> None:
        """Load every newer published version. One that fails to load is remembered in `load_failures`
        (counted, logged, shown in /v1/agents) and retried at most every LOAD_RETRY_S; a newer
        version is tried at once. The other agents load regardless."""
        for agent, v in pub.versions.items():
            if agent not in self.applied:
                continue
            fail = self.load_failures.get(agent)
            if v <= self.applied[agent] or fail is not None and fail.version < v:
                self.load_failures.pop(agent, None)
                fail = None
            if v <= self.applied[agent] or fail is not None and now < fail.retry_at:
                continue
            try:
                if self.engine is None:
                    raise NotSwappable(f"this server acts through {type(self.backend).__name__} "
                                       f"(LORASA_BACKEND={self.cfg.backend}), which cannot load adapters")
                self.engine.load_adapter(self.state.adapter_blob(agent, v), agent)
            except StateUnavailable:
                raise
            except Exception as e:  # a bad or pruned blob: keep serving the version we have
                self.load_failures[agent] = LoadFailure(v, now + LOAD_RETRY_S, f"{type(e).__name__}: {e}")
                metrics.adapter_load_failures.labels(agent_id=agent).inc()
                log.error("cannot load adapter %r v%d (serving v%d, retry in %g s): %s", agent, v,
                          self.applied[agent], LOAD_RETRY_S, self.load_failures[agent].error)
                continue
            self.load_failures.pop(agent, None)
            self.applied[agent] = v
            metrics.adapter_version.labels(agent_id=agent).set(v)
            metrics.adapter_swaps.labels(agent_id=agent).inc()

    def _served_adapter(self, agent_id: str) -> bytes:
        """The safetensors bytes of the adapter this worker serves for `agent_id` (for re-seeding)."""
        tensors = {n: t.cpu() for n, t in self.engine.adapter(agent_id).items()}
        return adapter_bytes(self.spec, agent_id, tensors)

    # --- snapshots for the read-only endpoints (run as control jobs) ----------------------------
    def agents_info(self) -> list[dict]:
        cached = set(self.engine.merged_agents) if self.engine is not None else set()
        pinned = set(self.engine.pinned_agents) if self.engine is not None else set()
        out = []
        for a in self.spec.agents:
            v = self.applied[a.agent_id]
            key = (a.agent_id, v)
            if key not in self._fp_cache:
                ad = self.engine.adapter(a.agent_id) if self.engine is not None else None
                self._fp_cache[key] = "" if ad is None else fingerprint({n: t.cpu() for n, t in ad.items()})
            out.append({"agent_id": a.agent_id, "obs_dim": a.obs_dim, "act_dim": a.act_dim,
                        "version": v, "adapter_fingerprint": self._fp_cache[key],
                        "merged": a.agent_id in pinned, "auto_merged": a.agent_id in cached - pinned,
                        "load_error": self._load_error(a.agent_id)})
        return out

    def _load_error(self, agent_id: str) -> dict | None:
        """The published version this worker cannot load for `agent_id` (it serves an older one)."""
        f = self.load_failures.get(agent_id)
        return None if f is None else {"version": f.version, "error": f.error}


def _nonfinite_rows(actions: np.ndarray, logp: np.ndarray, h: np.ndarray | None) -> np.ndarray:
    """[B] bool: rows whose action, log-prob or next state is NaN or inf."""
    bad = ~np.isfinite(logp)
    if actions.dtype.kind == "f":
        bad |= ~np.isfinite(actions.reshape(len(actions), -1)).all(axis=1)
    if h is not None:
        bad |= ~np.isfinite(h).all(axis=1)
    return bad


def _nonfinite_error(rows: np.ndarray) -> BadRequest:
    shown = rows[:10].tolist()
    more = f" and {len(rows) - 10} more" if len(rows) > 10 else ""
    return BadRequest(f"rows {shown}{more}: the policy's output is NaN or inf for these inputs (extreme "
                      "obs or state values?); nothing was stored", 422)


class NotSwappable(RuntimeError):
    """Adapters cannot be swapped or merged: the server acts through a backend other than `Engine`."""


def open_act_backend(cfg: ServiceConfig, policy_dir: Path) -> ActBackend:
    """LORASA_BACKEND=engine: the policy directory through `Engine` (hot swap, merge). onnx: a
    `lorasa-export` directory through onnxruntime, the graphs its manifest lists as verified (the
    adapters are fixed in them: uploads and merges are refused)."""
    if cfg.backend == "onnx":
        from lorasa_serve.onnx_backend import OnnxEngine
        return OnnxEngine.from_dir(policy_dir, providers="cpu" if cfg.device == "cpu" else "auto",
                                   threads=cfg.torch_threads)
    return Engine.from_dir(policy_dir, device=cfg.device, mode=cfg.mode, max_sessions=cfg.max_sessions)


def _fail_all(jobs: list[_Job], error: Exception, what: str) -> None:
    """A bug (not a bad request) stopped `what`: log it, answer each of its jobs with the error."""
    log.exception(what)
    for job in jobs:
        _answer(job.future, error=error)


def _answer_all(outcomes: list[tuple[_Job, object]], errors: dict[int, BaseException]) -> None:
    """Answer each job with its error (from `errors` by id(job), else its outcome if an exception),
    or its result."""
    for job, out in outcomes:
        out = errors.get(id(job), out)
        if isinstance(out, BaseException):
            _answer(job.future, error=out)
        else:
            _answer(job.future, out)


def _run_into(future: Future, fn: Callable[[], object]) -> None:
    try:
        result = fn()
    except BaseException as e:  # delivered to the awaiting handler, never kills the thread
        _answer(future, error=e)
    else:
        _answer(future, result)


def _answer(future: Future, result: object = None, error: BaseException | None = None) -> None:
    """Set a job's result or exception, unless it is already done (a defensive no-op: jobs are
    marked running when taken, so a handler's cancellation no longer reaches them)."""
    if future.done():
        return
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass


def _reason(e: Exception) -> str:
    return str(e) if isinstance(e, StateUnavailable) else f"{type(e).__name__}: {e}"

