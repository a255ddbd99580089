"""Per-worker runtime: the Engine, the shared adapter overlay, sessions, and the micro-batcher.

One batcher thread owns every engine call and every session/overlay mutation in this process:
HTTP handlers enqueue validated `ActRequest`s (or control jobs) and await a future. Each cycle the
thread (1) syncs the overlay if the manifest changed (one `stat`), (2) runs control jobs, (3) takes
every queued request up to `max_batch_rows` and runs ONE `Engine.act` per `deterministic` flag over
all their rows. Batches form adaptively: while a forward runs, new requests queue up and go together
into the next one; an idle server answers a lone request at once (no waiting window).
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lorasa_serve import Engine, LorasaError
from lorasa_serve.artifacts import fingerprint

from . import metrics
from .config import ServiceConfig
from .overlay import Overlay
from .schema import ActRequest, BadRequest
from .shared_sessions import SharedSessionStore

log = logging.getLogger("lorasa.service")


@dataclass
class ActResult:
    actions: np.ndarray  # [n, act_max] float32 (Gaussian) or [n] int64 (categorical)
    log_probs: np.ndarray  # [n]
    state: np.ndarray | None  # [n, hidden] next state (None: feed-forward)
    versions: list[int]  # adapter version used per row (global, from the manifest)
    batch: dict  # {"requests": k, "rows": m} of the engine forward that served this request


@dataclass
class _Job:
    req: ActRequest | None  # None: a control job
    fn: Callable[[], object] | None = None
    future: Future = field(default_factory=Future)


class PolicyRuntime:
    def __init__(self, cfg: ServiceConfig, policy_dir: Path, state_dir: Path):
        self.cfg = cfg
        self.engine = Engine.from_dir(policy_dir, device=cfg.device, mode=cfg.mode,
                                      max_sessions=cfg.max_sessions)
        self.spec = self.engine.spec
        self.overlay = Overlay(state_dir, self.spec.backbone_fingerprint)
        self.sessions = (SharedSessionStore(state_dir / "sessions.sqlite", self.spec.hidden,
                                            cfg.max_sessions)
                         if cfg.shared_sessions else self.engine.sessions)
        self.applied = {a: 1 for a in self.spec.agent_ids}  # global version served per agent
        self._merged_pub: set[str] = set()
        self._fp_cache: dict[tuple[str, int], str] = {}
        self._queue: deque[_Job] = deque()
        self._cv = threading.Condition()
        self._sync()
        for a, v in self.applied.items():
            metrics.adapter_version.labels(agent_id=a).set(v)
        self._thread = threading.Thread(target=self._loop, name="lorasa-batcher", daemon=True)
        self._thread.start()

    # --- called from HTTP handlers -------------------------------------------------------------
    def submit(self, req: ActRequest) -> Future:
        return self._put(_Job(req))

    def control(self, fn: Callable[[], object]) -> Future:
        """Run `fn` on the batcher thread (serialised with forwards), after an overlay sync."""
        return self._put(_Job(None, fn))

    def _put(self, job: _Job) -> Future:
        with self._cv:
            self._queue.append(job)
            self._cv.notify()
        return job.future

    # --- batcher thread ------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            jobs = self._take()
            try:
                self._sync()
            except Exception as e:  # a bad file in the state dir must not stop serving
                log.error("overlay sync failed (still serving the previous adapters): %s", e)
            for job in [j for j in jobs if j.req is None]:
                _run_into(job.future, job.fn)
            acts = [j for j in jobs if j.req is not None]
            for det in (True, False):
                group = [j for j in acts if j.req.deterministic == det]
                if group:
                    self._serve(group)

    def _take(self) -> list[_Job]:
        """Block for work; then take queued jobs up to max_batch_rows, deferring a request whose
        (session, agent) is already in this batch (it needs the state the earlier one produces)."""
        with self._cv:
            while not self._queue:
                self._cv.wait()
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
        """Answer every job. A failure before the forward's side effects (reading states, the
        engine) is isolated by serving each request of the batch alone; a failure of one request's
        own result (non-finite output, storing its session) is that request's answer only."""
        try:
            results = self._forward([j.req for j in jobs])
        except Exception as e:
            if len(jobs) > 1:
                for job in jobs:
                    self._serve([job])
                return
            if not isinstance(e, (LorasaError, BadRequest)):
                log.exception("forward failed")
            jobs[0].future.set_exception(e)
            return
        for job, res in zip(jobs, results):
            if isinstance(res, BaseException):
                job.future.set_exception(res)
            else:
                job.future.set_result(res)

    def _forward(self, reqs: list[ActRequest]) -> list[ActResult | Exception]:
        """One Engine.act over the rows of every request (same `deterministic` flag). Per request:
        its ActResult, or the exception that request alone gets (non-finite output: 422, its session
        keeps the previous state)."""
        ids = [a for r in reqs for a in r.agent_ids]
        obs = torch.from_numpy(np.concatenate([r.obs for r in reqs]))  # [B, obs_max]
        reset = torch.from_numpy(np.concatenate([r.reset for r in reqs]))  # [B]
        state = self._states(reqs)  # [B, H] | None
        avail = None
        if any(r.avail is not None for r in reqs):
            avail = torch.from_numpy(np.concatenate([
                r.avail if r.avail is not None else np.ones((r.n, self.spec.act_max), dtype=bool)
                for r in reqs]))  # [B, act_max]
        out = self.engine.act(ids, obs, state, reset, avail, deterministic=reqs[0].deterministic)
        versions = [self.applied[a] for a in ids]
        batch = {"requests": len(reqs), "rows": len(ids)}
        metrics.batch_rows.observe(len(ids))
        metrics.batch_requests.observe(len(reqs))
        for a, c in zip(*np.unique(np.asarray(ids), return_counts=True)):
            metrics.agent_rows.labels(agent_id=str(a)).inc(int(c))
        actions, logp = out.actions.cpu().numpy(), out.log_probs.cpu().numpy()
        h = None if out.state is None else out.state.cpu()
        bad = _nonfinite_rows(actions, logp, h)  # [B] bool
        results: list[ActResult | Exception] = []
        lo = 0
        for r in reqs:
            hi = lo + r.n
            try:
                if bad[lo:hi].any():
                    raise _nonfinite_error(np.flatnonzero(bad[lo:hi]))
                if r.session_id is not None and h is not None:
                    self.sessions.put(r.session_id, r.agent_ids, h[lo:hi])
                results.append(ActResult(actions[lo:hi], logp[lo:hi],
                                         None if h is None else h[lo:hi].numpy(), versions[lo:hi], batch))
            except Exception as e:  # this request's answer only; the others are served normally
                if not isinstance(e, BadRequest):
                    log.exception("storing the result of one request failed")
                results.append(e)
            lo = hi
        return results

    def _states(self, reqs: list[ActRequest]) -> torch.Tensor | None:
        if not self.spec.recurrent:
            return None
        parts = []
        for r in reqs:
            if r.session_id is not None:
                parts.append(self.sessions.get(r.session_id, r.agent_ids)[0].cpu())
            elif r.state is not None:
                parts.append(torch.from_numpy(r.state))
            else:
                parts.append(torch.zeros(r.n, self.spec.hidden))
        return torch.cat(parts)  # [B, H]

    # --- overlay sync (batcher thread, or __init__ before it starts) ----------------------------
    def _sync(self) -> None:
        if not self.overlay.changed():
            return
        m = self.overlay.read()
        try:
            for agent, entry in m.adapters.items():
                v = int(entry["version"])
                if agent in self.applied and v > self.applied[agent]:
                    self.engine.load_adapter(self.overlay.adapter_path(m, agent), agent)
                    self.applied[agent] = v
                    metrics.adapter_version.labels(agent_id=agent).set(v)
                    metrics.adapter_swaps.labels(agent_id=agent).inc()
            want = {a for a in m.merged if a in self.applied}
            if want - self._merged_pub:
                self.engine.merge(sorted(want - self._merged_pub))
            if self._merged_pub - want:
                self.engine.unmerge(sorted(self._merged_pub - want))
            self._merged_pub = want
        except Exception:
            self.overlay.invalidate()  # retry on the next cycle
            raise

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


def _nonfinite_rows(actions: np.ndarray, logp: np.ndarray, h: torch.Tensor | None) -> np.ndarray:
    """[B] bool: rows whose action, log-prob or next state is NaN or inf."""
    bad = ~np.isfinite(logp)
    if actions.dtype.kind == "f":
        bad |= ~np.isfinite(actions.reshape(len(actions), -1)).all(axis=1)
    if h is not None:
        bad |= ~torch.isfinite(h).all(dim=1).numpy()
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

