"""The one request protocol of every `act` entry point: `ActRequest`, `ActResult`, `InputError`
(`BadRequest`) and THE validator, `check_act`. numpy only (no torch): the Engine, `OnnxEngine`, the
service's `/v1` (JSON rows) and `/v2` (OIP tensors) and the client all use it, so the same input
gives the same outcome, and the same error message, everywhere.

    table = AgentTable(spec)                                 # per-agent sizes as arrays, once per owner
    req = check_act(table, agent_ids, obs, state, reset, avail, session_id=..., max_rows=...)
    req.idx [B] int64, req.obs [B, obs_max] float32, req.state [B, hidden] | None,
    req.reset [B] bool | None, req.avail [B, act_max] bool | None

The rules (one message per error, naming the row where there is one):
* agent ids: a sequence of served ids or an int array of indices in the spec's order; at least one row,
  at most `max_rows` (413, `check_rows`); with a session each agent at most once, and the session id
  follows `SESSION_ID_RULE` (`check_session_id`).
* widths, one rule for every entry point (`check_width`; a /v1 JSON row is an array of one row):
  obs [B, W] with max(obs_dim of the rows present) <= W <= obs_max: each row is its agent's
  observation followed by zeros (W < obs_max: zero-padded on the right to obs_max). Every column past
  a row's obs_dim must be 0: a non-zero one is an error naming the row and agent ("wrong agent's
  row?"). An array narrower than a row's obs_dim would lose features: refused, naming row and agent.
  Finite in float32. (The agent one-hot of an `agent_onehot` policy is appended by the runtime.)
  avail (Categorical only) [B, W] with max(act_dim of the rows present) <= W <= act_max, booleans or
  0/1 (padded with False to act_max). Columns past a row's act_dim name actions that do not exist:
  they are ignored (read as False), so `np.ones((B, act_max))` means "all of each agent's actions".
  Every row needs an available action among its agent's own. state [B, hidden] exactly.
* state: finite; recurrent policies only; not together with a session.
* reset: [B] booleans or 0/1 numbers.
* a Mapping (a per-agent dict, as PettingZoo gives) is refused, pointing to
  `lorasa_serve.envloop.TeamPolicy`, which turns such dicts into the arrays here.
The result is normalised: obs padded to obs_max, avail masked to each agent's act_dim. A checked
`ActRequest` may be handed to a backend's `act_checked` (the service's hot path) without a second check.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import InputError, UnknownAgentError
from .spec import PolicySpec

BadRequest = InputError  # the service's name for it: `status` is the HTTP status it answers with
ECHO_CHARS = 64  # client input echoed in a message is cut to this many characters
MAX_LISTED_AGENTS = 20  # unknown-agent errors list at most this many served ids
MAX_SESSION_ID = 128
# session ids: 1-128 ASCII letters, digits and . _ : @ -, starting with a letter or digit (so an id
# is always one URL path segment: no '/', no '.'/'..', no spaces, control characters or surrogates)
SESSION_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,%d}" % (MAX_SESSION_ID - 1), re.ASCII)
SESSION_ID_RULE = (f"1-{MAX_SESSION_ID} characters from A-Z a-z 0-9 . _ : @ -, "
                   "starting with a letter or digit")
SESSION_NEW, SESSION_RESUMED = "new", "resumed"  # ActResult.session_state (/v1 and /v2: "session_state")


@dataclass
class ActResult:
    """What every backend returns. Arrays are torch tensors from the in-process backends (`Engine`,
    `OnnxEngine`: on their device) and numpy arrays from the service and `PolicyClient`."""
    actions: Any  # Gaussian [B, act_max] float (zero past each agent's act_dim); Categorical [B] int64
    log_probs: Any  # [B]
    state: Any | None  # [B, hidden] next recurrent state (None: feed-forward, or kept in a session)
    versions: Any | None = None  # [B] adapter version that served each row (sessions, the service)
    batch: dict | None = None  # the service: {"requests": k, "rows": m} of the forward that served it
    # the service, session steps only: SESSION_RESUMED (the session's stored state was found) or SESSION_NEW
    # (none was: its first step, or its state expired, was evicted or reset, or the state store lost it)
    session_state: str | None = None


@dataclass
class ActRequest:
    """A checked request (made by `check_act`, or by concatenating checked ones)."""
    idx: np.ndarray  # [B] int64 agent indices (the spec's order, which is every backend's)
    names: np.ndarray  # [n_agents] object: the spec's agent ids (index -> id)
    obs: np.ndarray  # [B, obs_max] float32, zero past each row's obs_dim
    state: np.ndarray | None  # [B, hidden] float32 explicit state (None: zeros, or the session's)
    reset: np.ndarray | None  # [B] bool episode start (None: no row resets)
    avail: np.ndarray | None  # [B, act_max] bool, False past each row's act_dim (None: all available)
    session_id: str | None = None
    deterministic: bool = True
    seed: int | None = None  # sampling seed: the service serves the request alone with its own generator

    @property
    def n(self) -> int:
        return len(self.idx)

    @cached_property
    def agent_ids(self) -> list[str]:
        """[B] the agent id of each row (made on first use: a 4096-row stateless request never needs it)."""
        return self.names[self.idx].tolist()


class AgentTable:
    """A policy's per-agent sizes as arrays: all the validator reads, made once by its owner. From a
    spec (`AgentTable(spec)`), or from sizes alone (`from_sizes`: what a client learns from the model
    metadata); `spec` is None then."""

    def __init__(self, spec: PolicySpec | None, *, sizes: dict | None = None):
        if spec is not None:
            sizes = dict(agent_ids=spec.agent_ids, obs_dims=[a.obs_dim for a in spec.agents],
                         act_dims=[a.act_dim for a in spec.agents], obs_max=spec.obs_max,
                         act_max=spec.act_max, hidden=spec.hidden, recurrent=spec.recurrent,
                         categorical=spec.action == "categorical")
        self.spec = spec
        self.names = np.asarray(sizes["agent_ids"], dtype=object)  # [n_agents]
        self.index = {a: i for i, a in enumerate(sizes["agent_ids"])}
        self.byte_index = {a.encode("utf-8"): i for a, i in self.index.items()}  # /v2 BYTES ids
        self.obs_dims = np.asarray(sizes["obs_dims"], dtype=np.int64)  # [n_agents]
        self.act_dims = np.asarray(sizes["act_dims"], dtype=np.int64)  # [n_agents]
        self.obs_max, self.act_max = int(sizes["obs_max"]), int(sizes["act_max"])
        self.hidden = int(sizes["hidden"])
        self.recurrent, self.categorical = bool(sizes["recurrent"]), bool(sizes["categorical"])
        self.obs_uniform = bool((self.obs_dims == self.obs_max).all())
        self.act_uniform = bool((self.act_dims == self.act_max).all())

    @classmethod
    def from_sizes(cls, agent_ids: Sequence[str], obs_dims: Sequence[int], act_dims: Sequence[int], *,
                   obs_max: int, act_max: int, hidden: int, recurrent: bool, categorical: bool) -> "AgentTable":
        return cls(None, sizes=dict(agent_ids=list(agent_ids), obs_dims=obs_dims, act_dims=act_dims,
                                    obs_max=obs_max, act_max=act_max, hidden=hidden, recurrent=recurrent,
                                    categorical=categorical))

    @classmethod
    def of(cls, spec_or_table: "PolicySpec | AgentTable") -> "AgentTable":
        return spec_or_table if isinstance(spec_or_table, AgentTable) else cls(spec_or_table)

    def __len__(self) -> int:
        return len(self.names)


# --- the validator ------------------------------------------------------------------------------
ONE_ROW_PER_AGENT = "with a session each agent may appear at most once per request"


def check_act(table: AgentTable, agent_ids, obs, state=None, reset=None, avail=None, *,
              session_id: str | None = None, deterministic: bool = True, seed: int | None = None,
              max_rows: int | None = None) -> ActRequest:
    """Check every input (see the module doc) -> ActRequest; InputError (or UnknownAgentError) on the
    first problem. Never writes into the caller's arrays."""
    idx = agent_indices(table, agent_ids)  # [B]
    B = len(idx)
    check_rows(B, max_rows)
    check_session_id(session_id)
    obs_a = _obs(table, idx, obs)
    state_a = _state(table, idx, state, session_id)
    reset_a = _bools(reset, "reset", (B,))
    avail_a = _avail(table, idx, avail)
    if session_id is not None and len(np.unique(idx)) != B:
        raise InputError(ONE_ROW_PER_AGENT)
    return ActRequest(idx, table.names, obs_a, state_a, reset_a, avail_a, session_id, deterministic, seed)


def check_rows(n: int, max_rows: int | None) -> None:
    """The row limit (413): every entry point checks it before reading the rows."""
    if max_rows is not None and n > max_rows:
        raise InputError(f"{n} rows is over the limit of {max_rows} per request", 413)


def check_session_id(sid: object) -> str | None:
    """None, or a valid session id (SESSION_ID_RULE). The one session-id check of every route."""
    if sid is None:
        return None
    if not isinstance(sid, str) or SESSION_ID_RE.fullmatch(sid) is None:
        raise InputError(f"'session_id' {short(sid)} is invalid: use {SESSION_ID_RULE}")
    return sid


def check_width(table: AgentTable, name: str, idx: np.ndarray, width: int, first: int = 0) -> None:
    """THE width rule, for rows `idx` [k] that share one width: an array's rows, or one /v1 JSON row
    (`first`: its row number, which the message names). obs: from the rows' widest obs_dim to
    obs_max; avail: from the widest act_dim to act_max; state: hidden exactly."""
    if name == "state":
        if width != table.hidden:
            raise InputError(f"row {first}: state has {width} values, expected the policy's hidden size "
                             f"{table.hidden}")
        return
    dims, top, dim, most = ((table.obs_dims, table.obs_max, "obs_dim", "obs_max") if name == "obs"
                            else (table.act_dims, table.act_max, "act_dim", "act_max"))
    if width > top:
        raise InputError(f"row {first}: {name} has {width} values, more than the policy's {most} {top}")
    if width >= int(dims.max()):
        return  # every agent fits (the common case: no per-row gather)
    short_rows = np.flatnonzero(dims[idx] > width)
    if len(short_rows):
        r = int(short_rows[0])
        a = int(idx[r])
        raise InputError(f"row {first + r} ({table.names[a]}, {dim} {int(dims[a])}): {name} has {width} "
                         f"values, fewer than its {dim}")


def check_state_allowed(table: AgentTable, session_id: str | None) -> None:
    """A request that carries a state: recurrent policies only, and not together with a session."""
    if not table.recurrent:
        raise InputError("this policy is feed-forward and takes no 'state'")
    if session_id is not None:
        raise InputError("send either 'state' or a 'session_id', not both")


def require_categorical(table: AgentTable) -> None:
    """Action masks are for Categorical policies only."""
    if not table.categorical:
        raise InputError("avail (action masks) only apply to categorical policies")


def check_not_one_string(agent_ids) -> None:
    """A bare string is one id passed where a list is expected (it would iterate as characters)."""
    if isinstance(agent_ids, (str, bytes)):
        raise InputError(f"agent_ids must be a list of agent ids, not one string: pass [{short(agent_ids)}]")


def agent_indices(table: AgentTable, agent_ids) -> np.ndarray:
    """Agent ids (a sequence of strings) or integer indices (an int array) -> indices [B] int64."""
    check_not_one_string(agent_ids)
    if isinstance(agent_ids, np.ndarray) and agent_ids.dtype.kind in "iu":
        if agent_ids.ndim != 1:
            raise InputError(f"agent indices must be a 1-D array, not shape {list(agent_ids.shape)}")
        idx = agent_ids.astype(np.int64, copy=False)
        small = idx.tolist() if len(idx) <= 64 else idx  # Python min/max: faster when tiny
        if len(idx) and (min(small) < 0 or max(small) >= len(table)):
            i = int(np.flatnonzero((idx < 0) | (idx >= len(table)))[0])
            raise UnknownAgentError(f"row {i}: agent index {int(idx[i])}; agent indices must be in "
                                    f"[0, {len(table)})")
    else:
        try:
            idx = np.fromiter((table.index[a] for a in agent_ids), dtype=np.int64)
        except (KeyError, TypeError):
            raise _bad_id(table, agent_ids) from None
    if len(idx) == 0:
        raise InputError("empty batch: a request needs at least one row")
    return idx


def unknown_agent(table: AgentTable, row: int, value: object) -> UnknownAgentError:
    """The one message for an id that is not served (every entry point raises it)."""
    return UnknownAgentError(f"row {row}: unknown agent id {short(value)}; serving "
                             f"{list(table.index)[:MAX_LISTED_AGENTS]}")


def _bad_id(table: AgentTable, agent_ids) -> InputError:
    try:
        ids = list(agent_ids)
    except TypeError:
        return InputError("agent_ids must be a sequence of agent ids or an int array")
    for i, a in enumerate(ids):
        try:
            if a not in table.index:
                return unknown_agent(table, i, a)
        except TypeError:  # unhashable
            return InputError(f"row {i}: agent_ids must be a sequence of agent ids or an int array")
    return InputError("agent_ids must be a sequence of agent ids or an int array")


def agent_index(table: AgentTable, agent_id) -> int:
    """One agent id -> its index (UnknownAgentError otherwise)."""
    try:
        return table.index[agent_id]
    except (KeyError, TypeError):
        raise UnknownAgentError(f"unknown agent id {short(agent_id)}") from None


def distinct_agents(agent_ids) -> list[str]:
    """A session call's agent ids as a list; each at most once (it owns one state per agent)."""
    check_not_one_string(agent_ids)
    ids = list(agent_ids)
    try:
        distinct = len(set(ids)) == len(ids)
    except TypeError:
        raise InputError("agent_ids must be a sequence of agent ids") from None
    if not distinct:
        raise InputError(ONE_ROW_PER_AGENT)
    return ids


def _obs(table: AgentTable, idx: np.ndarray, obs) -> np.ndarray:
    """-> [B, obs_max] float32: shape, width, finite values, zeros past each row's obs_dim."""
    B, width = len(idx), table.obs_max
    x = _floats(obs, "obs")
    _check_rows_of(x, "obs", B)
    check_width(table, "obs", idx, x.shape[1])
    _finite(x, "obs")
    if x.shape[1] < width:
        x = np.pad(x, ((0, 0), (0, width - x.shape[1])))
    if not table.obs_uniform:
        _check_padding(table, idx, x)
    return x


def _check_rows_of(x: np.ndarray, name: str, B: int) -> None:
    if x.ndim != 2 or x.shape[0] != B:
        raise InputError(f"{name} has shape {list(x.shape)}, expected [{B}, width]: one row per agent id")


def _check_padding(table: AgentTable, idx: np.ndarray, obs: np.ndarray) -> None:
    """Columns past a row's obs_dim must be zero (one slice per distinct smaller obs_dim)."""
    dims = table.obs_dims[idx]  # [B]
    bad = None
    for d in np.unique(dims[dims < obs.shape[1]]).tolist():
        rows = np.flatnonzero(dims == d)
        nz = np.any(obs[rows, d:] != 0, axis=1)
        if nz.any():
            r = int(rows[np.flatnonzero(nz)[0]])
            bad = r if bad is None else min(bad, r)
    if bad is not None:
        a = int(idx[bad])
        raise InputError(f"row {bad} ({table.names[a]}, obs_dim {int(table.obs_dims[a])}): non-zero values "
                         f"past its obs_dim: wrong agent's row?")


def _state(table: AgentTable, idx: np.ndarray, state, session_id: str | None) -> np.ndarray | None:
    if state is None:
        return None
    check_state_allowed(table, session_id)
    x = _floats(state, "state")
    _check_rows_of(x, "state", len(idx))
    check_width(table, "state", idx, x.shape[1])
    _finite(x, "state")
    return x


def _avail(table: AgentTable, idx: np.ndarray, avail) -> np.ndarray | None:
    """-> [B, act_max] bool, False past each row's act_dim; every row has an available action."""
    if avail is None:
        return None
    B, act_max = len(idx), table.act_max
    require_categorical(table)
    a = _bools(avail, "avail", None)
    _check_rows_of(a, "avail", B)
    check_width(table, "avail", idx, a.shape[1])
    if a.shape[1] < act_max:
        a = np.pad(a, ((0, 0), (0, act_max - a.shape[1])))
    if not table.act_uniform:  # actions past a row's act_dim do not exist: read as unavailable
        a = a & (np.arange(act_max) < table.act_dims[idx][:, None])
    empty = ~a.any(axis=1)
    if empty.any():
        rows = np.flatnonzero(empty)
        more = f" and {len(rows) - 10} more" if len(rows) > 10 else ""
        raise InputError(f"rows {rows[:10].tolist()}{more}: no available action among the agent's "
                         "actions (all-zero avail mask)")
    return a


# --- arrays -----------------------------------------------------------------------------------
def _array(x, name: str) -> np.ndarray:
    """A numeric (bool, int or float) numpy array; InputError for anything else."""
    if isinstance(x, Mapping):
        keys = ", ".join(short(k) for k in list(x)[:3])
        raise InputError(f"{name} is a dict ({{{keys}{', ...' if len(x) > 3 else ''}}}): act takes arrays "
                         "with one row per agent id; for per-agent dicts (PettingZoo) use "
                         "lorasa_serve.envloop.TeamPolicy")
    if not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x)
        except (ValueError, TypeError) as e:  # ragged nesting and the like
            raise InputError(f"{name} must be a rectangular numeric array ({e})") from None
    if x.dtype.kind == "c":
        raise InputError(f"{name} must be real numbers, got dtype {x.dtype}")
    if x.dtype.kind not in "biuf":
        raise InputError(f"{name} must be numeric, got dtype {x.dtype}")
    return x


def _floats(x, name: str) -> np.ndarray:
    a = _array(x, name)
    if a.dtype == np.float32:
        return a
    with np.errstate(over="ignore", invalid="ignore"):  # beyond float32 -> inf: refused as non-finite
        return a.astype(np.float32)


def _finite(x: np.ndarray, name: str) -> None:
    """One reduction (the exact per-row check only when the sum is not finite)."""
    with np.errstate(over="ignore", invalid="ignore"):
        if x.size == 0 or math.isfinite(float(x.sum(dtype=np.float32))):
            return
    ok = np.isfinite(x).reshape(len(x), -1).all(axis=1)  # [B]
    if not ok.all():
        raise InputError(f"row {int(np.flatnonzero(~ok)[0])}: {name} contains NaN or inf (or a value "
                         "beyond float32 range)")


def _bools(x, name: str, shape: tuple | None) -> np.ndarray | None:
    """-> bool array (None stays None): booleans, or numbers that are all 0 or 1."""
    if x is None:
        return None
    a = _array(x, name)
    if a.dtype != np.bool_:
        if not ((a == 0) | (a == 1)).all():
            raise InputError(f"{name} must hold 0/1 or booleans")
        a = a != 0
    if shape is not None and a.shape != shape:
        raise InputError(f"{name} has shape {list(a.shape)}, expected {list(shape)}")
    return a


def pad_obs(per_agent: Sequence, width: int) -> np.ndarray:
    """Per-agent observations [obs_i] (each agent's own size) -> [N, width] float32 rows, zero-padded
    on the right: the row format every entry point takes (width: the policy's obs_max)."""
    out = np.zeros((len(per_agent), width), np.float32)
    for i, o in enumerate(per_agent):
        v = np.asarray(o, np.float32).reshape(-1)
        if len(v) > width:
            raise InputError(f"row {i}: obs has {len(v)} values, more than the policy's obs_max {width}")
        out[i, :len(v)] = v
    return out


def short(x: object) -> str:
    """repr of client input for an error message, cut to ECHO_CHARS characters (naming its length)."""
    r = repr(x)
    if len(r) <= ECHO_CHARS:
        return r
    return f"{r[:ECHO_CHARS]}... ({len(x) if isinstance(x, (str, bytes)) else len(r)} characters)"


def concat(reqs: Sequence[ActRequest], state: np.ndarray | None, act_max: int) -> ActRequest:
    """The rows of several checked requests as one (the service's batch). `state` [B, H] | None: the
    batch's state (explicit or from sessions); resets and masks default per request."""
    one = len(reqs) == 1
    idx = np.concatenate([r.idx for r in reqs])  # always a fresh array: a backend may cache it
    obs = reqs[0].obs if one else np.concatenate([r.obs for r in reqs])
    reset = None
    if any(r.reset is not None for r in reqs):
        reset = np.concatenate([r.reset if r.reset is not None else np.zeros(r.n, bool) for r in reqs])
    avail = None
    if any(r.avail is not None for r in reqs):
        avail = np.concatenate([r.avail if r.avail is not None else np.ones((r.n, act_max), bool)
                                for r in reqs])
    return ActRequest(idx, reqs[0].names, obs, state, reset, avail, None, reqs[0].deterministic,
                      reqs[0].seed if one else None)
