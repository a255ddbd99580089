"""ASGI middleware: every error response of the server is JSON `{"error": ...}`.

Routes of our own apps already answer JSON; this catches the rest, answered by BentoML's root app
(unknown paths -> plain-text `Not Found`, wrong methods, ...): a 4xx/5xx response whose
Content-Type is not JSON gets its text wrapped as `{"error": "<text>: <METHOD> <path>"}`.
"""
from __future__ import annotations

import json

from .schema import clip

MAX_TEXT = 200  # characters of the original body kept in the message


class JsonErrorsMiddleware:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start: dict | None = None  # a non-JSON error response held back until its body is complete
        chunks: list[bytes] = []

        async def wrapped_send(message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers") or [])
                ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
                if message["status"] >= 400 and ctype != b"application/json":
                    start = message
                    return
            elif message["type"] == "http.response.body" and start is not None:
                chunks.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                await _send_json(send, scope, start, b"".join(chunks))
                return
            await send(message)

        await self.app(scope, receive, wrapped_send)


async def _send_json(send, scope, start: dict, body: bytes) -> None:
    text = body.decode("utf-8", "replace").strip()[:MAX_TEXT] or "error"
    where = f"{clip(scope.get('method', ''))} {clip(scope.get('path', ''))}"
    data = json.dumps({"error": f"{text}: {where}"}).encode()
    keep = [(k, v) for k, v in start.get("headers") or []
            if k.lower() not in (b"content-type", b"content-length")]
    await send({"type": "http.response.start", "status": start["status"],
                "headers": keep + [(b"content-type", b"application/json"),
                                   (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
