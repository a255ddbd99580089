"""JSON request parsing and validation for the v1 API: bad input -> `BadRequest` (HTTP 4xx), never
an exception inside the batched forward.

Checks are per row and name the row: unknown agent, obs length != the agent's obs_dim, non-numbers,
NaN/inf (also float32 overflow), action masks of the wrong length or with no available action, state
of the wrong length, state together with a session, too many rows, unknown fields (typos), duplicate
JSON keys, session ids outside `SESSION_ID_RULE`. Client input echoed in a message is cut to
`ECHO_CHARS` characters (with its length), so an error is always one short line. The array-level
checks (finite values, padding, avail, state, sessions, row limit) are the ones /v2 uses too:
services/act_check.py.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from lorasa_serve.spec import PolicySpec

ROW_FIELDS = {"agent_id", "obs", "avail_actions", "state", "reset"}
ACT_FIELDS = {"rows", "session_id", "deterministic"}
ADMIN_FIELDS = {"agent_ids"}
MAX_SESSION_ID = 128
# session ids: 1-128 ASCII letters, digits and . _ : @ -, starting with a letter or digit (so an id
# is always one URL path segment: no '/', no '.'/'..', no spaces, control characters or surrogates)
SESSION_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,%d}" % (MAX_SESSION_ID - 1), re.ASCII)
SESSION_ID_RULE = (f"1-{MAX_SESSION_ID} characters from A-Z a-z 0-9 . _ : @ -, "
                   "starting with a letter or digit")
ECHO_CHARS = 64


class BadRequest(Exception):
    """Client error: `status` (4xx) and a message for the JSON body."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class ActRequest:
    idx: np.ndarray  # [n] int64 agent indices (the spec's order, which is the backend's)
    names: np.ndarray  # [n_agents] object: the spec's agent ids (index -> id)
    obs: np.ndarray  # [n, obs_max] float32, zero-padded past each agent's obs_dim
    state: np.ndarray | None  # [n, hidden] float32 explicit state (None: zeros or session)
    reset: np.ndarray  # [n] bool: episode start (state zeroed)
    avail: np.ndarray | None  # [n, act_max] bool (categorical only; None: all actions available)
    session_id: str | None
    deterministic: bool
    seed: int | None = None  # sampling seed: the request is served alone with its own generator

    @property
    def n(self) -> int:
        return len(self.idx)

    @cached_property
    def agent_ids(self) -> list[str]:
        """[n] the agent id of each row (made on first use: a 4096-row stateless request never needs it)."""
        return self.names[self.idx].tolist()


def clip(text: str) -> str:
    """Client text (a path, a header) for an error message, cut to ECHO_CHARS characters."""
    return text if len(text) <= ECHO_CHARS else f"{text[:ECHO_CHARS]}... ({len(text)} characters)"


def short(x: object) -> str:
    """repr of client input for an error message, cut to ECHO_CHARS characters (naming its length)."""
    r = repr(x)
    if len(r) <= ECHO_CHARS:
        return r
    return f"{r[:ECHO_CHARS]}... ({len(x) if isinstance(x, str) else len(r)} characters)"


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise BadRequest(f"duplicate key {short(dup)} in a JSON object")
    return d


def parse_json(body: bytes) -> object:
    """JSON (UTF-8) -> Python; duplicate keys in any object are rejected (400)."""
    try:
        return json.loads(body, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as e:  # bad JSON/UTF-8, too-deep nesting, huge int literals
        raise BadRequest(f"malformed JSON body: {type(e).__name__}: {str(e)[:200]}") from None


def parse_act(d: object, spec: PolicySpec, max_rows: int) -> ActRequest:
    if not isinstance(d, dict):
        raise BadRequest("body must be a JSON object with 'rows'")
    _no_unknown(d, ACT_FIELDS, "request")
    rows = d.get("rows")
    if not isinstance(rows, list) or not rows:
        raise BadRequest("'rows' must be a non-empty list of {agent_id, obs, ...}")
    if len(rows) > max_rows:
        raise BadRequest(f"{len(rows)} rows is over the limit of {max_rows} per request", 413)
    det = d.get("deterministic", True)
    if not isinstance(det, bool):
        raise BadRequest("'deterministic' must be true or false")
    sid = check_session_id(d.get("session_id"))
    agents = {a.agent_id: a for a in spec.agents}
    n = len(rows)
    obs = np.zeros((n, spec.obs_max), dtype=np.float32)
    reset = np.zeros(n, dtype=bool)
    state = avail = None
    ids: list[str] = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise BadRequest(f"row {i}: must be an object {{agent_id, obs, ...}}")
        _no_unknown(row, ROW_FIELDS, f"row {i}")
        agent = agents.get(row.get("agent_id")) if isinstance(row.get("agent_id"), str) else None
        if agent is None:
            raise BadRequest(f"row {i}: unknown agent_id {short(row.get('agent_id'))}; "
                             f"serving {list(agents)}")
        ids.append(agent.agent_id)
        obs[i, :agent.obs_dim] = _floats(row.get("obs"), agent.obs_dim, f"row {i}: obs")
        r = row.get("reset", False)
        if not isinstance(r, bool):
            raise BadRequest(f"row {i}: 'reset' must be true or false")
        reset[i] = r
        if row.get("avail_actions") is not None:
            avail = _avail(avail, n, spec, agent.act_dim, row["avail_actions"], i)
        if row.get("state") is not None:
            state = _state(state, n, spec, row["state"], i, sid)
    from .act_check import agent_table, check_act  # the array checks shared with /v2
    idx = np.fromiter((agent_table(spec).index[a] for a in ids), dtype=np.int64, count=n)
    return check_act(spec, max_rows, idx, obs, state, reset, avail, sid, det, ids=ids)


def parse_admin(body: bytes, served: list[str]) -> list[str]:
    """Body of /v1/admin/merge and /unmerge -> agent ids. Empty body, `{}` or no 'agent_ids': every
    served agent; else a JSON object whose only field 'agent_ids' lists served agents."""
    if not body.strip():
        return list(served)
    d = parse_json(body)
    if not isinstance(d, dict):
        raise BadRequest("body must be a JSON object {\"agent_ids\": [...]} (or empty: every agent)")
    _no_unknown(d, ADMIN_FIELDS, "request")
    if "agent_ids" not in d:
        return list(served)
    ids = d["agent_ids"]
    if not isinstance(ids, list) or not all(isinstance(a, str) for a in ids):
        raise BadRequest(f"'agent_ids' must be a list of agent id strings, served: {served}")
    unknown = [a for a in ids if a not in served]
    if unknown:
        raise BadRequest(f"'agent_ids': unknown agent_id {short(unknown[0])}; serving {served}")
    return list(dict.fromkeys(ids))


def _no_unknown(d: dict, allowed: set[str], where: str) -> None:
    extra = sorted(set(d) - allowed)
    if extra:
        shown = ", ".join(short(k) for k in extra[:3])
        if len(extra) > 3:
            shown += f" and {len(extra) - 3} more"
        raise BadRequest(f"{where}: unknown fields [{shown}]; allowed {sorted(allowed)}")


def check_session_id(sid: object) -> str | None:
    """None, or a valid session id (SESSION_ID_RULE). The one session-id check of every route."""
    if sid is None:
        return None
    if not isinstance(sid, str) or SESSION_ID_RE.fullmatch(sid) is None:
        raise BadRequest(f"'session_id' {short(sid)} is invalid: use {SESSION_ID_RULE}")
    return sid


def _floats(x: object, n: int, where: str) -> np.ndarray:
    """A JSON list of exactly n numbers -> float32 [n]."""
    if not isinstance(x, list) or any(isinstance(v, (bool, str)) or v is None for v in x):
        raise BadRequest(f"{where} must be a list of {n} numbers")
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise BadRequest(f"{where} must be a flat list of {n} finite numbers") from None
    if a.shape != (n,):
        raise BadRequest(f"{where} has shape {list(a.shape)}, expected [{n}]")
    with np.errstate(over="ignore"):
        return a.astype(np.float32)  # NaN/inf/overflow rejected by act_check.check_act


def _avail(avail: np.ndarray | None, n: int, spec: PolicySpec, act_dim: int, x: object,
           i: int) -> np.ndarray:
    if spec.action != "categorical":
        raise BadRequest(f"row {i}: avail_actions only apply to categorical policies")
    if not isinstance(x, list) or len(x) != act_dim or not all(
            v in (0, 1) and not isinstance(v, float) for v in x):
        raise BadRequest(f"row {i}: avail_actions must be a list of {act_dim} values 0/1 or booleans")
    if not any(x):
        raise BadRequest(f"row {i}: avail_actions has no available action (all zero)")
    if avail is None:
        avail = np.ones((n, spec.act_max), dtype=bool)
    avail[i] = False
    avail[i, :act_dim] = np.asarray(x, dtype=bool)
    return avail


def _state(state: np.ndarray | None, n: int, spec: PolicySpec, x: object, i: int,
           sid: str | None) -> np.ndarray:
    if sid is not None:
        raise BadRequest(f"row {i}: send either 'state' per row or a 'session_id', not both")
    if not spec.recurrent:
        raise BadRequest(f"row {i}: this policy is feed-forward and takes no 'state'")
    if state is None:
        state = np.zeros((n, spec.hidden), dtype=np.float32)
    state[i] = _floats(x, spec.hidden, f"row {i}: state")
    return state


def act_response(req: ActRequest, spec: PolicySpec, actions: np.ndarray, log_probs: np.ndarray,
                 state: np.ndarray | None, versions: np.ndarray, batch: dict) -> dict:
    """Actions per row sliced to each agent's act_dim (Gaussian) or an int (categorical)."""
    dims = {a.agent_id: a.act_dim for a in spec.agents}
    if spec.action == "gaussian":
        acts = [actions[i, :dims[a]].tolist() for i, a in enumerate(req.agent_ids)]
    else:
        acts = actions.tolist()
    out = {"actions": acts, "log_probs": log_probs.tolist(), "versions": versions.tolist(), "batch": batch}
    if req.session_id is None and state is not None:
        out["state"] = state.tolist()
    return out
