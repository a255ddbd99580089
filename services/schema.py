"""JSON request parsing for the v1 API: bad input -> `BadRequest` (HTTP 4xx), never an exception
inside the batched forward.

Here: the JSON wire format (unknown fields, typos, duplicate JSON keys, non-numbers, a row that is not
a flat list). Every rule on the values is `lorasa_serve.protocol`'s, with its messages: the row limit
(`check_rows`, before any row is read), session ids (`check_session_id`), each row's width
(`check_width`: a row is an array of one row: the agent's obs_dim up to obs_max numbers, act_dim up to
act_max avail values, hidden state numbers), then the rows as arrays through THE validator,
`check_act` (finite values, zero padding, available actions, state rules, sessions): the same rules
and messages as /v2 and the in-process backends. Client input echoed in a message is cut to
`ECHO_CHARS` characters (with its length): an error is one short line.
"""
from __future__ import annotations

import numpy as np

from lorasa_serve import strict_json
from lorasa_serve.protocol import (ECHO_CHARS, ActRequest, AgentTable, BadRequest, check_act, check_rows,
                                   check_session_id, check_state_allowed, check_width, require_categorical,
                                   short, unknown_agent)
from lorasa_serve.spec import PolicySpec

ROW_FIELDS = {"agent_id", "obs", "avail_actions", "state", "reset"}
ACT_FIELDS = {"rows", "session_id", "deterministic"}
ADMIN_FIELDS = {"agent_ids"}


def clip(text: str) -> str:
    """Client text (a path, a header) for an error message, cut to ECHO_CHARS characters."""
    return text if len(text) <= ECHO_CHARS else f"{text[:ECHO_CHARS]}... ({len(text)} characters)"


def parse_json(body: bytes) -> object:
    """JSON (UTF-8) -> Python; duplicate keys in any object are rejected (400)."""
    try:
        return strict_json.loads(body)
    except strict_json.DuplicateKeyError as e:
        raise BadRequest(str(e)) from None
    except (ValueError, RecursionError) as e:  # bad JSON/UTF-8, too-deep nesting, huge int literals
        raise BadRequest(f"malformed JSON body: {type(e).__name__}: {str(e)[:200]}") from None


def parse_act(d: object, spec: PolicySpec | AgentTable, max_rows: int) -> ActRequest:
    """A /v1/act body (parsed JSON) -> the checked ActRequest. `spec`: the policy, or its AgentTable
    (the service passes the one it owns)."""
    table = AgentTable.of(spec)
    if not isinstance(d, dict):
        raise BadRequest("body must be a JSON object with 'rows'")
    _no_unknown(d, ACT_FIELDS, "request")
    rows = d.get("rows")
    if not isinstance(rows, list) or not rows:
        raise BadRequest("'rows' must be a non-empty list of {agent_id, obs, ...}")
    check_rows(len(rows), max_rows)
    det = d.get("deterministic", True)
    if not isinstance(det, bool):
        raise BadRequest("'deterministic' must be true or false")
    sid = check_session_id(d.get("session_id"))
    n = len(rows)
    idx = np.empty(n, dtype=np.int64)
    obs = np.zeros((n, table.obs_max), dtype=np.float32)
    reset = np.zeros(n, dtype=bool)
    state = avail = None
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise BadRequest(f"row {i}: must be an object {{agent_id, obs, ...}}")
        _no_unknown(row, ROW_FIELDS, f"row {i}")
        a = row.get("agent_id")
        idx[i] = table.index.get(a, -1) if isinstance(a, str) else -1
        if idx[i] < 0:
            raise unknown_agent(table, i, a)
        x = _floats(row.get("obs"), f"row {i}: obs")
        check_width(table, "obs", idx[i:i + 1], len(x), i)
        obs[i, :len(x)] = x
        r = row.get("reset", False)
        if not isinstance(r, bool):
            raise BadRequest(f"row {i}: 'reset' must be true or false")
        reset[i] = r
        if row.get("avail_actions") is not None:
            avail = _avail(avail, n, table, idx[i:i + 1], row["avail_actions"], i)
        if row.get("state") is not None:
            check_state_allowed(table, sid)
            if state is None:
                state = np.zeros((n, table.hidden), dtype=np.float32)
            x = _floats(row["state"], f"row {i}: state")
            check_width(table, "state", idx[i:i + 1], len(x), i)
            state[i] = x
    return check_act(table, idx, obs, state, reset, avail, session_id=sid, deterministic=det,
                     max_rows=max_rows)


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


def _floats(x: object, where: str) -> np.ndarray:
    """A flat JSON list of numbers -> float32 [n] (its length is the protocol's `check_width`; NaN,
    inf and values beyond float32 are refused by the validator, naming the row)."""
    if not isinstance(x, list) or any(isinstance(v, (bool, str)) or v is None for v in x):
        raise BadRequest(f"{where} must be a list of numbers")
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise BadRequest(f"{where} must be a flat list of finite numbers") from None
    if a.ndim != 1:
        raise BadRequest(f"{where} must be a flat list of numbers, not nested (shape {list(a.shape)})")
    with np.errstate(over="ignore"):
        return a.astype(np.float32)


def _avail(avail: np.ndarray | None, n: int, table: AgentTable, idx: np.ndarray, x: object,
           i: int) -> np.ndarray:
    """Row i's avail_actions (0/1 values or booleans, as wide as the protocol's rule allows) into the
    [n, act_max] mask (rows without avail_actions: every action)."""
    require_categorical(table)
    if not isinstance(x, list) or not all(v in (0, 1) and not isinstance(v, float) for v in x):
        raise BadRequest(f"row {i}: avail_actions must be a list of values 0/1 or booleans")
    check_width(table, "avail", idx, len(x), i)
    if avail is None:
        avail = np.ones((n, table.act_max), dtype=bool)
    avail[i] = False
    avail[i, :len(x)] = np.asarray(x, dtype=bool)
    return avail


def act_response(req: ActRequest, table: AgentTable, actions: np.ndarray, log_probs: np.ndarray,
                 state: np.ndarray | None, versions: np.ndarray, batch: dict,
                 session_state: str | None = None) -> dict:
    """Actions per row sliced to each agent's act_dim (Gaussian) or an int (categorical). Arrays stay
    numpy (strict_json.dumps writes them); rows are lists only when agents' act_dims differ.
    session_state: a session step's "resumed" or "new" (ActResult.session_state), sent as is."""
    if table.categorical:
        acts: object = actions
    elif table.act_uniform:
        acts = actions
    else:
        dims = table.act_dims[req.idx].tolist()  # [B]
        acts = [actions[i, :k].tolist() for i, k in enumerate(dims)]
    out = {"actions": acts, "log_probs": log_probs, "versions": np.asarray(versions), "batch": batch}
    if req.session_id is None and state is not None:
        out["state"] = state
    if session_state is not None:
        out["session_state"] = session_state
    return out
