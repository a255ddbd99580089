"""Per-worker runtime: the facade the HTTP handlers (services/http.py, services/oip.py) talk to.

It builds and wires the pieces, each a module with one owner and no mutable state shared with the others:

    act_backend     what acts (`Engine`, or `OnnxEngine` for an export)
    adapter_sync    the versions served, kept in step with the state backend: owns `ready`/`state_error`
    check_runner    where its checks run: before each cycle (local state dir) or on a thread (Redis)
    batcher         the queue, the batcher thread, the engine lock, the fast path (cycles on the event loop)
    session_steps   leases and recurrent states of a batch's session steps; the sessions in flight here
    batch_forward   one `backend.act_checked` over a batch, NaN/inf screening, failures isolated
    agents_view     the `/v1/agents` view

A batch is served (under the engine lock) as: open its session steps, one forward, store the new
states of the steps that succeeded and release every lease, answer each request.
"""
from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Callable, Mapping

from lorasa_serve import Engine
from lorasa_serve.backend import ActBackend
from lorasa_serve.protocol import ActRequest, ActResult, AgentTable

from .act_backend import check_agent_order, open_act_backend
from .adapter_sync import AdapterSync, LoadFailure
from .agents_view import AgentsView
from .batch_forward import BatchForward
from .batcher import Batcher
from .config import ServiceConfig
from .jobs import Job
from .session_steps import SessionSteps
from .state import SessionLimits, StateBackend, open_backend


def session_limits(cfg: ServiceConfig) -> SessionLimits:
    return SessionLimits(ttl_s=cfg.session_ttl_s, max_sessions=cfg.max_sessions,
                         max_bytes=cfg.max_session_bytes, lease_s=cfg.timeout_s)


class PolicyRuntime:
    def __init__(self, cfg: ServiceConfig, policy_dir: Path, state: StateBackend | None = None,
                 backend: ActBackend | None = None):
        """backend: what acts (default: from cfg, `open_act_backend`); only an `Engine` swaps adapters.
        state: the state backend (default: from cfg, Redis if LORASA_REDIS_URL else LORASA_STATE_DIR).
        An unreachable backend does not fail construction: `ready` stays False (with `state_error`
        saying why) until a sync succeeds, so a new worker never serves stale adapters."""
        self.cfg = cfg
        self.backend = backend or open_act_backend(cfg, policy_dir)  # every forward goes through it
        check_agent_order(self.backend)
        self.engine = self.backend if isinstance(self.backend, Engine) else None  # hot swap and merge
        self.spec = self.backend.spec
        self.table = AgentTable(self.spec)  # what the request parsers check against
        self.state = state or open_backend(cfg.redis_url, cfg.state_dir, self.spec.backbone_fingerprint,
                                           self.spec.hidden, session_limits(cfg))
        engine_lock = threading.RLock()  # held for every use of the backend: cycles, adapter loads
        self.sync = AdapterSync(cfg, self.backend, self.state, engine_lock)
        self.sessions = SessionSteps(self.spec, self.state, cfg.timeout_s)
        self.forward = BatchForward(self.backend, self.sync.versions, self.sessions.states)
        self.view = AgentsView(self.spec, self.engine, self.sync.versions, self.sync.load_failures)
        self.batcher = Batcher(cfg, self.sync, engine_lock, self._serve)
        self.sync.start()
        self.batcher.start()

    # --- read-only views -----------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """A sync with the state backend succeeded and the batcher runs."""
        return self.sync.ready and self.batcher.stopped is None

    @property
    def state_error(self) -> str | None:
        """Why the worker is not ready, or why the state backend is failing now (None: it is not)."""
        return self.batcher.stopped or self.sync.state_error

    @property
    def applied(self) -> Mapping[str, int]:
        """agent -> the global adapter version served."""
        return self.sync.versions

    @property
    def load_failures(self) -> Mapping[str, LoadFailure]:
        return self.sync.load_failures

    # --- called from HTTP handlers -------------------------------------------------------------
    def submit(self, req: ActRequest) -> Future:
        """Raises SessionBusy if a step of the same session is already queued or running here (another
        worker or replica refuses it through the backend's lease instead)."""
        sid = self.sessions.session_of(req)
        if sid is None:
            return self.batcher.submit(req)
        self.sessions.claim(sid)
        try:
            fut = self.batcher.submit(req)
        except BaseException:  # the batcher thread stopped
            self.sessions.release(sid)
            raise
        fut.add_done_callback(lambda _: self.sessions.release(sid))
        return fut

    async def act(self, req: ActRequest) -> ActResult:
        """An HTTP handler's call (on the event loop): the request's result. Small stateless requests
        take the fast path (`Batcher.on_loop`: cycles on the event loop, merging the requests that
        arrive together); the others the batcher thread."""
        if self.sessions.session_of(req) is None and self.batcher.may_inline(req):
            return await self.batcher.on_loop(req)
        return await asyncio.wrap_future(self.submit(req))

    def control(self, fn: Callable[[], object]) -> Future:
        """Run `fn` on the batcher thread (serialised with forwards), after the adapter sync's
        `before_cycle`."""
        return self.batcher.control(fn)

    def agents_info(self) -> list[dict]:
        """The `/v1/agents` list (run it as a control job)."""
        return self.view.agents()

    def state_report(self) -> dict[str, str | None]:
        """For `/v1/agents`: why the state backend's check is failing now (stateless requests are served
        with the adapters last applied) and why the last session call could not reach the session store."""
        return {"state_error": self.state_error, "sessions_error": self.sessions.last_error}

    def reset_session(self, session_id: str) -> bool:
        """Forget a session -> it existed (run it as a control job)."""
        return self.sessions.reset(session_id, self.sync.down_reason())

    def refresh(self) -> str | None:
        """After a publish: have this worker check the state backend and apply what it finds (blocking:
        call it off the event loop) -> None, or why that did not finish in time."""
        timeout = self.cfg.timeout_s / 2
        if self.sync.refresh(timeout):
            return None
        return f"this worker did not finish a check of {self.state.description} within {timeout:g} s"

    # --- a batch (the batcher's cycle, under the engine lock) ----------------------------------
    def _serve(self, jobs: list[Job]) -> None:
        """Open the batch's sessions, run the forward, then store the states of the steps that
        succeeded (a separate step: nothing is stored for a failed or rejected output)."""
        jobs, steps = self.sessions.open(jobs, self.sync.down_reason())
        outcomes = self.forward.run(jobs, steps)
        self.sessions.close(outcomes, steps)
