"""Session steps against the state backend (services/state): before a batch's forward, lease and read
the session of every session request; after it, store the new states of the steps that succeeded and
release every lease (a separate step: nothing is stored for a failed or rejected output).

Owns the sessions with a step queued or running in this worker: a second step of one of them is
refused at once (SessionBusy, 409); another worker or replica refuses it through the backend's lease.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

import numpy as np

from lorasa_serve.protocol import ActRequest
from lorasa_serve.spec import PolicySpec

from . import metrics
from .jobs import Job, answer, answer_all
from .state import SessionBusy, SessionStep, StateBackend, StateUnavailable
from .state.base import StateOutcomeUnknown

log = logging.getLogger("lorasa.service")


class SessionSteps:
    def __init__(self, spec: PolicySpec, state: StateBackend, lease_s: float):
        self.spec, self.state = spec, state
        self._lease_s = lease_s  # named in the error of a step that outlasted its lease
        self._inflight: set[str] = set()  # sessions with a step queued or running in this worker
        self._lock = threading.Lock()  # guards _inflight (HTTP handlers claim, done-callbacks release)
        self.last_error: str | None = None  # why the last session call failed to reach the store (None
        # once one succeeded): shown in /v1/agents; written only by the cycle

    # --- this worker's steps in flight (HTTP handlers) -----------------------------------------
    def session_of(self, req: ActRequest) -> str | None:
        """The session `req` steps; None for a stateless request (a feed-forward policy has no state,
        so it ignores session ids)."""
        return req.session_id if self.spec.recurrent else None

    def claim(self, session_id: str) -> None:
        """Raises SessionBusy if a step of this session is already queued or running here."""
        with self._lock:
            if session_id in self._inflight:
                raise SessionBusy(f"session {session_id!r} has another step in flight")
            self._inflight.add(session_id)

    def release(self, session_id: str) -> None:
        with self._lock:
            self._inflight.discard(session_id)

    @property
    def in_flight(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._inflight)

    # --- a batch's steps (the cycle, under the engine lock) -----------------------------------
    def open(self, jobs: list[Job], down: str | None) -> tuple[list[Job], dict[int, SessionStep]]:
        """Lease and read the session of every session request -> (the jobs still to run, id(job) ->
        its step). A busy session's request is answered with SessionBusy; all of them with
        StateUnavailable if the backend cannot be reached, at once when `down` says it is known down."""
        if not self.spec.recurrent:
            return jobs, {}
        sess = [j for j in jobs if j.req.session_id is not None]
        if not sess:
            return jobs, {}
        try:
            self._fail_fast(down)
            opened = self.state.open_steps([(j.req.session_id, j.req.agent_ids) for j in sess])
            self.last_error = None
        except StateUnavailable as e:
            self._unavailable(e)
            opened = [e] * len(sess)
        except Exception as e:  # unexpected (one bad item fails the whole transaction): isolate it
            log.exception("opening the sessions of a batch failed")
            opened = [_one(self.state.open_steps, (j.req.session_id, j.req.agent_ids)) for j in sess] \
                if len(sess) > 1 else [e]
        steps, failed = {}, set()
        for job, step in zip(sess, opened):
            if isinstance(step, SessionStep):
                steps[id(job)] = step
            else:
                answer(job.future, error=step)
                failed.add(id(job))
        return [j for j in jobs if id(j) not in failed], steps

    def states(self, reqs: list[ActRequest], steps: list[SessionStep | None]) -> np.ndarray | None:
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

    def close(self, outcomes: list[tuple[Job, object]], steps: dict[int, SessionStep]) -> None:
        """Store new states (ok outcomes) or only release leases (failures), then answer every job.
        A step whose state could not be stored is answered with the error, not with its outputs."""
        closing = [(job, out) for job, out in outcomes if id(job) in steps]
        if not closing:  # no session step in this batch: nothing to store or release (the local backend
            # drops expired sessions in the next close_steps: they only linger while no session steps)
            return answer_all(outcomes, {})
        try:
            items = [(steps[id(job)], None if isinstance(out, BaseException) else out.state)
                     for job, out in closing]
            stored = self.state.close_steps(items)
        except StateUnavailable as e:
            self._unavailable(e)
            stored = [_outcome_unknown(e)] * len(closing)
        except Exception as e:  # unexpected: store each step alone, so only the bad one fails
            log.exception("storing the sessions of a batch failed")
            stored = [_one(self.state.close_steps, item) for item in items] if len(items) > 1 else [e]
        errors = {}
        for (job, out), ok in zip(closing, stored):
            if isinstance(ok, StateUnavailable) and not isinstance(ok, StateOutcomeUnknown):
                ok = _outcome_unknown(ok)  # never marked safe to retry
            if isinstance(ok, BaseException):
                errors[id(job)] = ok
            elif not ok and not isinstance(out, BaseException):
                errors[id(job)] = SessionBusy(
                    f"session {job.req.session_id!r} was reset, or its step outlasted the "
                    f"{self._lease_s:g} s lease, while this step ran: its state was not stored")
        answer_all(outcomes, errors)


    def reset(self, session_id: str, down: str | None) -> bool:
        """Forget a session (a control job: serialised with the steps of this worker) -> it existed.
        StateUnavailable at once when `down` says the backend is known down."""
        try:
            self._fail_fast(down)
            return self.state.reset_session(session_id)
        except StateUnavailable as e:
            self._unavailable(e)
            raise

    @staticmethod
    def _fail_fast(down: str | None) -> None:
        if down is not None:  # known down (or stalled): no call that would wait on it; the sync retries
            raise StateUnavailable(down)

    def _unavailable(self, e: StateUnavailable) -> None:
        metrics.state_unavailable.labels(op="session").inc()
        self.last_error = str(e)


def _outcome_unknown(e: Exception) -> StateOutcomeUnknown:
    return StateOutcomeUnknown(f"storing the session step failed, its state may or may not have been stored: {e}")


def _one(batch_fn: Callable[[list], list], item: object) -> object:
    """batch_fn([item])[0], or the exception it raised."""
    try:
        return batch_fn([item])[0]
    except Exception as e:
        return e
