"""The Open Inference Protocol (KServe v2) REST API: a Starlette app mounted by the service at /v2.

One model (`ServiceConfig.model_name`: LORASA_MODEL_NAME, default `lorasa_policy`), with the binary
tensor data extension.
Inference goes through the same validator (`lorasa_serve.protocol.check_act`), batcher and Engine as
/v1: a request becomes the `ActRequest` that `PolicyRuntime.submit` takes. Here: the wire (field
names, datatypes, numbers of dimensions, element limits); the protocol: every rule on the values.

    inputs   agent_id BYTES [B] | agent_index INT64 [B], obs FP32 [B, W] (W: the rows' widest obs_dim
             .. obs_max; zero past each agent's obs_dim), state FP32 [B, hidden], reset BOOL [B],
             avail BOOL [B, W'] (W': the rows' widest act_dim .. act_max)
    outputs  action FP32 [B, act_max] (Gaussian) | INT64 [B] (Categorical), log_prob FP32 [B],
             state_out FP32 [B, hidden], version INT64 [B]; a session step's response also has the
             parameter session_state: "resumed" (its stored state was found) or "new" (none was)
    request  id, parameters, inputs, outputs; model_name / model_version (kserve sends them) must
             agree with the URL
    parameters  deterministic (default true), session_id, seed, binary_data_output; timeout and
                priority (tritonclient's hints) accepted and ignored; Triton's sequence_id/_start/_end
                refused (400 naming session_id)
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Awaitable, Callable

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import lorasa_serve
from lorasa_serve.oip_codec import HEADER, Tensor, TensorError, decode, encode, split_body
from lorasa_serve.protocol import (ActRequest, ActResult, AgentTable, BadRequest, check_act, check_rows,
                                   check_session_id, short, unknown_agent)
from lorasa_serve.spec import PolicySpec

from . import metrics
from .config import DEFAULT_MODEL_NAME, ServiceConfig
from .http import NotReady, _body, _guard, _http_error
from .runtime import PolicyRuntime

MODEL_VERSION = "1"
PARSE_IN_THREAD_BYTES = 256 * 1024  # binary bodies parse in microseconds per MB; JSON does not
# `model_name` / `model_version` are not in the OIP request schema, but clients send them (kserve's
# InferRequest.to_rest: model_name always): accepted when they agree with the URL, 400 when not
REQUEST_FIELDS = {"id", "parameters", "inputs", "outputs", "model_name", "model_version"}
PARAMETERS = {"deterministic", "session_id", "seed", "binary_data_output"}
IGNORED_PARAMETERS = {"timeout", "priority"}  # tritonclient's scheduling hints: accepted, not acted on
SEQUENCE_PARAMETERS = {"sequence_id", "sequence_start", "sequence_end"}  # Triton's sequence batcher
INPUT_NDIM = {"agent_id": 1, "agent_index": 1, "reset": 1, "obs": 2, "state": 2, "avail": 2}
INPUT_TYPES = {"agent_id": ("BYTES",), "agent_index": ("INT64", "INT32"), "obs": ("FP32",),
               "state": ("FP32",), "reset": ("BOOL",), "avail": ("BOOL",)}
OUTPUTS = ("action", "log_prob", "state_out", "version")


@dataclass
class InferCall:
    req: ActRequest
    outputs: list[tuple[str, bool]]  # (name, binary) in response order
    request_id: str | None
    model: str = DEFAULT_MODEL_NAME  # the model the URL named: the response's model_name


def model_metadata(spec: PolicySpec, name: str = DEFAULT_MODEL_NAME) -> dict:
    """Inputs and outputs with datatypes and shapes (-1: the batch dimension) from the policy."""
    inputs = [{"name": "agent_id", "datatype": "BYTES", "shape": [-1]},
              {"name": "agent_index", "datatype": "INT64", "shape": [-1]},
              {"name": "obs", "datatype": "FP32", "shape": [-1, spec.obs_max]},
              {"name": "reset", "datatype": "BOOL", "shape": [-1]}]
    if spec.recurrent:
        inputs.append({"name": "state", "datatype": "FP32", "shape": [-1, spec.hidden]})
    if spec.action == "categorical":
        inputs.append({"name": "avail", "datatype": "BOOL", "shape": [-1, spec.act_max]})
        action = {"name": "action", "datatype": "INT64", "shape": [-1]}
    else:
        action = {"name": "action", "datatype": "FP32", "shape": [-1, spec.act_max]}
    outputs = [action, {"name": "log_prob", "datatype": "FP32", "shape": [-1]},
               {"name": "version", "datatype": "INT64", "shape": [-1]}]
    if spec.recurrent:
        outputs.insert(2, {"name": "state_out", "datatype": "FP32", "shape": [-1, spec.hidden]})
    return {"name": name, "versions": [MODEL_VERSION], "platform": "lorasa_serve", "inputs": inputs,
            "outputs": outputs,
            "parameters": {"agents": [{"agent_id": a.agent_id, "obs_dim": a.obs_dim, "act_dim": a.act_dim}
                                      for a in spec.agents],
                           "backbone_fingerprint": spec.backbone_fingerprint}}


def parse_infer(body: bytes, header_length: str | None, spec: PolicySpec | AgentTable, max_rows: int,
                model: str = DEFAULT_MODEL_NAME, version: str = MODEL_VERSION) -> InferCall:
    """An infer request body -> the checked ActRequest and the outputs to return. `spec`: the policy
    or its AgentTable; `model`, `version`: what the URL names (a body's must agree)."""
    table = AgentTable.of(spec)
    spec = table.spec
    try:
        head, binary = split_body(body, header_length)
        extra = sorted(set(head) - REQUEST_FIELDS)
        if extra:
            raise BadRequest(f"unknown request fields {extra}; allowed {sorted(REQUEST_FIELDS)}")
        _check_model_fields(head, model, version)
        params = _check_params(head.get("parameters", {}))
        _check_shapes(head.get("inputs"), max_rows)
        tensors = decode(head, binary, "inputs", max_elements=max_rows * max_width(spec)).tensors
    except TensorError as e:
        raise BadRequest(str(e)) from None
    det = _param(params, "deterministic", bool, True)
    seed = _param(params, "seed", int, None)
    if seed is not None and not 0 <= seed < 1 << 63:
        raise BadRequest("parameter 'seed' must be an integer in [0, 2**63)")
    req = _act_request(tensors, table, max_rows, det, check_session_id(params.get("session_id")), seed)
    outputs = _requested(head.get("outputs"), spec, req, _param(params, "binary_data_output", bool, False))
    rid = head.get("id")
    if rid is not None and not isinstance(rid, str):
        raise BadRequest("'id' must be a string")
    return InferCall(req, outputs, rid, model)


def _check_model_fields(head: dict, model: str, version: str) -> None:
    for field, url in (("model_name", model), ("model_version", version)):
        v = head.get(field)
        if v is None:
            continue
        if not isinstance(v, str):
            raise BadRequest(f"{field!r} must be a string")
        if v != url:
            raise BadRequest(f"request body {field} {short(v)} contradicts the URL's {url!r}")


def max_width(spec: PolicySpec) -> int:
    """The widest row of any input: a tensor of more than max_rows * this elements is refused."""
    return max(spec.obs_max, spec.act_max, spec.hidden, 1)


def _check_params(params: object) -> dict:
    if not isinstance(params, dict):
        raise BadRequest("'parameters' must be an object")
    seq = sorted(set(params) & SEQUENCE_PARAMETERS)
    if seq:
        raise BadRequest(f"request parameters {seq} (Triton sequences) are not supported: send the string "
                         "parameter 'session_id' to keep recurrent state on the server (and the input "
                         "'reset' to start an episode)")
    extra = sorted(set(params) - PARAMETERS - IGNORED_PARAMETERS)
    if extra:
        raise BadRequest(f"unknown request parameters {extra}; allowed {sorted(PARAMETERS | IGNORED_PARAMETERS)}")
    for name in IGNORED_PARAMETERS & set(params):
        v = params[name]
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise BadRequest(f"parameter {name!r} must be a non-negative integer (accepted and ignored)")
    return params


def _check_shapes(inputs: object, max_rows: int) -> None:
    """Before any tensor is decoded: unknown input names, the number of dimensions of each known
    input (a [1, N] agent_id of N mixed-length BYTES would cost a Python loop per element), and
    413 when a declared batch dimension is over the limit."""
    for t in inputs if isinstance(inputs, list) else ():
        name = t.get("name") if isinstance(t, dict) else None
        shape = t.get("shape") if isinstance(t, dict) else None
        if isinstance(name, str) and name not in INPUT_NDIM:
            raise BadRequest(f"unknown inputs [{short(name)}]; allowed {sorted(INPUT_TYPES)}")
        if not isinstance(name, str) or not isinstance(shape, list):
            continue  # decode() names what is wrong
        if len(shape) != INPUT_NDIM[name]:
            raise BadRequest(f"input {name!r} must be {INPUT_NDIM[name]}-D "
                             f"{'[B]' if INPUT_NDIM[name] == 1 else '[B, width]'}, not shape {short(shape)}")
        if shape and isinstance(shape[0], int):
            check_rows(shape[0], max_rows)


def _param(params: dict, name: str, typ: type, default):
    v = params.get(name, default)
    if v is not default and (not isinstance(v, typ) or isinstance(v, bool) != (typ is bool)):
        raise BadRequest(f"parameter {name!r} must be {'true or false' if typ is bool else 'an integer'}")
    return v


def _act_request(tensors: dict[str, Tensor], table: AgentTable, max_rows: int, det: bool,
                 sid: str | None, seed: int | None) -> ActRequest:
    unknown = sorted(set(tensors) - set(INPUT_TYPES))
    if unknown:
        raise BadRequest(f"unknown inputs {unknown}; allowed {sorted(INPUT_TYPES)}")
    for name, t in tensors.items():
        if t.datatype not in INPUT_TYPES[name]:
            raise BadRequest(f"input {name!r} must be {' or '.join(INPUT_TYPES[name])}, not {t.datatype}")
    if ("agent_id" in tensors) == ("agent_index" in tensors):
        raise BadRequest("send exactly one of the inputs 'agent_id' (BYTES) and 'agent_index' (INT64)")
    if "obs" not in tensors:
        raise BadRequest("input 'obs' is required")
    arr = {k: t.array for k, t in tensors.items()}
    return check_act(table, _agent_index(tensors, table), arr["obs"], arr.get("state"), arr.get("reset"),
                     arr.get("avail"), session_id=sid, deterministic=det, seed=seed, max_rows=max_rows)


def _agent_index(tensors: dict[str, Tensor], table: AgentTable) -> np.ndarray:
    """[B] int64 indices (the validator checks their range) from agent_index, or from agent_id."""
    if "agent_index" in tensors:
        return tensors["agent_index"].array.astype(np.int64, copy=False)
    ids = tensors["agent_id"].array
    idx = np.fromiter((table.byte_index.get(b, -1) for b in ids), dtype=np.int64, count=len(ids))
    bad = np.flatnonzero(idx < 0)
    if len(bad):
        raw = ids[bad[0]]
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest(f"row {int(bad[0])}: agent_id {raw[:64]!r} is not UTF-8") from None
        raise unknown_agent(table, int(bad[0]), name)
    return idx


def _requested(outputs: object, spec: PolicySpec, req: ActRequest, binary_default: bool
               ) -> list[tuple[str, bool]]:
    available = [o for o in OUTPUTS if spec.recurrent or o != "state_out"]
    if outputs is None:  # all, except the state a session keeps on the server
        return [(o, binary_default) for o in available
                if not (o == "state_out" and req.session_id is not None)]
    if not isinstance(outputs, list) or not outputs:
        raise BadRequest("'outputs' must be a non-empty list of {name, parameters}")
    out, seen = [], set()
    for o in outputs:
        name = o.get("name") if isinstance(o, dict) else None
        if name not in available:
            raise BadRequest(f"unknown output {name!r}; available {available}")
        if name in seen:
            raise BadRequest(f"output {name!r} requested twice")
        seen.add(name)
        params = o.get("parameters", {})
        if not isinstance(params, dict):
            raise BadRequest(f"output {name!r}: parameters must be an object")
        binary = params.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise BadRequest(f"output {name!r}: binary_data must be true or false")
        out.append((name, binary))
    return out


def encode_result(call: InferCall, spec: PolicySpec, res: ActResult) -> tuple[bytes, int | None]:
    arrays = {"action": ("FP32" if spec.action == "gaussian" else "INT64", res.actions),
              "log_prob": ("FP32", res.log_probs),
              "state_out": ("FP32", res.state),
              "version": ("INT64", np.asarray(res.versions, dtype=np.int64))}
    tensors = [(name, *arrays[name], binary) for name, binary in call.outputs]
    head: dict = {"model_name": call.model, "model_version": MODEL_VERSION}
    if call.request_id is not None:
        head["id"] = call.request_id
    if res.session_state is not None:  # a session step: "resumed", or "new" (no stored state was found)
        head["parameters"] = {"session_state": res.session_state}
    return encode(head, "outputs", tensors)


def build_oip_app(cfg: ServiceConfig, get_runtime: Callable[[], Awaitable[PolicyRuntime]]) -> Starlette:
    served = cfg.model_name

    def model(request: Request) -> None:
        name = request.path_params["model"]
        version = request.path_params.get("version", MODEL_VERSION)
        if name != served or version != MODEL_VERSION:
            raise BadRequest(f"unknown model {name!r} version {version!r}; serving {served!r} "
                             f"version {MODEL_VERSION!r}", 404)

    async def server_metadata(request: Request) -> JSONResponse:
        return JSONResponse({"name": "lorasa-serve", "version": lorasa_serve.__version__,
                             "extensions": ["binary_tensor_data"]})

    async def live(request: Request) -> JSONResponse:
        return JSONResponse({"live": True})

    async def ready(request: Request) -> JSONResponse:
        await get_runtime()  # NotReady -> 503
        return JSONResponse({"ready": True})

    async def model_ready(request: Request) -> JSONResponse:
        model(request)
        await get_runtime()
        return JSONResponse({"name": served, "ready": True})

    async def metadata(request: Request) -> JSONResponse:
        model(request)
        return JSONResponse(model_metadata((await get_runtime()).spec, served))

    async def infer(request: Request) -> Response:
        model(request)
        _check_body_headers(request)
        rt = await get_runtime()
        body = await _body(request, cfg.max_body_bytes)
        hlen = request.headers.get(HEADER)
        parse = lambda: parse_infer(body, hlen, rt.table, cfg.max_rows_per_request, served)  # noqa: E731
        # (model() checked that the URL names this model and version; the body must agree with them)
        # JSON tensors and binary BYTES ones (a Python loop per element unless all are one length)
        # are slow to parse: big bodies with either go off the event loop; other binary ones stay on it
        slow = len(body) > PARSE_IN_THREAD_BYTES and not (
            hlen is not None and hlen.isascii() and hlen.isdigit() and len(hlen) < 16
            and int(hlen) <= PARSE_IN_THREAD_BYTES
            and b"BYTES" not in body[:int(hlen)])
        call = await asyncio.to_thread(parse) if slow else parse()
        res = await rt.act(call.req)
        metrics.act_requests.labels(outcome="ok").inc()
        out, header_len = encode_result(call, rt.spec, res)
        if header_len is None:
            return Response(out, media_type="application/json")
        return Response(out, media_type="application/octet-stream", headers={HEADER: str(header_len)})

    prefix = "/models/{model}"
    routes = [Route("/", _guard(server_metadata), methods=["GET"]),
              Route("/health/live", _guard(live), methods=["GET"]),
              Route("/health/ready", _guard(ready), methods=["GET"])]
    for p in (prefix, prefix + "/versions/{version}"):
        routes += [Route(p, _guard(metadata), methods=["GET"]),
                   Route(p + "/ready", _guard(model_ready), methods=["GET"]),
                   Route(p + "/infer", _guard(infer), methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error})


BODY_TYPES = ("application/json", "application/octet-stream")  # or none: tritonclient sends none


def _check_body_headers(request: Request) -> None:
    """415 for a body we would misread: a compressed one (tritonclient's request_compression_algorithm)
    or a form / text/plain type (what a cross-site page can POST without a CORS preflight)."""
    enc = request.headers.get("content-encoding", "identity").strip().lower()
    if enc != "identity":
        raise BadRequest(f"Content-Encoding {short(enc)} is not supported: send the body uncompressed", 415)
    ctype = request.headers.get("content-type")
    if ctype is not None and ctype.split(";", 1)[0].strip().lower() not in BODY_TYPES:
        raise BadRequest(f"Content-Type must be one of {list(BODY_TYPES)} (or absent), not {short(ctype)}",
                         415)


class V2RootMiddleware:
    """ASGI middleware: `GET /v2` (server metadata) is answered by the mounted app's "/" route
    instead of Starlette's redirect to /v2/, which OIP clients do not follow."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/v2":
            scope = {**scope, "path": "/v2/", "raw_path": b"/v2/"}
        await self.app(scope, receive, send)


__all__ = ["NotReady", "V2RootMiddleware", "build_oip_app", "model_metadata",
           "parse_infer"]
