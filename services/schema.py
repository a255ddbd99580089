"""JSON request parsing for the v1 API: bad input -> `BadRequest` (HTTP 4xx), never an exception
inside the batched forward.

The JSON checks name the row: unknown fields (typos), duplicate JSON keys, non-numbers, an obs of
fewer numbers than the agent's obs_dim or more than obs_max (a row may carry the agent's obs_dim
numbers, or more up to obs_max with zeros past obs_dim), avail_actions of fewer values than the
agent's act_dim or more than act_max, a state of other than `hidden` numbers, session ids outside
`SESSION_ID_RULE`. The rows then become arrays checked by THE validator,
`lorasa_serve.protocol.check_act` (finite values, zero padding, available actions, state rules,
sessions, row limit): the same rules and messages as /v2 and the in-process backends. Client input
echoed in a message is cut to `ECHO_CHARS` characters (with its length): an error is one short line.
"""
from __future__ import annotations

import re

import numpy as np

from lorasa_serve import strict_json
from lorasa_serve.protocol import ECHO_CHARS, ActRequest, AgentTable, BadRequest, check_act, short, unknown_agent
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
    spec = table.spec
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
    n = len(rows)
    idx = np.empty(n, dtype=np.int64)
    obs = np.zeros((n, spec.obs_max), dtype=np.float32)
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
        agent = spec.agents[idx[i]]
        x = _floats(row.get("obs"), (agent.obs_dim, spec.obs_max), f"row {i}: obs")
        obs[i, :len(x)] = x
        r = row.get("reset", False)
        if not isinstance(r, bool):
            raise BadRequest(f"row {i}: 'reset' must be true or false")
        reset[i] = r
        if row.get("avail_actions") is not None:
            avail = _avail(avail, n, spec, agent.act_dim, row["avail_actions"], i)
        if row.get("state") is not None:
            if state is None:
                state = np.zeros((n, spec.hidden), dtype=np.float32)
            state[i] = _floats(row["state"], (spec.hidden, spec.hidden), f"row {i}: state")
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


def check_session_id(sid: object) -> str | None:
    """None, or a valid session id (SESSION_ID_RULE). The one session-id check of every route."""
    if sid is None:
        return None
    if not isinstance(sid, str) or SESSION_ID_RE.fullmatch(sid) is None:
        raise BadRequest(f"'session_id' {short(sid)} is invalid: use {SESSION_ID_RULE}")
    return sid


def _floats(x: object, lengths: tuple[int, int], where: str) -> np.ndarray:
    """A JSON list of lengths[0] .. lengths[1] numbers -> float32 [n] (NaN, inf and values beyond
    float32 are refused by the validator, naming the row)."""
    lo, hi = lengths
    want = f"{lo}" if lo == hi else f"{lo} to {hi}"
    if not isinstance(x, list) or any(isinstance(v, (bool, str)) or v is None for v in x):
        raise BadRequest(f"{where} must be a list of {want} numbers")
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise BadRequest(f"{where} must be a flat list of {want} finite numbers") from None
    if a.ndim != 1 or not lo <= len(a) <= hi:
        raise BadRequest(f"{where} has shape {list(a.shape)}, expected {want} numbers")
    with np.errstate(over="ignore"):
        return a.astype(np.float32)


def _avail(avail: np.ndarray | None, n: int, spec: PolicySpec, act_dim: int, x: object,
           i: int) -> np.ndarray:
    """Row i's avail_actions: act_dim .. act_max values 0/1 or booleans (past act_dim: ignored)."""
    if spec.action != "categorical":
        raise BadRequest("avail (action masks) only apply to categorical policies")
    if not isinstance(x, list) or not act_dim <= len(x) <= spec.act_max or not all(
            v in (0, 1) and not isinstance(v, float) for v in x):
        want = f"{act_dim}" if act_dim == spec.act_max else f"{act_dim} to {spec.act_max}"
        raise BadRequest(f"row {i}: avail_actions must be a list of {want} values 0/1 or booleans")
    if avail is None:
        avail = np.ones((n, spec.act_max), dtype=bool)
    avail[i] = False
    avail[i, :len(x)] = np.asarray(x, dtype=bool)
    return avail


def act_response(req: ActRequest, table: AgentTable, actions: np.ndarray, log_probs: np.ndarray,
                 state: np.ndarray | None, versions: np.ndarray, batch: dict,
                 session_state: str | None = None) -> dict:
    """Actions per row sliced to each agent's act_dim (Gaussian) or an int (categorical). Arrays stay
    numpy (strict_json.dumps writes them); rows are lists only when agents' act_dims differ.
    session_state: a session step's "resumed" or "new" (ActResult.session_state), sent as is."""
    if table.spec.action == "categorical":
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
