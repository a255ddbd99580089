"""The one array-level validator of act requests, shared by /v1 (after its JSON rows became arrays)
and /v2 (after its tensors were decoded): vectorised over the whole batch, no per-row Python loops.

It turns checked arrays into the `ActRequest` the batcher takes, or raises `BadRequest` naming the
first offending row (and column): agent indices in range, obs [B, obs_max] finite within float32
with zeros past each row's obs_dim, avail [B, act_max] with an available action per row (columns past
a row's act_dim are ignored), state [B, hidden] finite and only without a session, reset [B], at most
`max_rows` rows (413), each agent at most once per request with a session.
"""
from __future__ import annotations

import numpy as np

from lorasa_serve.spec import PolicySpec

from .schema import ActRequest, BadRequest


class AgentTable:
    """Per-agent sizes of a spec as arrays, made once per runtime."""

    def __init__(self, spec: PolicySpec):
        self.spec = spec
        self.names = np.asarray(spec.agent_ids, dtype=object)  # [n_agents]
        self.index = {a: i for i, a in enumerate(spec.agent_ids)}
        self.byte_index = {a.encode("utf-8"): i for a, i in self.index.items()}  # /v2 BYTES ids
        self.obs_dims = np.asarray([a.obs_dim for a in spec.agents], dtype=np.int64)  # [n_agents]
        self.act_dims = np.asarray([a.act_dim for a in spec.agents], dtype=np.int64)  # [n_agents]


_TABLES: dict[int, AgentTable] = {}


def agent_table(spec: PolicySpec) -> AgentTable:
    t = _TABLES.get(id(spec))
    if t is None or t.spec is not spec:
        if len(_TABLES) >= 16:  # a server has one spec; tests make many
            _TABLES.clear()
        t = _TABLES[id(spec)] = AgentTable(spec)
    return t


def check_act(spec: PolicySpec, max_rows: int, idx: np.ndarray, obs: np.ndarray,
              state: np.ndarray | None = None, reset: np.ndarray | None = None,
              avail: np.ndarray | None = None, session_id: str | None = None,
              deterministic: bool = True, seed: int | None = None,
              ids: list[str] | None = None) -> ActRequest:
    """idx [B] int agent indices; obs [B, obs_max] float32; state [B, hidden] float32 | None;
    reset [B] bool | None; avail [B, act_max] bool | None. `ids`: the agent ids of idx if the caller
    already has them."""
    t = agent_table(spec)
    n = len(idx)
    if n == 0:
        raise BadRequest("a request needs at least one row")
    if n > max_rows:
        raise BadRequest(f"{n} rows is over the limit of {max_rows} per request", 413)
    if idx.ndim != 1 or idx.dtype.kind not in "iu":
        raise BadRequest("agent indices must be a 1-D integer array")
    out = (idx < 0) | (idx >= len(t.names))
    if out.any():
        i = int(np.flatnonzero(out)[0])
        raise BadRequest(f"row {i}: unknown agent index {int(idx[i])}; serving 0..{len(t.names) - 1} "
                         f"= {spec.agent_ids}")
    _check_float(obs, (n, spec.obs_max), "obs")
    _check_padding(t, idx, obs)
    if reset is None:
        reset = np.zeros(n, dtype=bool)
    elif reset.shape != (n,) or reset.dtype != np.bool_:
        raise BadRequest(f"reset must be bool [{n}], not {reset.dtype} {list(reset.shape)}")
    if avail is not None:
        avail = _check_avail(spec, t, idx, avail)
    if state is not None:
        if not spec.recurrent:
            raise BadRequest("this policy is feed-forward and takes no 'state'")
        if session_id is not None:
            raise BadRequest("send either 'state' or a 'session_id', not both")
        _check_float(state, (n, spec.hidden), "state")
    if session_id is not None and len(np.unique(idx)) != n:
        raise BadRequest("with a session_id each agent may appear at most once per request")
    req = ActRequest(idx.astype(np.int64, copy=False), t.names, obs, state, reset, avail, session_id,
                     deterministic, seed)
    if ids is not None:
        req.agent_ids = ids  # the caller's list: not made again from idx
    return req


def _check_float(x: np.ndarray, shape: tuple[int, int], name: str) -> None:
    if x.dtype != np.float32:
        raise BadRequest(f"{name} must be float32, not {x.dtype}")
    if x.shape != shape:
        raise BadRequest(f"{name} has shape {list(x.shape)}, expected {list(shape)}")
    finite = np.isfinite(x).all(axis=1)  # [B]
    if not finite.all():
        i = int(np.flatnonzero(~finite)[0])
        raise BadRequest(f"row {i}: {name} contains NaN, inf or a value outside float32 range")


def _check_padding(t: AgentTable, idx: np.ndarray, obs: np.ndarray) -> None:
    """Columns past a row's obs_dim must be zero (one slice per distinct smaller obs_dim)."""
    dims = t.obs_dims[idx]  # [B]
    for d in np.unique(t.obs_dims[t.obs_dims < obs.shape[1]]):
        rows = np.flatnonzero(dims == d)
        if len(rows) and np.any(obs[rows, d:]):
            bad = rows[np.any(obs[rows, d:] != 0, axis=1)][0]
            col = int(d + np.flatnonzero(obs[bad, d:])[0])
            raise BadRequest(f"row {int(bad)} (agent {t.names[idx[bad]]!r}, obs_dim {int(d)}): obs column "
                             f"{col} is not zero; columns past the agent's obs_dim must be zero")


def _check_avail(spec: PolicySpec, t: AgentTable, idx: np.ndarray, avail: np.ndarray) -> np.ndarray:
    n = len(idx)
    if spec.action != "categorical":
        raise BadRequest("avail (available actions) only apply to categorical policies")
    if avail.shape != (n, spec.act_max) or avail.dtype != np.bool_:
        raise BadRequest(f"avail must be bool [{n}, {spec.act_max}], not {avail.dtype} {list(avail.shape)}")
    dims = t.act_dims[idx]  # [B]
    if (dims < spec.act_max).any():  # ignore columns past each row's act_dim
        avail = avail & (np.arange(spec.act_max) < dims[:, None])
    empty = ~avail.any(axis=1)
    if empty.any():
        raise BadRequest(f"row {int(np.flatnonzero(empty)[0])}: avail has no available action (all zero)")
    return avail
