"""The micro-batcher: one queue of jobs and one thread that runs them in cycles, plus the same cycles
run on the event loop for small stateless requests (the fast path).

HTTP handlers enqueue checked `ActRequest`s (or control functions) and await a future. Each cycle:
the adapter sync's `before_cycle` (services/adapter_sync.py), then, holding the engine lock, the
control jobs, then ONE `serve` per `deterministic` flag over every request taken (up to
`max_batch_rows`; a seeded sampling request alone, with its own generator). Batches form adaptively:
while a forward runs, new requests queue up and go together into the next one; an idle server answers
a lone request at once.

Fast path (`on_loop`): a small stateless request (<= `inline_max_rows`, with an adapter sync that never
waits on the network) joins the event loop's pending list, and one callback scheduled after every
handler ready in the same loop iteration runs ONE cycle for all of them on the loop thread: requests
that arrive together are merged without a thread hand-off, a lone one is answered at once. The engine
lock keeps every cycle serialised, so versions and errors are the batcher's; while the batcher thread
holds it (a big request's forward) or has work queued, the pending requests go to its queue instead.

A job is marked running when a cycle takes it: a request cancelled while queued (client gone,
timeout) is dropped before any lease is taken; once running it completes (state stored, lease freed)
and its answer is discarded.
"""
from __future__ import annotations

import asyncio
import threading
from collections import deque
from concurrent.futures import Future
from typing import Callable, Protocol

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
        """Run before every cycle: on the batcher thread before the engine lock is taken (it may take it
        itself: the lock is re-entrant), on the event loop with it already held."""


class Batcher:
    def __init__(self, cfg: ServiceConfig, sync: CycleSync, engine_lock: threading.RLock,
                 serve: Callable[[list[Job]], None]):
        """serve(jobs): answer act jobs of one `deterministic` flag (called under the engine lock)."""
        self.cfg = cfg
        self._sync = sync
        self._lock = engine_lock  # held for every cycle: the batcher's and the inline ones
        self._serve = serve
        self._queue: deque[Job] = deque()
        self._cv = threading.Condition()
        self._on_loop: list[tuple[Job, asyncio.Future]] = []  # fast-path requests waiting for a loop cycle
        self.stopped: str | None = None  # why the batcher thread ended (it should never)
        self._thread = threading.Thread(target=self._loop, name="lorasa-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # --- called from HTTP handlers -------------------------------------------------------------
    def submit(self, req: ActRequest) -> Future:
        """Enqueue `req` for the batcher thread (a session step's session is claimed by the caller)."""
        return self._put(Job(req))

    def control(self, fn: Callable[[], object]) -> Future:
        """Run `fn` on the batcher thread (serialised with forwards), after `before_cycle`."""
        return self._put(Job(None, fn))

    def may_inline(self, req: ActRequest) -> bool:
        """The fast path may take `req` (a stateless request: the caller, which owns sessions, decides
        that): small, and an adapter sync that never waits on the network (a cycle on the event loop
        must never block it on I/O)."""
        return req.n <= self.cfg.inline_max_rows and self._sync.inline_ok

    async def on_loop(self, req: ActRequest) -> object:
        """The fast path (called on the event loop for a request `may_inline` accepts): -> its result.
        The first request of a loop iteration schedules one cycle for every request that joins before
        it runs (`_loop_cycle`)."""
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._on_loop.append((Job(req), waiter))
        if len(self._on_loop) == 1:
            loop.call_soon(self._loop_cycle, loop)
        return await waiter

    def _loop_cycle(self, loop: asyncio.AbstractEventLoop) -> None:
        """One cycle on the event loop over the pending fast-path requests (up to `inline_max_rows`
        rows; the rest get a cycle of their own next); when the batcher thread is busy, they all go to
        its queue (it merges them there) instead of waiting for its lock on the loop."""
        pending = [(j, w) for j, w in self._on_loop if not w.done()]  # done: the handler was cancelled
        take, rows = 0, 0
        while take < len(pending) and (take == 0 or rows + pending[take][0].req.n <= self.cfg.inline_max_rows):
            rows += pending[take][0].req.n
            take += 1
        now, self._on_loop = pending[:take], pending[take:]
        if self._on_loop:
            loop.call_soon(self._loop_cycle, loop)
        try:
            if now and self._cycle_here([j for j, _ in now]):
                return
            for job, waiter in now:  # the batcher thread's turn
                fut = self._put(job)
                fut.add_done_callback(lambda f, w=waiter: loop.call_soon_threadsafe(_settle, w, f))
                # a handler gone (client gone, timeout) cancels its job while still queued there
                waiter.add_done_callback(lambda w, f=fut: w.cancelled() and f.cancel())
        except Exception as e:  # the batcher stopped (StateUnavailable), or a bug: never leave a handler waiting
            for _, waiter in now:
                if not waiter.done():
                    waiter.set_exception(e)
        finally:
            for job, waiter in now:
                if job.future.done():
                    _settle(waiter, job.future)

    def _cycle_here(self, jobs: list[Job]) -> bool:
        """Run one cycle for `jobs` on this thread, unless the batcher thread holds the engine lock,
        has work queued (it goes first) or stopped: -> whether it ran (every job answered)."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            with self._cv:
                if self._queue or self.stopped is not None:
                    return False
            for job in jobs:
                job.future.set_running_or_notify_cancel()
            try:
                self._sync.before_cycle()
                self._cycle(jobs)
                metrics.inline_requests.inc(len(jobs))
            except Exception as e:
                fail_all(jobs, e, "a cycle on the event loop failed")
            return True
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


def _settle(waiter: asyncio.Future, done: Future) -> None:
    """Copy a finished job's outcome to the handler's asyncio future (unless the handler is gone)."""
    if waiter.done() or not done.done() or done.cancelled():
        return
    error = done.exception()
    if error is not None:
        waiter.set_exception(error)
    else:
        waiter.set_result(done.result())
