"""Where the adapter sync's checks of the state backend run (services/adapter_sync.py).

`InlineChecks` (the local state dir: a check is one `stat`): on whichever thread runs a batcher cycle,
under the engine lock, before the cycle, as the inline fast path needs.

`BackgroundChecks` (Redis: a check is a network round trip that may stall): on a thread of their own,
so a request never waits on the network for one. Before each cycle the batcher asks for a check and
waits for one that started after it asked, at most FRESH_WAIT_S, and only while the backend answers:
with a healthy backend every batch still sees what was published before it started (an upload's 200
on one replica is served by the others' next requests); with a stalled one, the batch goes ahead at
once with the adapters last applied (versions never go backwards) and its session steps fail fast
(503). An idle worker's thread still checks once every IDLE_CHECK_S.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager, nullcontext
from typing import Callable, ContextManager, Iterator

IDLE_CHECK_S = 1.0  # an idle worker checks the backend at least this often
FRESH_WAIT_S = 0.25  # a batch waits at most this long for a check that started after it was formed

CheckFn = Callable[[bool], None]  # check(force): sync with the backend (force: even while backed off)


class InlineChecks:
    inline_ok = True  # a check never waits on the network: the fast path may run cycles
    idle_check_s = IDLE_CHECK_S  # the batcher's idle cycles are the idle checks

    def __init__(self, check: CheckFn, engine_lock: threading.RLock):
        self._check, self._lock = check, engine_lock
        self.stopped: str | None = None  # (there is no thread of its own to stop)

    def start(self) -> None:
        pass

    def before_cycle(self) -> None:
        with self._lock:
            self._check(False)

    def refresh(self, timeout: float) -> bool:
        """Check now, on the calling thread; -> True (it always finishes)."""
        with self._lock:
            self._check(True)
        return True

    def reading(self) -> ContextManager[None]:
        return nullcontext()

    def silence(self) -> str | None:
        return None


class BackgroundChecks:
    inline_ok = False  # a cycle may wait (FRESH_WAIT_S) for this thread: never on the event loop
    idle_check_s = None  # the batcher needs no idle cycles: this thread checks while idle

    def __init__(self, check: CheckFn, failing: Callable[[], bool], description: str):
        """failing(): the last check failed (the backend is known down: batches do not wait)."""
        self._check, self._failing, self._description = check, failing, description
        self._cv = threading.Condition()  # guards every field below
        self._asked = 0  # checks asked for (one per cycle, one per refresh), numbered from 1
        self._forced = 0  # the last ticket that must run even while backed off (a refresh)
        self._done = 0  # the ticket of the last check that finished
        self._last_done = time.monotonic()
        self._reading_since: float | None = None  # a generation read in flight since (monotonic)
        self._not_answering: str | None = None  # this cycle's verdict (the batcher thread's)
        self.stopped: str | None = None  # why the thread ended (it should never)
        self._thread = threading.Thread(target=self._run, name="lorasa-state-sync", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # --- the batcher thread, before each cycle ---------------------------------------------------
    def before_cycle(self) -> None:
        """Ask for a check; wait for it at most FRESH_WAIT_S, not at all while the backend is known
        down or has not answered a read for FRESH_WAIT_S already."""
        with self._cv:
            self._asked += 1
            ticket = self._asked
            self._cv.notify_all()
            deadline = time.monotonic() + FRESH_WAIT_S
            while self._done < ticket and not self._failing() and self.stopped is None:
                left = deadline - time.monotonic()
                if left <= 0 or self._read_for() >= FRESH_WAIT_S:
                    break
                self._cv.wait(left)
            silent = self._read_for()
            self._not_answering = None if self._done >= ticket or silent < FRESH_WAIT_S / 2 else (
                f"{self._description} has not answered for {silent:.2f} s")

    def silence(self) -> str | None:
        """Why this cycle should treat the backend as down although no check failed yet (a read of it
        has been in flight for a while: it stalled), or None. Only for the batcher thread."""
        return self._not_answering

    # --- an HTTP handler's thread ----------------------------------------------------------------
    def refresh(self, timeout: float) -> bool:
        """Check now (even while backed off) and wait for it; -> whether it finished within `timeout`."""
        with self._cv:
            self._asked += 1
            ticket = self._forced = self._asked
            self._cv.notify_all()
            return self._cv.wait_for(lambda: self._done >= ticket or self.stopped is not None, timeout) \
                and self.stopped is None

    # --- the check thread ------------------------------------------------------------------------
    @contextmanager
    def reading(self) -> Iterator[None]:
        """Around each read of the backend's generation: how long one is in flight tells a stall."""
        with self._cv:
            self._reading_since = time.monotonic()
        try:
            yield
        finally:
            with self._cv:
                self._reading_since = None

    def _read_for(self) -> float:
        return 0.0 if self._reading_since is None else time.monotonic() - self._reading_since

    def _run(self) -> None:
        try:
            while True:
                ticket, force = self._next()
                self._check(force)  # never raises: failures are remembered by the sync
                with self._cv:
                    self._done, self._last_done = ticket, time.monotonic()
                    self._cv.notify_all()
        finally:
            with self._cv:
                self.stopped = "the state sync thread of this worker stopped (see its log)"
                self._cv.notify_all()

    def _next(self) -> tuple[int, bool]:
        """Wait until a check is due (asked for, or IDLE_CHECK_S after the last one) -> (its ticket,
        whether it is forced)."""
        with self._cv:
            while True:
                if self._asked > self._done:
                    return self._asked, self._forced > self._done
                left = self._last_done + IDLE_CHECK_S - time.monotonic()
                if left <= 0:
                    return self._asked, False
                self._cv.wait(left)
