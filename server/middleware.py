"""ASGI middleware: a request id per request, the access log line and request metrics."""

from __future__ import annotations

import logging
import re
import time
import uuid

from litestar.datastructures import MutableScopeHeaders
from litestar.types import ASGIApp, Message, Receive, Scope, Send

access_log = logging.getLogger("toolkit.server.access")

_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def _incoming_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            return text if _VALID_ID.match(text) else None
    return None


def request_context_middleware(app: ASGIApp) -> ASGIApp:
    """Give each HTTP request an id (``X-Request-Id``, echoed back), log it and count it."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        request_id = _incoming_id(scope) or uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["arrival_time"] = time.monotonic()  # the engine's clock: TTFT counts from here
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableScopeHeaders.from_message(message)["x-request-id"] = request_id
            await send(message)

        try:
            await app(scope, receive, send_with_id)
        finally:
            _record(scope, request_id, status, time.perf_counter() - started)

    return middleware


def _record(scope: Scope, request_id: str, status: int, seconds: float) -> None:
    route = scope.get("path_template") or "unmatched"
    method = scope.get("method", "")
    ctx = getattr(scope["app"].state, "ctx", None)
    if ctx is not None:
        ctx.metrics.requests.labels(route, method, str(status)).inc()
        ctx.metrics.request_latency.labels(route).observe(seconds)
    client = scope.get("client") or ("-", 0)
    access_log.info('%s %s "%s %s" %d %.1fms', request_id, client[0], method, scope.get("path", ""),
                    status, seconds * 1000)
