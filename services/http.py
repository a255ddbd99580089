"""The v1 HTTP API: a Starlette app mounted by the BentoML service at /v1.

Every handler turns bad input into a JSON `{"error": ...}` with a 4xx status before anything
reaches the engine; admin routes check `Authorization: Bearer <LORASA_ADMIN_TOKEN>` (exactly: one
space, no trimming) with `hmac.compare_digest` before reading the body. Routes that read JSON need
`Content-Type: application/json` (415 otherwise: a cross-site form or `text/plain` POST is refused).
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import os
from typing import Awaitable, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lorasa_serve import LorasaError, strict_json
from lorasa_serve.client import RETRY_SAFE
from lorasa_serve.errors import ArtifactError
from lorasa_serve.protocol import check_session_id

from . import adapter_upload, metrics
from .config import ServiceConfig
from .runtime import PolicyRuntime
from .schema import BadRequest, act_response, clip, parse_act, parse_admin, parse_json, short
from .state import SessionBusy, StateUnavailable
from .state.base import StateOutcomeUnknown

log = logging.getLogger("lorasa.service")


PARSE_IN_THREAD_BYTES = 64 * 1024
WORKER = str(os.getpid())  # response header X-Lorasa-Worker: which worker process answered


class NotReady(Exception):
    """The policy is not loaded (yet, or it failed): 503."""


def build_app(cfg: ServiceConfig, get_runtime: Callable[[], Awaitable[PolicyRuntime]]) -> Starlette:
    """await get_runtime() -> this worker's PolicyRuntime, or raises NotReady. Admin calls are
    authorised (from `cfg`) before readiness is checked or the body is read."""

    async def act(request: Request) -> JSONResponse:
        _require_json(request)
        rt = await get_runtime()
        body = await _body(request, cfg.max_body_bytes)
        parse = lambda: parse_act(parse_json(body), rt.table, cfg.max_rows_per_request)  # noqa: E731
        # big bodies are parsed off the event loop so they do not stall other requests
        req = await asyncio.to_thread(parse) if len(body) > PARSE_IN_THREAD_BYTES else parse()
        res = await rt.act(req)
        metrics.act_requests.labels(outcome="ok").inc()
        body = strict_json.dumps(act_response(req, rt.table, res.actions, res.log_probs, res.state,
                                              res.versions, res.batch, res.session_state))
        return Response(body, media_type="application/json")

    async def reset_session(request: Request) -> JSONResponse:
        rt = await get_runtime()
        sid = check_session_id(request.path_params["session_id"])
        existed = await asyncio.wrap_future(rt.control(lambda: rt.reset_session(sid)))
        return JSONResponse({"session_id": sid, "existed": existed})

    async def agents(request: Request) -> JSONResponse:
        rt = await get_runtime()
        info = await asyncio.wrap_future(rt.control(rt.agents_info))
        return JSONResponse({"backbone_fingerprint": rt.spec.backbone_fingerprint, "agents": info,
                             **rt.state_report()})

    async def policy(request: Request) -> JSONResponse:
        return JSONResponse((await get_runtime()).spec.to_dict())

    async def put_adapter(request: Request) -> JSONResponse:
        _authorize(request, cfg.admin_token)
        rt = await get_runtime()
        _swappable(rt)
        agent_id = request.path_params["agent_id"]
        if agent_id not in rt.applied:
            raise BadRequest(f"unknown agent_id {short(agent_id)}; serving {list(rt.applied)}", 404)
        data = await _body(request, cfg.max_upload_bytes)
        # same validation as Engine.load_adapter, before anything is stored (a PEFT upload is converted
        # to our layout first); every worker then loads the published bytes (services/state)
        data, tensors = await adapter_upload.adapter_bytes(request, data, rt.spec, agent_id)
        # and its outputs on a probe batch must be finite (huge finite weights overflow): on the batcher
        # thread, which owns the engine; refused (400) before anything is stored
        await asyncio.wrap_future(rt.control(lambda: rt.engine.check_adapter(agent_id, tensors)))
        version = await asyncio.to_thread(rt.state.publish_adapter, agent_id, data)
        pending = await asyncio.to_thread(rt.refresh)  # this worker has synced (None), or why not
        served = rt.applied[agent_id]
        if served < version and (rt.state_error or pending):  # published, then the backend went away
            raise StateOutcomeUnknown(f"adapter v{version} of {agent_id!r} was published but not applied: "
                                      f"{rt.state_error or pending}")
        if served < version:  # published, but this worker could not load it back (see the log)
            raise RuntimeError(f"adapter v{version} of {agent_id!r} was published but not applied")
        return JSONResponse({"agent_id": agent_id, "version": version, "served_version": served})

    async def merge(request: Request) -> JSONResponse:
        return await _merge(request, True)

    async def unmerge(request: Request) -> JSONResponse:
        return await _merge(request, False)

    async def _merge(request: Request, flag: bool) -> JSONResponse:
        _authorize(request, cfg.admin_token)
        rt = await get_runtime()
        _swappable(rt)
        raw = await _body(request, cfg.max_body_bytes)
        if raw.strip():
            _require_json(request)
        ids = parse_admin(raw, list(rt.applied))
        merged = await asyncio.to_thread(rt.state.publish_merged, ids, flag)
        await asyncio.to_thread(rt.refresh)  # applied here before the answer
        return JSONResponse({"merged": list(merged)})

    routes = [Route("/act", _guard(act), methods=["POST"]),
              Route("/sessions/{session_id}/reset", _guard(reset_session), methods=["POST"]),
              Route("/agents", _guard(agents), methods=["GET"]),
              Route("/policy", _guard(policy), methods=["GET"]),
              Route("/admin/adapters/{agent_id}", _guard(put_adapter), methods=["PUT"]),
              Route("/admin/merge", _guard(merge), methods=["POST"]),
              Route("/admin/unmerge", _guard(unmerge), methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error})


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Unknown paths (404) and wrong methods (405) answer JSON like every other error."""
    return JSONResponse({"error": f"{exc.detail}: {clip(request.method)} {clip(request.url.path)}"},
                        status_code=exc.status_code, headers=exc.headers)


def _guard(handler):
    """Map every expected failure to a JSON error with the right status. A 503 raised before the
    request changed anything (not ready, state backend known down or failing when a session step was
    opened) carries `X-Lorasa-Retry-Safe: 1`; one after which a session step's new state may or may
    not have been stored (StateOutcomeUnknown) does not: lorasa_serve.client re-sends steps only then."""

    async def wrapped(request: Request) -> JSONResponse:
        try:
            resp = await handler(request)
            resp.headers["X-Lorasa-Worker"] = WORKER
            return resp
        except BadRequest as e:
            return _client_error(request, e.status, e.message)
        except NotReady as e:
            return JSONResponse({"error": f"not ready: {e}"}, status_code=503,
                                headers={"Retry-After": "1", RETRY_SAFE: "1"})
        except StateOutcomeUnknown as e:  # failed after something may have changed: not retry-safe
            return JSONResponse({"error": f"state backend unavailable: {e}"}, status_code=503,
                                headers={"Retry-After": "1"})
        except StateUnavailable as e:  # sessions and admin need the state backend; retry shortly
            return JSONResponse({"error": f"state backend unavailable: {e}"}, status_code=503,
                                headers={"Retry-After": "1", RETRY_SAFE: "1"})
        except SessionBusy as e:  # concurrent steps of one session are refused, never last-writer-wins
            return _client_error(request, 409, f"{e}: send a session's next step after the previous "
                                               "one was answered")
        except (ArtifactError, LorasaError) as e:  # bad upload or bad input caught by the engine
            return _client_error(request, 400 if isinstance(e, ArtifactError) else 422,
                                 f"{type(e).__name__}: {e}")
        except Exception:
            log.exception("internal error on %s", request.url.path)
            if _is_act(request):
                metrics.act_requests.labels(outcome="error").inc()
            return JSONResponse({"error": "internal server error"}, status_code=500)

    return wrapped


def _is_act(request: Request) -> bool:
    """An inference request (/v1/act or /v2 .../infer): counted in lorasa_act_requests."""
    return request.url.path.endswith(("/act", "/infer"))


def _client_error(request: Request, status: int, message: str) -> JSONResponse:
    if _is_act(request):
        metrics.act_requests.labels(outcome="client_error").inc()
    return JSONResponse({"error": message}, status_code=status)


def _authorize(request: Request, token: str) -> None:
    if not token:
        raise BadRequest("admin API disabled: set LORASA_ADMIN_TOKEN on the server to enable it", 403)
    got = request.headers.get("authorization", "")
    scheme, _, value = got.partition(" ")
    if scheme.lower() != "bearer" or not value:
        raise BadRequest("admin API needs 'Authorization: Bearer <token>'", 401)
    # exact bytes (headers arrive latin-1 decoded): no trimming of spaces, tabs, \xa0 or \x1f
    if not hmac.compare_digest(value.encode("latin-1"), token.encode()):
        raise BadRequest("invalid admin token", 403)


def _swappable(rt: PolicyRuntime) -> None:
    """409 when the server acts through a backend that cannot swap or merge adapters (LORASA_BACKEND=onnx)."""
    if rt.engine is None:
        raise BadRequest(f"this server serves a lorasa-export directory through {type(rt.backend).__name__} "
                         f"(LORASA_BACKEND={rt.cfg.backend}): its adapters are fixed in the graphs; serve the "
                         "policy directory with LORASA_BACKEND=engine to hot-swap or merge", 409)


def _require_json(request: Request) -> None:
    """415 unless the Content-Type is application/json (parameters such as charset allowed)."""
    ctype = request.headers.get("content-type", "")
    if ctype.split(";", 1)[0].strip().lower() != "application/json":
        raise BadRequest(f"Content-Type must be application/json, not {short(ctype) if ctype else 'missing'}",
                         415)


async def _body(request: Request, limit: int) -> bytes:
    """Read the body, refusing (413) past `limit` bytes without buffering more than that."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise BadRequest("invalid Content-Length")
        if int(declared) > limit:
            raise BadRequest(f"body of {declared} bytes is over the {limit}-byte limit", 413)
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise BadRequest(f"body is over the {limit}-byte limit", 413)
        chunks.append(chunk)
    return b"".join(chunks)
