"""Per-worker runtime: the Engine, the state backend (services/state), and the micro-batcher.

One batcher thread owns every engine call and every session mutation in this process: HTTP handlers
enqueue validated `ActRequest`s (or control jobs) and await a future. Each cycle the thread (1) checks
the backend's generation (one `stat` or one Redis MGET, timed as `lorasa_state_check_seconds`) and
loads what was published since, (2) runs control jobs, (3) takes every queued request up to
`max_batch_rows` and runs ONE `Engine.act` per `deterministic` flag over all their rows: open the
sessions of the batch (lease + state), forward, then, as a separate step, store the new states of the
steps that succeeded and release the leases. Batches form adaptively: while a forward runs, new
requests queue up and go together into the next one; an idle server answers a lone request at once.
If the backend is unreachable, stateless requests keep being served with the adapters last applied,
session steps fail with StateUnavailable (503), and the check is retried every batch (and every
second while idle) until it succeeds.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lorasa_serve import Engine, LorasaError
from lorasa_serve.artifacts import adapter_bytes, fingerprint

from . import metrics
from .config import ServiceConfig
from .schema import ActRequest, BadRequest
from .state import SessionBusy, SessionLimits, SessionStep, StateBackend, StateUnavailable, open_backend
from .state.base import StateOutcomeUnknown

log = logging.getLogger("lorasa.service")
RETRY_S = 1.0  # after a failed check, the backend is retried at most this often


@dataclass
class ActResult:
    actions: np.ndarray  # [n, act_max] float32 (Gaussian) or [n] int64 (categorical)
    log_probs: np.ndarray  # [n]
    state: np.ndarray | None  # [n, hidden] next state (None: feed-forward)
    versions: list[int]  # adapter version used per row (global, from the state backend)
    batch: dict  # {"requests": k, "rows": m} of the engine forward that served this request


@dataclass
class _Job:
    req: ActRequest | None  # None: a control job
    fn: Callable[[], object] | None = None
    future: Future = field(default_factory=Future)


def session_limits(cfg: ServiceConfig) -> SessionLimits:
    return SessionLimits(ttl_s=cfg.session_ttl_s, max_sessions=cfg.max_sessions,
                         max_bytes=cfg.max_session_bytes, lease_s=cfg.timeout_s)


class PolicyRuntime:
    def __init__(self, cfg: ServiceConfig, policy_dir: Path, state: StateBackend | None = None):
        """state: the backend (default: from cfg, Redis if LORASA_REDIS_URL else LORASA_STATE_DIR).
        An unreachable backend does not fail construction: `ready` stays False (with `state_error`
        saying why) until a sync succeeds, so a new worker never serves stale adapters."""
        self.cfg = cfg
        self.engine = Engine.from_dir(policy_dir, device=cfg.device, mode=cfg.mode,
                                      max_sessions=cfg.max_sessions)
        self.spec = self.engine.spec
        self.state = state or open_backend(cfg.redis_url, cfg.state_dir, self.spec.backbone_fingerprint,
                                           self.spec.hidden, session_limits(cfg))
        self.applied = {a: 1 for a in self.spec.agent_ids}  # global version served per agent
        self.ready = False  # True after the first successful sync with the backend
        self.state_error: str | None = None  # why the last check with the backend failed
        self._retry_at = 0.0  # monotonic time of the next check after a failed one
        self._seen_gen: object = None  # never seen: the first sync loads everything published
        self._merged_pub: set[str] = set()
        self._fp_cache: dict[tuple[str, int], str] = {}
        self._queue: deque[_Job] = deque()
        self._inflight: set[str] = set()  # sessions with a step queued or running in this worker
        self._cv = threading.Condition()
        for a, v in self.applied.items():
            metrics.adapter_version.labels(agent_id=a).set(v)
        try:
            self._sync()  # anything but an unreachable backend (a wrong backbone...) fails the load
            self.ready = True
        except StateUnavailable as e:
            self.state_error, self._retry_at = str(e), time.monotonic() + RETRY_S
            log.warning("state backend unavailable at start (not ready, retrying): %s", e)
        self._thread = threading.Thread(target=self._loop, name="lorasa-batcher", daemon=True)
        self._thread.start()

    # --- called from HTTP handlers -------------------------------------------------------------
    def submit(self, req: ActRequest) -> Future:
        """Raises SessionBusy if a step of the same session is already queued or running here (another
        worker or replica refuses it through the backend's lease instead)."""
        sid = req.session_id if self.spec.recurrent else None
        if sid is None:
            return self._put(_Job(req))
        with self._cv:
            if sid in self._inflight:
                raise SessionBusy(f"session {sid!r} has another step in flight")
            self._inflight.add(sid)
        fut = self._put(_Job(req))
        fut.add_done_callback(lambda _: self._done(sid))
        return fut

    def _done(self, session_id: str) -> None:
        with self._cv:
            self._inflight.discard(session_id)

    def control(self, fn: Callable[[], object]) -> Future:
        """Run `fn` on the batcher thread (serialised with forwards), after a state sync."""
        return self._put(_Job(None, fn))

    def _put(self, job: _Job) -> Future:
        with self._cv:
            self._queue.append(job)
            self._cv.notify()
        return job.future

    # --- batcher thread ------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            jobs = self._take(None if self.ready and self.state_error is None else 1.0)
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
            log.exception("serving a batch failed")
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(e)

    def _take(self, timeout: float | None) -> list[_Job]:
        """Block for work (at most `timeout` s); then take queued jobs up to max_batch_rows, deferring a
        request whose (session, agent) is already in this batch (it needs the state the earlier one
        produces)."""
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
                job.future.set_exception(step)
                failed.add(id(job))
        return [j for j in jobs if id(j) not in failed], steps

    def _close_sessions(self, outcomes: list[tuple[_Job, object]], steps: dict[int, SessionStep]) -> None:
        """Store new states (ok outcomes) or only release leases (failures), then answer every job.
        A step whose state could not be stored is answered with the error, not with its outputs."""
        closing = [(job, out) for job, out in outcomes if id(job) in steps]
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
            if isinstance(ok, BaseException):
                errors[id(job)] = ok
            elif not ok and not isinstance(out, BaseException):
                errors[id(job)] = SessionBusy(
                    f"session {job.req.session_id!r} was reset, or its step outlasted the "
                    f"{self.cfg.timeout_s:g} s lease, while this step ran: its state was not stored")
        for job, out in outcomes:
            out = errors.get(id(job), out)
            if isinstance(out, BaseException):
                job.future.set_exception(out)
            else:
                job.future.set_result(out)

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
        ids = [a for r in reqs for a in r.agent_ids]
        obs = torch.from_numpy(np.concatenate([r.obs for r in reqs]))  # [B, obs_max]
        reset = torch.from_numpy(np.concatenate([r.reset for r in reqs]))  # [B]
        state = self._states(reqs, steps)  # [B, H] | None
        avail = None
        if any(r.avail is not None for r in reqs):
            avail = torch.from_numpy(np.concatenate([
                r.avail if r.avail is not None else np.ones((r.n, self.spec.act_max), dtype=bool)
                for r in reqs]))  # [B, act_max]
        seed = reqs[0].seed if len(reqs) == 1 and not reqs[0].deterministic else None
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        out = self.engine.act(ids, obs, state, reset, avail, deterministic=reqs[0].deterministic,
                              generator=gen)
        versions = [self.applied[a] for a in ids]
        batch = {"requests": len(reqs), "rows": len(ids)}
        metrics.batch_rows.observe(len(ids))
        metrics.batch_requests.observe(len(reqs))
        for a, c in zip(*np.unique(np.asarray(ids), return_counts=True)):
            metrics.agent_rows.labels(agent_id=str(a)).inc(int(c))
        actions, logp = out.actions.cpu().numpy(), out.log_probs.cpu().numpy()
        h = None if out.state is None else out.state.cpu().numpy()  # [B, H]
        bad = _nonfinite_rows(actions, logp, h)  # [B] bool
        results: list[ActResult | BadRequest] = []
        lo = 0
        for r in reqs:
            hi = lo + r.n
            if bad[lo:hi].any():
                results.append(_nonfinite_error(np.flatnonzero(bad[lo:hi])))
            else:
                results.append(ActResult(actions[lo:hi], logp[lo:hi],
                                         None if h is None else h[lo:hi], versions[lo:hi], batch))
            lo = hi
        return results

    def _states(self, reqs: list[ActRequest], steps: list[SessionStep | None]) -> torch.Tensor | None:
        if not self.spec.recurrent:
            return None
        parts = []
        for r, step in zip(reqs, steps):
            if step is not None:
                parts.append(torch.from_numpy(step.state))
            elif r.state is not None:
                parts.append(torch.from_numpy(r.state))
            else:
                parts.append(torch.zeros(r.n, self.spec.hidden))
        return torch.cat(parts)  # [B, H]

    # --- state sync (batcher thread, or __init__ before it starts) ------------------------------
    def _check(self) -> None:
        """Once per batch: sync with the backend, timed; failures are remembered, never raised. After
        a failure the backend is retried at most once per RETRY_S (a dead link must not stall batches)."""
        if self.state_error is not None and time.monotonic() < self._retry_at:
            return
        try:
            self._sync()
            if self.state_error is not None:
                log.warning("state backend reachable again: %s", self.state.description)
            self.ready, self.state_error = True, None
        except StateUnavailable as e:
            if self.state_error is None:
                log.error("state backend unavailable (serving the adapters last applied): %s", e)
            self.state_error, self._retry_at = str(e), time.monotonic() + RETRY_S
            metrics.state_unavailable.labels(op="check").inc()
        except Exception as e:  # a bad blob must not stop serving: keep the adapters we have
            log.error("state sync failed (still serving the previous adapters): %s", e)

    def _sync(self) -> None:
        """Load what was published since the last sync. The generation is read before what it covers,
        so a publish in between is caught by the next check. If the backend holds older versions than
        this worker serves (Redis restarted empty), re-seed it from ours first."""
        t0 = time.perf_counter()
        gen = self.state.generation()  # the per-batch cost of the check: one stat / one Redis MGET
        metrics.state_check_seconds.observe(time.perf_counter() - t0)
        if gen == self._seen_gen:
            return
        pub = self.state.published()
        if pub.lost or any(pub.version(a) < v for a, v in self.applied.items()):
            log.warning("%s %s: seeding it with the versions this worker serves %s", self.state.description,
                        "has no published state (new, or restarted without its data)" if pub.lost
                        else "holds older versions than this worker serves", self.applied)
            self.state.reseed(dict(self.applied), self._served_adapter, set(self._merged_pub))
            gen = self.state.generation()
            pub = self.state.published()
        for agent, v in pub.versions.items():
            if agent in self.applied and v > self.applied[agent]:
                self.engine.load_adapter(self.state.adapter_blob(agent, v), agent)
                self.applied[agent] = v
                metrics.adapter_version.labels(agent_id=agent).set(v)
                metrics.adapter_swaps.labels(agent_id=agent).inc()
        want = {a for a in pub.merged if a in self.applied}
        if want - self._merged_pub:
            self.engine.merge(sorted(want - self._merged_pub))
        if self._merged_pub - want:
            self.engine.unmerge(sorted(self._merged_pub - want))
        self._merged_pub = want
        self._seen_gen = gen

    def _served_adapter(self, agent_id: str) -> bytes:
        """The safetensors bytes of the adapter this worker serves for `agent_id` (for re-seeding)."""
        tensors = {n: t.cpu() for n, t in self.engine.adapter(agent_id).items()}
        return adapter_bytes(self.spec, agent_id, tensors)

    # --- snapshots for the read-only endpoints (run as control jobs) ----------------------------
    def agents_info(self) -> list[dict]:
        merged = set(self.engine.merged_agents)
        out = []
        for a in self.spec.agents:
            v = self.applied[a.agent_id]
            key = (a.agent_id, v)
            if key not in self._fp_cache:
                ad = self.engine.adapter(a.agent_id)
                self._fp_cache[key] = "" if ad is None else fingerprint({n: t.cpu() for n, t in ad.items()})
            out.append({"agent_id": a.agent_id, "obs_dim": a.obs_dim, "act_dim": a.act_dim,
                        "version": v, "adapter_fingerprint": self._fp_cache[key],
                        "merged": a.agent_id in merged})
        return out


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


def _run_into(future: Future, fn: Callable[[], object]) -> None:
    try:
        future.set_result(fn())
    except BaseException as e:  # delivered to the awaiting handler, never kills the thread
        future.set_exception(e)

