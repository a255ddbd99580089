"""A batcher job (an act request or a control function) and the one way each job is answered.

A job's future is set exactly once: by whichever step finished it (a refused session, the forward's
outcome, a bug). `answer` is a no-op on a future already done, so no step can answer twice.
"""
from __future__ import annotations

import logging
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Callable

from lorasa_serve.protocol import ActRequest

log = logging.getLogger("lorasa.service")


@dataclass
class Job:
    req: ActRequest | None  # None: a control job
    fn: Callable[[], object] | None = None
    future: Future = field(default_factory=Future)


def answer(future: Future, result: object = None, error: BaseException | None = None) -> None:
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


def answer_all(outcomes: list[tuple[Job, object]], errors: dict[int, BaseException]) -> None:
    """Answer each job with its error (from `errors` by id(job), else its outcome if an exception),
    or its result."""
    for job, out in outcomes:
        out = errors.get(id(job), out)
        if isinstance(out, BaseException):
            answer(job.future, error=out)
        else:
            answer(job.future, out)


def fail_all(jobs: list[Job], error: Exception, what: str) -> None:
    """A bug (not a bad request) stopped `what`: log it, answer each of its jobs with the error."""
    log.exception(what)
    for job in jobs:
        answer(job.future, error=error)


def run_into(future: Future, fn: Callable[[], object]) -> None:
    """Run a control job's function; its result or exception goes to the awaiting handler (it never
    kills the calling thread)."""
    try:
        result = fn()
    except BaseException as e:
        answer(future, error=e)
    else:
        answer(future, result)
