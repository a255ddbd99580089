"""The batched forward: one `backend.act_checked` over the rows of many requests, each request's
rows screened for NaN/inf outputs, and a failure isolated to the request that caused it."""
from __future__ import annotations

import logging
from typing import Callable, Mapping

import numpy as np
import torch

from lorasa_serve import LorasaError
from lorasa_serve.backend import ActBackend
from lorasa_serve.protocol import ActRequest, ActResult, BadRequest, concat

from . import metrics
from .jobs import Job
from .state import SessionStep

log = logging.getLogger("lorasa.service")

# (requests, their open session steps) -> [B, H] float32 input states, or None (feed-forward policy)
StatesFn = Callable[[list[ActRequest], list[SessionStep | None]], np.ndarray | None]


class BatchForward:
    def __init__(self, backend: ActBackend, versions: Mapping[str, int], states: StatesFn):
        """versions: agent -> the version served (read at each forward, under the engine lock, so it is
        the version the forward used); states: each request's input state (services/session_steps)."""
        self.backend, self.spec = backend, backend.spec
        self._versions = versions
        self._states = states
        self._agent_rows = [metrics.agent_rows.labels(agent_id=a) for a in self.spec.agent_ids]

    def run(self, jobs: list[Job], steps: dict[int, SessionStep]) -> list[tuple[Job, object]]:
        """-> (job, ActResult | exception) per job; steps: id(job) -> its open session step."""
        if not jobs:  # every request of the batch was refused when its session was opened
            return []
        try:
            results = self._forward([j.req for j in jobs], [steps.get(id(j)) for j in jobs])
        except Exception as e:  # should not happen after parsing: isolate the request that caused it
            if len(jobs) > 1:  # _forward has no side effects, so each request can run again alone
                return [out for job in jobs for out in self.run([job], steps)]
            if not isinstance(e, LorasaError):
                log.exception("forward failed")
            return [(jobs[0], e)]
        return list(zip(jobs, results))

    def _forward(self, reqs: list[ActRequest], steps: list[SessionStep | None]) -> list[ActResult | BadRequest]:
        """One `backend.act_checked` over the rows of every request (same `deterministic` flag). No side
        effects. Per request its ActResult, or a 422 BadRequest naming its rows whose output is NaN/inf
        (never stored: SessionSteps.close only releases the lease of a failed step)."""
        state = self._states(reqs, steps)  # [B, H] | None
        batch_req = concat(reqs, state, self.spec.act_max)  # checked when each request was parsed
        idx = batch_req.idx  # [B] agent indices (the backend's slots): a fresh array (a layout cache may keep it)
        seeded = batch_req.seed is not None and not batch_req.deterministic  # a lone seeded request
        gen = torch.Generator().manual_seed(batch_req.seed) if seeded else None
        out = self.backend.act_checked(batch_req, generator=gen)
        versions = np.asarray([self._versions[a] for a in self.spec.agent_ids], dtype=np.int64)[idx]  # [B]
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
            else:  # a session step says whether its state was found ("resumed") or lost ("new")
                results.append(ActResult(actions[lo:hi], logp[lo:hi], None if h is None else h[lo:hi],
                                         versions[lo:hi], batch, None if step is None else step.session_state))
            lo = hi
        return results


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
