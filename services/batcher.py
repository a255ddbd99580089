"""The micro-batcher: one queue of jobs and one thread that runs them in cycles.

HTTP handlers enqueue checked `ActRequest`s (or control functions) and await a future. Each cycle:
the adapter sync's `before_cycle` (services/adapter_sync.py), then, holding the engine lock, the
control jobs, then ONE `serve` per `deterministic` flag over every request taken (up to
`max_batch_rows`; a seeded sampling request alone, with its own generator). Batches form adaptively:
while a forward runs, new requests queue up and go together into the next one; an idle server answers
a lone request at once.

Fast path: a lone small stateless request (<= `inline_max_rows`, no other request being handled,
nothing queued, no cycle running, an adapter sync that never waits on the network) runs that same
cycle on the handler's thread instead, saving the thread hand-off; the engine lock keeps every cycle
serialised, so versions and errors are the batcher's.

A job is marked running when the batcher takes it: a request cancelled while queued (client gone,
timeout) is dropped before any lease is taken; once running it completes (state stored, lease freed)
and its answer is discarded.
"""
from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Callable, Iterator, Protocol

from lorasa_serve.protocol import ActRequest

from . import metrics
from .config import ServiceConfig
from .jobs import Job, answer, fail_all, run_into
from .state import StateUnavailable


class CycleSync(Protocol):
    """What the batcher needs of the adapter sync (services/adapter_sync.py)."""
    inline_ok: bool  # before_cycle never waits on the network: the fast path may run cycles
    idle_check_s: float | None  # an idle batcher still runs an (empty) cycle this often

    def before_cycle(self) -> None:
        """Run before every cycle, before the engine lock is taken (it may take it itself)."""


class Batcher:
    def __init__(self, cfg: ServiceConfig, recurrent: bool, sync: CycleSync, engine_lock: threading.RLock,
                 serve: Callable[[list[Job]], None]):
        """serve(jobs): answer act jobs of one `deterministic` flag (called under the engine lock)."""
        self.cfg = cfg
        self._recurrent = recurrent  # a feed-forward policy ignores session ids: every request is stateless
        self._sync = sync
        self._lock = engine_lock  # held for every cycle: the batcher's and the inline ones
        self._serve = serve
        self._queue: deque[Job] = deque()
        self._cv = threading.Condition()
        self._handling = 0  # act requests in this worker's HTTP handlers (see handling())
        self.stopped: str | None = None  # why the batcher thread ended (it should never)
        self._thread = threading.Thread(target=self._loop, name="lorasa-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # --- called from HTTP handlers -------------------------------------------------------------
    def submit(self, req: ActRequest) -> Future:
        """Enqueue `req` (a session step's session is claimed by the caller), or answer it at once on
        the fast path."""
        return self._inline(req) or self._put(Job(req))

    def control(self, fn: Callable[[], object]) -> Future:
        """Run `fn` on the batcher thread (serialised with forwards), after `before_cycle`."""
        return self._put(Job(None, fn))

    def may_inline(self, req: ActRequest) -> bool:
        """The fast path could take `req` (see `_inline` for what else it needs)."""
        return (req.n <= self.cfg.inline_max_rows and self._handling <= 1 and self._sync.inline_ok
                and (req.session_id is None or not self._recurrent))

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
        handled, an adapter sync that may wait on the network (it must never block the event loop),
        something queued (it goes first), or a cycle running."""
        if not self.may_inline(req):
            return None
        if not self._lock.acquire(blocking=False):
            return None
        try:
            with self._cv:
                if self._queue or self.stopped is not None:
                    return None
            job = Job(req)
            job.future.set_running_or_notify_cancel()
            try:
                self._sync.before_cycle()
                self._cycle([job])
            except Exception as e:
                fail_all([job], e, "an inline cycle failed")
            metrics.inline_requests.inc()
            return job.future
        finally:
            self._lock.release()

    def _put(self, job: Job) -> Future:
        with self._cv:
            if self.stopped is not None:
                raise StateUnavailable(self.stopped)
            self._queue.append(job)
            self._cv.notify()
        return job.future

    # --- the batcher thread --------------------------------------------------------------------
    def _loop(self) -> None:
        """Cycles forever; a bug in a cycle answers that cycle's jobs with the error. Should the thread
        end anyway, the worker turns not ready and refuses new jobs (never hangs them)."""
        try:
            while True:
                jobs = self._take(self._sync.idle_check_s)
                try:
                    self._sync.before_cycle()
                    with self._lock:
                        self._cycle(jobs)
                except Exception as e:
                    fail_all(jobs, e, "a batcher cycle failed")
        finally:
            with self._cv:
                self.stopped = "the batcher thread of this worker stopped (see its log)"
                pending, self._queue = list(self._queue), deque()
            for job in pending:
                answer(job.future, error=StateUnavailable(self.stopped))

    def _cycle(self, jobs: list[Job]) -> None:
        """Control jobs first, then the act jobs: one `serve` per `deterministic` flag, a seeded
        sampling request alone (with its own generator)."""
        for job in [j for j in jobs if j.req is None]:
            run_into(job.future, job.fn)
        acts = [j for j in jobs if j.req is not None]
        for det in (True, False):
            group = [j for j in acts if j.req.deterministic == det and (det or j.req.seed is None)]
            if group:
                self._serve_safely(group)
        for job in [j for j in acts if not j.req.deterministic and j.req.seed is not None]:
            self._serve_safely([job])  # seeded sampling: alone, with its own generator

    def _serve_safely(self, jobs: list[Job]) -> None:
        """serve, and a bug in it answers its jobs with the error instead of stopping the thread."""
        try:
            self._serve(jobs)
        except Exception as e:
            fail_all(jobs, e, "serving a batch failed")

    def _take(self, timeout: float | None) -> list[Job]:
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
