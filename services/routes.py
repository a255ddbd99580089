"""What paths the server answers, as route templates: bounded metric labels and no slash redirects.

- BentoML's HTTP metrics (`bentoml_service_request_total{endpoint=...}` and friends, recorded by
  `bentoml._internal.server.http.instruments.RunnerTrafficMetricsMiddleware`) label `endpoint` with
  the raw request path, so every distinct path (`/v1/sessions/<id>/reset`, any unknown path) became
  a new label set: `/metrics`, the worker's memory and the metrics dir grew without bound.
  `bound_http_metrics()` (called by the service module in every process, before BentoML builds its
  app) replaces that class, in its module, with a subclass that records the route template
  (`/v1/sessions/{session_id}/reset`) and one label, `other`, for every path no route serves.
- Starlette answers `/v1/act/` with a 307 whose Location is built from the client's Host header.
  `NoRedirectMiddleware` turns every redirect into a JSON 404 naming the path without the slash.
"""
from __future__ import annotations

import json
import re

from .schema import clip

UNKNOWN = "other"  # the one label of every path no route serves
_SEG = "[^/]+"
TEMPLATES = (
    "/v1/act", "/v1/sessions/{session_id}/reset", "/v1/agents", "/v1/policy",
    "/v1/admin/adapters/{agent_id}", "/v1/admin/merge", "/v1/admin/unmerge",
    "/v2", "/v2/", "/v2/health/live", "/v2/health/ready",
    "/v2/models/{model}", "/v2/models/{model}/ready", "/v2/models/{model}/infer",
    "/v2/models/{model}/versions/{version}", "/v2/models/{model}/versions/{version}/ready",
    "/v2/models/{model}/versions/{version}/infer",
    "/", "/docs.json", "/schema.json", "/livez", "/readyz", "/healthz", "/metrics",
)
_COMPILED = [(re.compile(re.sub(r"\\\{[a-z_]+\\\}", _SEG, re.escape(t)) + "$"), t) for t in TEMPLATES]
_EXACT = {t: t for t in TEMPLATES if "{" not in t}
_STATIC = re.compile(r"/static_content/[A-Za-z0-9._/-]{1,200}$")


def route_label(path: str) -> str:
    """The route template serving `path`, or UNKNOWN: a label from a fixed set, whatever the path."""
    if path in _EXACT:
        return path
    for rx, template in _COMPILED:
        if rx.match(path):
            return template
    return "/static_content/{path}" if _STATIC.match(path) else UNKNOWN


def bound_http_metrics() -> None:
    """Make BentoML's traffic metrics middleware label requests by route template (idempotent)."""
    from bentoml._internal.server.http import instruments

    base = instruments.RunnerTrafficMetricsMiddleware
    if getattr(base, "lorasa_bounded", False):
        return

    class RouteLabelledMetrics(base):
        """Records `route_label(path)` as the endpoint; the app behind it sees the real scope."""
        lorasa_bounded = True

        def __init__(self, app, *args, **kwargs):
            super().__init__(_RealScope(app), *args, **kwargs)

        async def __call__(self, scope, receive, send):
            if scope.get("type") in ("http", "websocket"):
                scope = {**scope, "path": route_label(scope.get("path", "")), _REAL: scope}
            await super().__call__(scope, receive, send)

    instruments.RunnerTrafficMetricsMiddleware = RouteLabelledMetrics


_REAL = "lorasa.real_scope"


class _RealScope:
    """Inside the metrics middleware: hand the app the request's own scope again."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        await self.app(scope.get(_REAL, scope), receive, send)


class NoRedirectMiddleware:
    """ASGI middleware: a 3xx answer (Starlette's trailing-slash redirect, whose Location comes from
    the Host header) becomes a JSON 404 instead; no route of this server redirects on purpose."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        redirected = False

        async def wrapped_send(message) -> None:
            nonlocal redirected
            if message["type"] == "http.response.start" and 300 <= message["status"] < 400:
                redirected = True
                path = scope.get("path", "")
                body = json.dumps({"error": f"Not Found: {clip(scope.get('method', ''))} {clip(path)} "
                                            f"(no redirects: try {clip(path.rstrip('/') or '/')})"}).encode()
                await send({"type": "http.response.start", "status": 404,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
            if not redirected:
                await send(message)

        await self.app(scope, receive, wrapped_send)
