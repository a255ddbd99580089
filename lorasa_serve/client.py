"""A Python client for environment loops: numpy in, numpy out, binary Open Inference Protocol (/v2)
under the hood, over one pooled keep-alive connection. Needs only numpy and the standard library
(no torch, no bentoml).

    from lorasa_serve.client import PolicyClient
    with PolicyClient("http://127.0.0.1:3000") as client:
        out = client.act(["agent_0", "agent_1"], obs)          # obs [B, obs_max] float32
        out.actions, out.log_probs, out.state, out.versions
        ep = client.session()                                  # recurrent state kept on the server
        ep.act(agent_ids, obs, reset=[True, True]); ep.reset()  # (a random, unguessable session id)

One client is one connection: use one per thread. A 503 (server starting, overloaded) is retried
up to `retries` times, waiting what `Retry-After` says (at most `max_retry_wait_s`); a refused
connection likewise. A session step is re-sent only when that cannot step the session twice: after
a refused connection or a failed send (the request never fully left), or a 503 the server marks
`X-Lorasa-Retry-Safe: 1`. When its answer is lost after it was sent (dropped connection, timeout, an
unmarked 503) it raises `StepOutcomeUnknown`: reset the session, or continue from there.
Every session step's result says whether the server found the session's state (`session_state`
"resumed") or started it from zero ("new"). A `Session` that has stepped since its last reset and gets
"new" (the state expired, was evicted, or the server's state store lost it) raises `SessionLost`
(carrying the step's result; `on_lost="warn"` or `"ignore"` to go on instead).
Errors are typed: `ClientError` (status and the server's message) and its subclasses
`ServerUnavailable`, `StepOutcomeUnknown`, `SessionLost`, `ResponseError` (an answer that does not fit the
request: shapes, datatypes, row count, missing outputs, malformed JSON, over `max_response_bytes`) and
`ClientInputError` (bad arguments, checked before anything is sent by `lorasa_serve.protocol`'s rules, the
server's, against the model metadata fetched once: the same messages; a bad URL; also a ValueError).
`timeout` is one deadline per call: connecting,
sending, the whole answer and any retries together (a server dripping bytes cannot stretch it).
"""
from __future__ import annotations

import functools
import http.client
import io
import json
import select
import socket
import time
import uuid
import warnings
from typing import Sequence
from urllib.parse import quote, urlsplit

import numpy as np

from .errors import InputError
from .oip_codec import HEADER, TensorError, decode_body, encode_parts
from .protocol import SESSION_NEW, SESSION_RESUMED
from .protocol import ActResult  # numpy arrays here: actions, log_probs, state (None in a session), versions
from .protocol import AgentTable, check_act, check_not_one_string

DEFAULT_MODEL = "lorasa_policy"
RETRY_SAFE = "X-Lorasa-Retry-Safe"  # the server's mark on a 503 after which re-sending is safe
MAX_RESPONSE_BYTES = 64 << 20  # default bound on one answer (a 1,024-row binary answer is ~0.5 MB)
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


class _NoDelay:
    """http.client sends the headers and the body in two writes: without TCP_NODELAY, Nagle's
    algorithm holds the body back until the server acknowledges the headers (a delayed ACK)."""

    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class HTTPConnection(_NoDelay, http.client.HTTPConnection):
    pass


class HTTPSConnection(_NoDelay, http.client.HTTPSConnection):
    pass


class ClientError(Exception):
    """The server answered with an error (status: the HTTP status; 0 when there was no answer)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status
        self.message = message


class ServerUnavailable(ClientError):
    """Still 503 (or no connection) after the bounded retries."""


class StepOutcomeUnknown(ClientError):
    """A session step was sent but its answer was lost (the connection dropped or timed out, or a 503
    not marked retry-safe: storing its new state failed). The server may or may not have advanced
    the session, so it is not re-sent: reset the session (`Session.reset()`) or continue from here."""


class SessionLost(ClientError):
    """A `Session` step started from a zero state (`session_state` "new") although the session had
    stepped since its last reset: the server no longer had its state (it expired after the server's
    session TTL, was evicted, was reset elsewhere, or the server's state store lost it: Redis restarted
    empty, a rebuilt sessions.sqlite). The step was applied from zero; `result` is its answer, and the
    session goes on from it (reset the episode if a fresh start matters)."""

    def __init__(self, message: str, result: ActResult):
        super().__init__(200, message)
        self.result = result


class ResponseError(ClientError):
    """The server's answer does not fit the request: missing outputs, wrong shapes, datatypes or row
    count, malformed JSON or tensors, or larger than `max_response_bytes`."""


class ClientInputError(ClientError, ValueError):
    """Bad arguments to a client call (nothing was sent)."""

    def __init__(self, message: str):
        super().__init__(0, message)


class _NotSent(OSError):
    """The request did not fully leave this process (connect or send failed): safe to send again."""


class PolicyClient:
    def __init__(self, url: str, model: str = DEFAULT_MODEL, timeout: float = 30.0, retries: int = 5,
                 max_retry_wait_s: float = 10.0, max_response_bytes: int = MAX_RESPONSE_BYTES):
        """timeout: seconds for a whole call (connect, send, the whole answer, retries included).
        A URL that is not http(s)://host[:port][/path] raises ClientInputError."""
        self._host, self._port, self._base, https = _parse_url(url)
        self._conn_cls = HTTPSConnection if https else HTTPConnection
        self.model, self.timeout = model, timeout
        self.retries, self.max_retry_wait_s = retries, max_retry_wait_s
        self.max_response_bytes = max_response_bytes
        self._meta: dict | None = None  # the model metadata, once fetched (checks answers against it)
        self._conn: http.client.HTTPConnection | None = None
        self._agents: AgentTable | None = None  # the protocol's view of the model, from its metadata

    # --- public API ---------------------------------------------------------------------------
    def act(self, agent_ids: Sequence[str] | np.ndarray, obs, state=None, reset=None, avail=None,
            deterministic: bool = True, session_id: str | None = None, seed: int | None = None
            ) -> ActResult:
        """agent_ids [B] (ids, or integer indices in the policy's agent order); obs [B, W] (W: the
        rows' widest obs_dim .. obs_max; zero past each agent's obs_dim); state [B, hidden] | None;
        reset [B] bool | None; avail [B, W'] bool | None (categorical). Checked by the protocol's rules
        before anything is sent (ClientInputError with its message)."""
        try:
            check_not_one_string(agent_ids)  # before the metadata call: a mistake needs no server
            req = check_act(self._table(), _ids(agent_ids), *map(_numpy, (obs, state, reset, avail)),
                            session_id=session_id)
        except InputError as e:
            raise ClientInputError(str(e)) from None
        tensors = [("agent_index", "INT64", req.idx, True), ("obs", "FP32", req.obs, True)]
        for name, dtype, arr in (("state", "FP32", req.state), ("reset", "BOOL", req.reset),
                                 ("avail", "BOOL", req.avail)):
            if arr is not None:
                tensors.append((name, dtype, arr, True))
        params: dict = {"binary_data_output": True, "deterministic": bool(deterministic)}
        if session_id is not None:
            params["session_id"] = session_id
        if seed is not None:
            params["seed"] = int(seed)
        parts, hlen = encode_parts({"parameters": params}, "inputs", tensors)  # arrays not copied
        headers = {"Content-Type": "application/octet-stream", HEADER: str(hlen),
                   "Content-Length": str(sum(len(p) for p in parts))}
        rows = req.n
        status, resp_headers, data = self._call("POST", f"/v2/models/{quote(self.model)}/infer", parts,
                                                headers, step=session_id is not None)
        try:
            msg = decode_body(data, resp_headers.get(HEADER), "outputs")
        except TensorError as e:
            raise ResponseError(status, f"malformed response: {e}") from None
        res = _checked_result(msg.tensors, rows, None if req.state is None else req.state.shape[1], self._meta)
        res.session_state = _session_state(msg.header, session_id is not None and req.state is None)
        return res

    def session(self, session_id: str | None = None, on_lost: str = "raise") -> "Session":
        """A session: the server keeps each agent's recurrent state between calls. Its id is a bearer
        capability (whoever knows it can step or reset it): by default a random uuid4 (122 bits).
        on_lost: what a step that found the session's state gone does (see `Session`)."""
        return Session(self, uuid.uuid4().hex if session_id is None else session_id, on_lost)

    def reset_session(self, session_id: str) -> bool:
        """Forget a session's state; -> whether it existed."""
        existed = self._json("POST", f"/v1/sessions/{quote(session_id, safe='')}/reset").get("existed")
        if not isinstance(existed, bool):
            raise ResponseError(200, "the reset answer has no boolean 'existed'")
        return existed

    def metadata(self) -> dict:
        """The model's inputs and outputs (datatypes, shapes) and its agents."""
        meta = self._json("GET", f"/v2/models/{quote(self.model)}")
        agents = meta.get("parameters", {}).get("agents") if isinstance(meta.get("parameters"), dict) else None
        if not isinstance(agents, list) or not all(isinstance(a, dict) and isinstance(a.get("agent_id"), str)
                                                   for a in agents):
            raise ResponseError(200, "model metadata without a list of agents (parameters.agents)")
        _output_shapes(meta)  # ResponseError unless outputs are well-formed
        self._meta = meta
        return meta

    def policy_spec(self):
        """The served policy's spec (`GET /v1/policy`, policy.json) as a `lorasa_serve.PolicySpec`."""
        from .errors import ArtifactError, SpecError
        from .spec import PolicySpec
        try:
            return PolicySpec.from_dict(self._json("GET", "/v1/policy"), "GET /v1/policy")
        except (ArtifactError, SpecError) as e:
            raise ResponseError(200, f"the policy spec does not parse: {e}") from None

    def ready(self) -> bool:
        """The model is loaded (no retries)."""
        try:
            return self._request("GET", f"/v2/models/{quote(self.model)}/ready", None, {},
                                 time.monotonic() + self.timeout)[0] == 200
        except (OSError, http.client.HTTPException, ClientError):
            return False

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> "PolicyClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- plumbing -----------------------------------------------------------------------------
    def _table(self) -> AgentTable:
        """The model's agents and sizes as the protocol's table (from the metadata, fetched once)."""
        if self._agents is None:
            self._agents = _table_of(self._meta if self._meta is not None else self.metadata())
        return self._agents

    def _json(self, method: str, path: str) -> dict:
        status, _, data = self._call(method, path, None, {})
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError) as e:
            raise ResponseError(status, f"the answer is not JSON: {type(e).__name__}") from None
        if not isinstance(doc, dict):
            raise ResponseError(status, "the answer is not a JSON object")
        return doc

    def _call(self, method: str, path: str, body: bytes | list | None, headers: dict, step: bool = False
              ) -> tuple[int, http.client.HTTPMessage, bytes]:
        """One request with the bounded retries: 503 (honouring Retry-After) and requests that never
        fully left. step: a session step, re-sent only when that cannot apply it twice."""
        stale_resent, deadline = False, time.monotonic() + self.timeout
        for attempt in range(self.retries + 1):
            reused = self._conn is not None
            try:
                status, resp_headers, data = self._request(method, path, body, headers, deadline)
            except _NotSent as e:  # nothing (complete) reached the server: safe to send again
                if attempt == self.retries or time.monotonic() >= deadline:
                    raise ServerUnavailable(0, f"no answer from {self._host}:{self._port}: {e}") from None
                if not reused:  # a fresh connection failed: the server is down, back off
                    _sleep(min(0.5 * 2 ** attempt, self.max_retry_wait_s), deadline)
                continue
            except (OSError, http.client.HTTPException) as e:  # sent, then no (whole) answer: the
                # server may have acted on it
                where = f"{self._host}:{self._port}: {type(e).__name__}: {e}"
                if step:
                    raise StepOutcomeUnknown(0, f"{where}: the session step was sent but its answer was "
                                                "lost; it may or may not have been applied: reset the "
                                                "session or continue") from None
                if reused and isinstance(e, _STALE) and not stale_resent:  # closed while idle: once
                    stale_resent = True
                    continue
                raise ServerUnavailable(0, where) from None
            if status == 200:
                return status, resp_headers, data
            message = _error_message(data)
            if status != 503:
                raise ClientError(status, message)
            if step and resp_headers.get(RETRY_SAFE) != "1":
                raise StepOutcomeUnknown(status, f"{message} (503 not marked {RETRY_SAFE}: the session "
                                                 "step may or may not have been applied: reset the "
                                                 "session or continue)")
            wait = _retry_after(resp_headers.get("Retry-After"), self.max_retry_wait_s)
            if attempt == self.retries or time.monotonic() + wait >= deadline:
                raise ServerUnavailable(status, message)
            time.sleep(wait)
        raise AssertionError("unreachable")

    def _request(self, method: str, path: str, body: bytes | list | None, headers: dict, deadline: float
                 ) -> tuple[int, http.client.HTTPMessage, bytes]:
        """Send on the kept-alive connection (reopened first when the server closed it while idle),
        everything before `deadline` (monotonic). Raises _NotSent when connecting or sending failed
        (the request did not fully leave), else the OSError from waiting for the answer (the request
        may have been acted on), or ResponseError for an answer over max_response_bytes."""
        if self._conn is not None and _peer_closed(self._conn.sock):
            self.close()
        try:
            if self._conn is None:
                self._conn = self._conn_cls(self._host, self._port, timeout=_left(deadline))
                self._conn.connect()
            self._conn.sock.settimeout(_left(deadline))  # sendall: the whole send within it
            self._conn.response_class = functools.partial(_DeadlineResponse, deadline=deadline)
            self._conn.request(method, self._base + path, body=body, headers=headers)
        except OSError as e:
            self.close()
            raise _NotSent(f"{type(e).__name__}: {e}") from e
        except BaseException:
            self.close()
            raise
        try:
            resp = self._conn.getresponse()
            data = _read_body(resp, self.max_response_bytes)
        except BaseException:
            self.close()
            raise
        if resp.will_close:
            self.close()
        return resp.status, resp.headers, data


class Session:
    """`PolicyClient.act` with a fixed session_id (no state passed back and forth). A step whose
    outcome is unknown raises StepOutcomeUnknown (see the module docstring).

    A step answered `session_state` "new" after this Session has stepped since its last `reset()` (and
    not every row of it resets) means the server lost the session's state: on_lost="raise" (default)
    raises SessionLost with the step's result, "warn" warns (RuntimeWarning) and returns it, "ignore"
    returns it. Reset sessions through `Session.reset()`: a reset elsewhere looks like a loss here."""

    ON_LOST = ("raise", "warn", "ignore")

    def __init__(self, client: PolicyClient, session_id: str, on_lost: str = "raise"):
        if on_lost not in self.ON_LOST:
            raise ClientInputError(f"on_lost must be one of {list(self.ON_LOST)}, not {on_lost!r}")
        self.client, self.session_id, self.on_lost = client, session_id, on_lost
        self._stepped = False  # a step succeeded since the last reset: the server holds state for it

    def act(self, agent_ids, obs, reset=None, avail=None, deterministic: bool = True,
            seed: int | None = None) -> ActResult:
        res = self.client.act(agent_ids, obs, None, reset, avail, deterministic, self.session_id, seed)
        lost = (res.session_state == SESSION_NEW and self._stepped
                and not (reset is not None and np.asarray(reset, dtype=bool).all()))
        self._stepped = True
        if lost and self.on_lost != "ignore":
            message = (f"session {self.session_id!r}: the server had no state for it (it expired, was evicted "
                       "or reset elsewhere, or the server's state store lost it): this step started from a "
                       "zero state")
            if self.on_lost == "raise":
                raise SessionLost(message, res)
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        return res

    def reset(self) -> bool:
        existed = self.client.reset_session(self.session_id)
        self._stepped = False
        return existed


class _DeadlineRaw(io.RawIOBase):
    """The socket's bytes, each read given only the time left before the call's deadline."""

    def __init__(self, sock: socket.socket, deadline: float):
        self.sock, self.deadline = sock, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        self.sock.settimeout(_left(self.deadline))
        return self.sock.recv_into(b)


class _DeadlineResponse(http.client.HTTPResponse):
    """http.client's response, reading through _DeadlineRaw: headers and body within the deadline."""

    def __init__(self, sock, *args, deadline: float, **kwargs):
        super().__init__(sock, *args, **kwargs)
        self.fp.close()  # the plain makefile() (nothing read from it yet)
        self.fp = io.BufferedReader(_DeadlineRaw(sock, deadline))


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the call's deadline (PolicyClient timeout) passed")
    return left


def _sleep(seconds: float, deadline: float) -> None:
    time.sleep(max(0.0, min(seconds, deadline - time.monotonic())))


def _read_body(resp: http.client.HTTPResponse, limit: int) -> bytes:
    """The whole body, refusing (ResponseError) past `limit` bytes before reading or allocating it."""
    if resp.length is not None:
        if resp.length > limit:
            raise ResponseError(resp.status, f"the answer's Content-Length {resp.length} is over the client's "
                                             f"max_response_bytes {limit}")
        return resp.read()
    chunks, n = [], 0
    while chunk := resp.read(1 << 16):
        n += len(chunk)
        if n > limit:
            raise ResponseError(resp.status, f"the answer is over the client's max_response_bytes {limit}")
        chunks.append(chunk)
    return b"".join(chunks)


def _output_shapes(meta: dict) -> dict[str, tuple[str, list]]:
    """{output name: (datatype, shape with -1 for the batch)} from model metadata, or ResponseError."""
    outs = meta.get("outputs")
    bad = ResponseError(200, "model metadata with malformed 'outputs'")
    if not isinstance(outs, list):
        raise bad
    shapes = {}
    for o in outs:
        if not isinstance(o, dict):
            raise bad
        name, datatype, shape = o.get("name"), o.get("datatype"), o.get("shape")
        if not (isinstance(name, str) and isinstance(datatype, str) and isinstance(shape, list)
                and all(_is_int(x) and x >= -1 for x in shape)):
            raise bad
        shapes[name] = (datatype, list(shape))
    return shapes


def _session_state(header: dict, step: bool) -> str | None:
    """A session step's `session_state` response parameter ("resumed" or "new"; None from a server
    that does not send it), or ResponseError when it is malformed or answers a request without session."""
    params = header.get("parameters", {})
    if not isinstance(params, dict):
        raise ResponseError(200, f"the answer's parameters must be an object (holding session_state), not "
                                 f"{type(params).__name__}")
    value = params.get("session_state")
    if value is None:
        return None
    if not step or value not in (SESSION_NEW, SESSION_RESUMED):
        raise ResponseError(200, f"the answer's parameter session_state {str(value)[:40]!r} is not "
                                 + ("'resumed' or 'new'" if step else "expected without a session"))
    return value


def _parse_url(url: object) -> tuple[str, int | None, str, bool]:
    """-> (host, port, base path, https) of an http(s) URL (scheme optional), else ClientInputError."""
    if not isinstance(url, str):
        raise ClientInputError(f"the server URL must be a string, not {type(url).__name__}")
    try:
        parts = urlsplit(url if "://" in url else "http://" + url)
        port = parts.port  # ValueError when not a number in 0..65535
    except ValueError as e:
        raise ClientInputError(f"not an http(s) URL: {url[:200]!r}: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ClientInputError(f"not an http(s) URL: {url[:200]!r}")
    return parts.hostname, port, parts.path.rstrip("/"), parts.scheme == "https"


def _checked_result(out: dict, rows: int, state_width: int | None, meta: dict | None) -> ActResult:
    """The outputs as an ActResult, each checked against the request (rows, the state's width) and,
    once fetched, the model metadata (datatypes, widths): else ResponseError."""
    want = {"action": None, "log_prob": ("FP32", [rows]), "version": ("INT64", [rows])}
    known = _output_shapes(meta) if meta is not None else {}
    for name, (datatype, shape) in known.items():
        want[name] = (datatype, [rows if d == -1 else d for d in shape])
    if state_width is not None:
        want["state_out"] = ("FP32", [rows, state_width])
    for name, spec in want.items():
        t = out.get(name)
        if t is None:
            if name == "state_out" and state_width is None:
                continue  # a session (kept on the server) or a feed-forward policy
            raise ResponseError(200, f"the answer has no output {name!r}")
        shape = list(t.array.shape)
        if spec is None:  # action without metadata: Gaussian [B, A] FP32 or Categorical [B] INT64
            ok = (t.datatype, len(shape)) in (("FP32", 2), ("INT64", 1)) and shape[:1] == [rows]
        else:
            ok = t.datatype == spec[0] and shape == spec[1]
        if not ok:
            need = f"{spec[0]} {spec[1]}" if spec else f"FP32 [{rows}, A] or INT64 [{rows}]"
            raise ResponseError(200, f"output {name!r} is {t.datatype} {shape}; the request of {rows} rows "
                                     f"needs {need}")
    state = out.get("state_out")
    return ActResult(out["action"].array, out["log_prob"].array, None if state is None else state.array,
                     out["version"].array)


def _table_of(meta: dict) -> AgentTable:
    """Model metadata -> the protocol's AgentTable: agents with obs_dim / act_dim, obs_max (the obs
    input's width), hidden (the state input's, if any), act_max (the avail input's, else the action
    output's); ResponseError when the metadata lacks them."""
    try:
        ins = {t["name"]: t["shape"] for t in meta["inputs"]}
        outs = {t["name"]: t["shape"] for t in meta["outputs"]}
        agents = meta["parameters"]["agents"]
        categorical, recurrent = "avail" in ins, "state" in ins
        sizes = [int(x) for x in (ins["obs"][1], (ins["avail"] if categorical else outs["action"])[1],
                                  ins["state"][1] if recurrent else 0)]
        return AgentTable.from_sizes([str(a["agent_id"]) for a in agents], [int(a["obs_dim"]) for a in agents],
                                     [int(a["act_dim"]) for a in agents], obs_max=sizes[0], act_max=sizes[1],
                                     hidden=sizes[2], recurrent=recurrent, categorical=categorical)
    except (KeyError, TypeError, IndexError, ValueError):
        raise ResponseError(200, "model metadata without the policy's sizes (inputs obs [, state, avail], "
                                 "outputs action, parameters.agents with obs_dim and act_dim)") from None


def _ids(agent_ids):
    """Agent ids as the protocol takes them: integer indices (a list, range, tuple or array of ints)
    as an int64 array; anything else as it is (ids, or what the protocol refuses)."""
    if isinstance(agent_ids, (str, bytes)) or not hasattr(agent_ids, "__iter__"):
        return agent_ids
    ids = _numpy(agent_ids)
    ids = ids if isinstance(ids, np.ndarray) else np.asarray(list(ids), dtype=object)
    if ids.dtype.kind in "iu":
        return ids
    if ids.dtype == object and ids.size and all(map(_is_int, ids.reshape(-1))):
        return ids.astype(np.int64)
    return list(ids) if ids.ndim == 1 else ids


def _is_int(a: object) -> bool:
    """An integer agent index (a list/range/tuple of ints), not a bool."""
    return isinstance(a, (int, np.integer)) and not isinstance(a, (bool, np.bool_))


def _numpy(x):
    """A torch tensor argument as a numpy array (this module never imports torch)."""
    return x.detach().cpu().numpy() if hasattr(x, "detach") else x


def _peer_closed(sock: socket.socket | None) -> bool:
    """An idle kept-alive connection with something to read: the server closed it (or sent junk)."""
    if sock is None:
        return False
    try:
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return True


def _error_message(data: bytes) -> str:
    """The server's `{"error": ...}` message, else the start of the body (never an exception)."""
    try:
        return str(json.loads(data)["error"])[:1000]
    except (ValueError, KeyError, TypeError, RecursionError):
        return data[:300].decode("utf-8", "replace")


def _retry_after(value: str | None, cap: float) -> float:
    try:
        return max(0.0, min(float(value), cap)) if value is not None else min(1.0, cap)
    except ValueError:  # an HTTP date: not worth parsing for a short outage
        return min(1.0, cap)
