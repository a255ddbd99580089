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
Errors are typed: `ClientError` (status and the server's message) and its subclasses
`ServerUnavailable` and `StepOutcomeUnknown`.
"""
from __future__ import annotations

import http.client
import json
import select
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Sequence
from urllib.parse import quote, urlsplit

import numpy as np

from .oip_codec import HEADER, TensorError, decode_body, encode_parts

DEFAULT_MODEL = "lorasa_policy"
RETRY_SAFE = "X-Lorasa-Retry-Safe"  # the server's mark on a 503 after which re-sending is safe
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


class _NotSent(OSError):
    """The request did not fully leave this process (connect or send failed): safe to send again."""


@dataclass
class ActResult:
    actions: np.ndarray  # [B, act_max] float32 (Gaussian) or [B] int64 (Categorical)
    log_probs: np.ndarray  # [B] float32
    state: np.ndarray | None  # [B, hidden] float32 next state (None: feed-forward, or a session)
    versions: np.ndarray  # [B] int64 adapter version that served each row


class PolicyClient:
    def __init__(self, url: str, model: str = DEFAULT_MODEL, timeout: float = 30.0, retries: int = 5,
                 max_retry_wait_s: float = 10.0):
        parts = urlsplit(url if "://" in url else "http://" + url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self._conn_cls = HTTPSConnection if parts.scheme == "https" else HTTPConnection
        self._host, self._port = parts.hostname, parts.port
        self._base = parts.path.rstrip("/")
        self.model, self.timeout = model, timeout
        self.retries, self.max_retry_wait_s = retries, max_retry_wait_s
        self._conn: http.client.HTTPConnection | None = None
        self._index: dict[str, int] | None = None  # agent id -> index, from the model metadata

    # --- public API ---------------------------------------------------------------------------
    def act(self, agent_ids: Sequence[str] | np.ndarray, obs, state=None, reset=None, avail=None,
            deterministic: bool = True, session_id: str | None = None, seed: int | None = None
            ) -> ActResult:
        """agent_ids [B] (ids, or integer indices in the policy's agent order); obs [B, obs_max]
        (zero past each agent's obs_dim); state [B, hidden] | None; reset [B] bool | None;
        avail [B, act_max] bool | None (categorical)."""
        tensors = [_agent_tensor(agent_ids, self._agent_index)]
        tensors.append(("obs", "FP32", _array(obs, np.float32, 2, "obs"), True))
        if state is not None:
            tensors.append(("state", "FP32", _array(state, np.float32, 2, "state"), True))
        if reset is not None:
            tensors.append(("reset", "BOOL", _array(reset, np.bool_, 1, "reset"), True))
        if avail is not None:
            tensors.append(("avail", "BOOL", _array(avail, np.bool_, 2, "avail"), True))
        params: dict = {"binary_data_output": True, "deterministic": bool(deterministic)}
        if session_id is not None:
            params["session_id"] = session_id
        if seed is not None:
            params["seed"] = int(seed)
        parts, hlen = encode_parts({"parameters": params}, "inputs", tensors)  # arrays not copied
        headers = {"Content-Type": "application/octet-stream", HEADER: str(hlen),
                   "Content-Length": str(sum(len(p) for p in parts))}
        status, resp_headers, data = self._call("POST", f"/v2/models/{quote(self.model)}/infer", parts,
                                                headers, step=session_id is not None)
        try:
            out = decode_body(data, resp_headers.get(HEADER), "outputs").tensors
        except TensorError as e:
            raise ClientError(status, f"malformed response: {e}") from None
        return ActResult(out["action"].array, out["log_prob"].array,
                         out["state_out"].array if "state_out" in out else None, out["version"].array)

    def session(self, session_id: str | None = None) -> "Session":
        """A session: the server keeps each agent's recurrent state between calls. Its id is a bearer
        capability (whoever knows it can step or reset it): by default a random uuid4 (122 bits)."""
        return Session(self, uuid.uuid4().hex if session_id is None else session_id)

    def reset_session(self, session_id: str) -> bool:
        """Forget a session's state; -> whether it existed."""
        return bool(self._json("POST", f"/v1/sessions/{quote(session_id, safe='')}/reset")["existed"])

    def metadata(self) -> dict:
        """The model's inputs and outputs (datatypes, shapes) and its agents."""
        return self._json("GET", f"/v2/models/{quote(self.model)}")

    def ready(self) -> bool:
        """The model is loaded (no retries)."""
        try:
            return self._request("GET", f"/v2/models/{quote(self.model)}/ready", None, {})[0] == 200
        except OSError:
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
    def _agent_index(self) -> dict[str, int]:
        if self._index is None:
            agents = self.metadata().get("parameters", {}).get("agents", [])
            self._index = {a["agent_id"]: i for i, a in enumerate(agents)}
        return self._index

    def _json(self, method: str, path: str) -> dict:
        _, _, data = self._call(method, path, None, {})
        return json.loads(data)

    def _call(self, method: str, path: str, body: bytes | list | None, headers: dict, step: bool = False
              ) -> tuple[int, http.client.HTTPMessage, bytes]:
        """One request with the bounded retries: 503 (honouring Retry-After) and requests that never
        fully left. step: a session step, re-sent only when that cannot apply it twice."""
        stale_resent = False
        for attempt in range(self.retries + 1):
            reused = self._conn is not None
            try:
                status, resp_headers, data = self._request(method, path, body, headers)
            except _NotSent as e:  # nothing (complete) reached the server: safe to send again
                if attempt == self.retries:
                    raise ServerUnavailable(0, f"no answer from {self._host}:{self._port}: {e}") from None
                if not reused:  # a fresh connection failed: the server is down, back off
                    time.sleep(min(0.5 * 2 ** attempt, self.max_retry_wait_s))
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
            if attempt == self.retries:
                raise ServerUnavailable(status, message)
            time.sleep(_retry_after(resp_headers.get("Retry-After"), self.max_retry_wait_s))
        raise AssertionError("unreachable")

    def _request(self, method: str, path: str, body: bytes | list | None, headers: dict
                 ) -> tuple[int, http.client.HTTPMessage, bytes]:
        """Send on the kept-alive connection (reopened first when the server closed it while idle).
        Raises _NotSent when connecting or sending failed (the request did not fully leave), else
        the OSError from waiting for the answer (the request may have been acted on)."""
        if self._conn is not None and _peer_closed(self._conn.sock):
            self.close()
        if self._conn is None:
            self._conn = self._conn_cls(self._host, self._port, timeout=self.timeout)
        try:
            self._conn.request(method, self._base + path, body=body, headers=headers)
        except OSError as e:
            self.close()
            raise _NotSent(f"{type(e).__name__}: {e}") from e
        except BaseException:
            self.close()
            raise
        try:
            resp = self._conn.getresponse()
            data = resp.read()
        except BaseException:
            self.close()
            raise
        if resp.will_close:
            self.close()
        return resp.status, resp.headers, data


class Session:
    """`PolicyClient.act` with a fixed session_id (no state passed back and forth). A step whose
    outcome is unknown raises StepOutcomeUnknown (see the module docstring)."""

    def __init__(self, client: PolicyClient, session_id: str):
        self.client, self.session_id = client, session_id

    def act(self, agent_ids, obs, reset=None, avail=None, deterministic: bool = True,
            seed: int | None = None) -> ActResult:
        return self.client.act(agent_ids, obs, None, reset, avail, deterministic, self.session_id, seed)

    def reset(self) -> bool:
        return self.client.reset_session(self.session_id)


def _agent_tensor(agent_ids, index_of) -> tuple[str, str, np.ndarray, bool]:
    ids = agent_ids if isinstance(agent_ids, np.ndarray) else np.asarray(list(agent_ids), dtype=object)
    if ids.dtype.kind in "iu" or (ids.dtype == object and ids.size and all(map(_is_int, ids.reshape(-1)))):
        return "agent_index", "INT64", ids.astype(np.int64, copy=False).reshape(-1), True
    names = [str(a) for a in ids.reshape(-1)]
    index = index_of()
    if all(a in index for a in names):  # integer indices: cheaper to send and to look up
        return "agent_index", "INT64", np.fromiter((index[a] for a in names), np.int64, len(names)), True
    return "agent_id", "BYTES", np.asarray([a.encode() for a in names] or [], dtype=object), True


def _is_int(a: object) -> bool:
    """An integer agent index (a list/range/tuple of ints), not a bool."""
    return isinstance(a, (int, np.integer)) and not isinstance(a, (bool, np.bool_))


def _peer_closed(sock: socket.socket | None) -> bool:
    """An idle kept-alive connection with something to read: the server closed it (or sent junk)."""
    if sock is None:
        return False
    try:
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return True


def _array(x, dtype, ndim: int, name: str) -> np.ndarray:
    a = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, dtype=dtype)
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, not shape {list(a.shape)}")
    return a


def _error_message(data: bytes) -> str:
    try:
        return str(json.loads(data)["error"])
    except (ValueError, KeyError, TypeError):
        return data[:300].decode("utf-8", "replace")


def _retry_after(value: str | None, cap: float) -> float:
    try:
        return max(0.0, min(float(value), cap)) if value is not None else min(1.0, cap)
    except ValueError:  # an HTTP date: not worth parsing for a short outage
        return min(1.0, cap)
