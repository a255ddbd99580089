"""PolicyClient against a misbehaving server (a real socket server on loopback, written here): every
failure is a typed `lorasa_serve.client` error, within one deadline per call, with bounded memory:
bytes dripped slowly, wrong shapes, datatypes and row counts, a huge Content-Length, an endless
chunked body, missing outputs or keys, junk JSON."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import socketserver
import threading
import time

import numpy as np
import pytest

from lorasa_serve.client import (ClientError, ClientInputError, PolicyClient, ResponseError, ServerUnavailable,
                                 StepOutcomeUnknown)
from lorasa_serve.oip_codec import HEADER, encode

OBS = np.zeros((2, 6), np.float32)
# what metadata() would say: a recurrent Gaussian policy of two agents, obs 6, act 3, hidden 4
META = {"name": "lorasa_policy", "inputs": [{"name": "obs", "datatype": "FP32", "shape": [-1, 6]},
                                         {"name": "state", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "action", "datatype": "FP32", "shape": [-1, 3]},
                    {"name": "log_prob", "datatype": "FP32", "shape": [-1]},
                    {"name": "state_out", "datatype": "FP32", "shape": [-1, 4]},
                    {"name": "version", "datatype": "INT64", "shape": [-1]}],
        "parameters": {"agents": [{"agent_id": f"agent_{i}", "obs_dim": 6, "act_dim": 3} for i in range(2)]}}


def _outputs(action=("FP32", np.zeros((2, 3), np.float32)), log_prob=("FP32", np.zeros(2, np.float32)),
             version=("INT64", np.ones(2, np.int64)), state_out=None, drop=(), parameters=None):
    tensors = {"action": action, "log_prob": log_prob, "version": version}
    if state_out is not None:
        tensors["state_out"] = state_out
    parts = [(n, dt, arr, True) for n, (dt, arr) in tensors.items() if n not in drop]
    head = {"model_name": "lorasa_policy", **({"parameters": parameters} if parameters is not None else {})}
    body, hlen = encode(head, "outputs", parts)
    return body, {HEADER: str(hlen), "Content-Type": "application/octet-stream"}


def _reply(conn: socket.socket, body: bytes, headers: dict | None = None, status: str = "200 OK") -> None:
    head = {"Content-Length": str(len(body)), "Content-Type": "application/json", **(headers or {})}
    conn.sendall((f"HTTP/1.1 {status}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head.items())
                  + "\r\n").encode() + body)


def _drip(conn: socket.socket, data: bytes, every: float = 0.25) -> None:
    for i in range(len(data)):
        conn.sendall(data[i:i + 1])
        time.sleep(every)


MODES = {
    "ok": lambda c: _reply(c, *_outputs()),
    "drip_body": lambda c: (c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 400\r\n\r\n"), _drip(c, b"x" * 400)),
    "drip_headers": lambda c: _drip(c, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-" + b"a" * 200),
    "one_row": lambda c: _reply(c, *_outputs(action=("FP32", np.zeros((1, 3), np.float32)))),
    "zero_rows": lambda c: _reply(c, *_outputs(action=("FP32", np.zeros((0, 3), np.float32)))),
    "bytes_action": lambda c: _reply(c, *_outputs(action=("BYTES", np.array([b"a", b"b"], dtype=object)))),
    "int_log_prob": lambda c: _reply(c, *_outputs(log_prob=("INT64", np.zeros(2, np.int64)))),
    "no_version": lambda c: _reply(c, *_outputs(drop=("version",))),
    "state_rows": lambda c: _reply(c, *_outputs(state_out=("FP32", np.zeros((3, 4), np.float32)))),
    "huge_length": lambda c: c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000000\r\n\r\nxx"),
    "endless_chunks": lambda c: (c.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
                                 [c.sendall(b"10000\r\n" + b"x" * 0x10000 + b"\r\n") for _ in range(64)]),
    "junk_json": lambda c: _reply(c, b"{not json"),
    "list_json": lambda c: _reply(c, b"[1, 2]"),
    "meta_no_agents": lambda c: _reply(c, json.dumps({"name": "m", "parameters": 5}).encode()),
    "meta_bad_outputs": lambda c: _reply(c, json.dumps({"parameters": {"agents": [{"agent_id": "a"}]},
                                                        "outputs": [{"name": 1}]}).encode()),
    "reset_no_key": lambda c: _reply(c, b"{}"),
    "binary_junk": lambda c: _reply(c, b"\x00\x01garbage", {HEADER: "99999999999999999999999"}),
    "deep_error": lambda c: _reply(c, b'{"error": ' + b"[" * 100_000, status="400 Bad Request"),
    "deep_503": lambda c: _reply(c, b"[" * 100_000, {"Retry-After": "0"}, status="503 Service Unavailable"),
    "session_new": lambda c: _reply(c, *_outputs(parameters={"session_state": "new"})),
    "session_odd": lambda c: _reply(c, *_outputs(parameters={"session_state": "maybe"})),
    "session_bare": lambda c: _reply(c, *_outputs(parameters="new")),  # parameters not an object
    "session_list": lambda c: _reply(c, *_outputs(parameters=["new"])),
}


class Peer:
    def __init__(self):
        self.mode = "ok"  # a key of MODES, or a function of the connection
        peer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                f = self.request.makefile("rb")
                while True:
                    line, length = f.readline(), 0
                    if not line:
                        return
                    while line not in (b"\r\n", b"\n", b""):
                        if line.lower().startswith(b"content-length:"):
                            length = int(line.split(b":")[1])
                        line = f.readline()
                    f.read(length)
                    try:
                        (peer.mode if callable(peer.mode) else MODES[peer.mode])(self.request)
                    except OSError:
                        return  # the client gave up

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def client(self, **kw) -> PolicyClient:
        c = PolicyClient(self.url, retries=1, max_retry_wait_s=0.01, **kw)
        c._meta = META  # what metadata() would say (the peer answers every request with its mode)
        return c


@pytest.fixture(scope="module")
def peer():
    p = Peer()
    yield p
    p.server.shutdown()
    p.server.server_close()


def test_a_good_answer_passes(peer):
    peer.mode = "ok"
    out = peer.client().act(["agent_0", "agent_1"], OBS)
    assert out.actions.shape == (2, 3) and out.versions.tolist() == [1, 1]


@pytest.mark.parametrize("mode", ["drip_body", "drip_headers"])
def test_one_deadline_per_call_however_slowly_bytes_come(peer, mode):
    peer.mode = mode
    for session in (None, "s1"):
        t0 = time.monotonic()
        with pytest.raises(StepOutcomeUnknown if session else ServerUnavailable, match="deadline|timed out"):
            peer.client(timeout=1.5).act(["agent_0", "agent_1"], OBS, session_id=session)
        assert time.monotonic() - t0 < 3.0  # per-read timeouts let this run 100 s


@pytest.mark.parametrize("mode", ["one_row", "zero_rows", "bytes_action", "int_log_prob", "no_version",
                                  "junk_json", "binary_junk"])
def test_answers_that_do_not_fit_the_request_are_response_errors(peer, mode):
    peer.mode = mode
    with pytest.raises(ResponseError):
        peer.client().act(["agent_0", "agent_1"], OBS)


def test_state_rows_are_checked_against_the_request(peer):
    peer.mode = "state_rows"
    with pytest.raises(ResponseError, match="state_out"):
        peer.client().act(["agent_0", "agent_1"], OBS, state=np.zeros((2, 4), np.float32))


@pytest.mark.parametrize("mode", ["huge_length", "endless_chunks"])
def test_the_answer_size_is_bounded_before_it_is_read(peer, mode):
    peer.mode = mode
    t0 = time.monotonic()
    with pytest.raises(ResponseError, match="max_response_bytes"):
        peer.client(max_response_bytes=1 << 20).act(["agent_0", "agent_1"], OBS)
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("mode,call", [("junk_json", "metadata"), ("list_json", "metadata"),
                                       ("meta_no_agents", "metadata"), ("meta_bad_outputs", "metadata"),
                                       ("reset_no_key", "reset"), ("junk_json", "reset"),
                                       ("meta_no_agents", "act_by_name")])
def test_metadata_and_reset_answers_are_checked(peer, mode, call):
    peer.mode = mode
    c = PolicyClient(peer.url, retries=1, max_retry_wait_s=0.01)
    run = {"metadata": c.metadata, "reset": lambda: c.reset_session("s1"),
           "act_by_name": lambda: c.act(["agent_0", "agent_1"], OBS)}[call]
    with pytest.raises(ResponseError):
        run()


def test_bad_arguments_are_typed_and_nothing_is_sent(peer):
    peer.mode = "ok"
    c = peer.client()
    for args in ([["agent_0"], np.zeros(6)], [["agent_0"], [["x"] * 6]], [["agent_0", "agent_1"], np.zeros((3, 6))]):
        with pytest.raises(ClientInputError) as e:
            c.act(*args)
        assert isinstance(e.value, (ClientError, ValueError))


@pytest.mark.parametrize("mode,status", [("deep_error", 400), ("deep_503", 503)])
def test_a_deeply_nested_error_body_is_a_client_error(peer, mode, status):
    peer.mode = mode
    with pytest.raises(ClientError) as e:
        peer.client().act(["agent_0", "agent_1"], OBS)
    assert e.value.status == status and e.value.message.startswith("{\"error\": [[[" if status == 400 else "[[[")


def test_session_state_is_checked(peer):
    peer.mode = "session_new"
    assert peer.client().act(["agent_0", "agent_1"], OBS, session_id="s1").session_state == "new"
    with pytest.raises(ResponseError, match="without a session"):  # a stateless answer has none
        peer.client().act(["agent_0", "agent_1"], OBS)
    for mode in ("session_odd", "session_list", "session_bare"):
        peer.mode = mode
        with pytest.raises(ResponseError, match="session_state"):
            peer.client().act(["agent_0", "agent_1"], OBS, session_id="s1")
    peer.mode = "ok"  # a server that does not send it
    assert peer.client().act(["agent_0", "agent_1"], OBS, session_id="s1").session_state is None


@pytest.mark.parametrize("url", ["ftp://host", "http://", "http://host:port", "http://host:99999", "http://[::1",
                                 "", None, b"http://host"])
def test_a_bad_url_is_a_typed_client_error(url):
    with pytest.raises(ClientInputError, match="URL") as e:
        PolicyClient(url)
    assert isinstance(e.value, ValueError)


def test_metadata_outputs_are_checked_without_asserts(peer):
    """Under `python -O` (asserts stripped) malformed metadata outputs are still a ResponseError."""
    code = ("import sys; from lorasa_serve.client import PolicyClient, ResponseError\n"
            f"c = PolicyClient({peer.url!r}, retries=0)\n"
            "try:\n    c.metadata()\nexcept ResponseError as e:\n    print('typed:', e)\n"
            "else:\n    sys.exit('accepted')")
    for outputs in ([{"name": 1, "datatype": "FP32", "shape": [-1]}], [{"name": "a", "datatype": "FP32",
                                                                        "shape": [-1, "x"]}], [5], {"a": 1}):
        meta = {"parameters": {"agents": [{"agent_id": "a"}]}, "outputs": outputs}
        peer.mode = lambda c, meta=meta: _reply(c, json.dumps(meta).encode())
        r = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "typed: HTTP 200: model metadata with malformed 'outputs'" in r.stdout, \
            (outputs, r.stdout, r.stderr)
