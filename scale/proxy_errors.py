"""ASGI middleware run inside Ray Serve's HTTP proxy: a lost replica becomes an error in the API's schema.

When a replica process dies, Ray Serve's proxy ends the requests it was serving: one whose
response had not started gets an empty answer (uvicorn then sends a bare ``500 Internal Server
Error``), one that was streaming is cut without an end. This middleware (installed with
``serve.start(http_options={"middlewares": [...]})``, see ``ray_serve.py``) sees both and answers
as the app would have:

* not started: ``503`` with ``Retry-After: 1`` and the schema's envelope (OpenAI type
  ``service_unavailable_error`` / code ``engine_unavailable``; Workers AI code 3040), retryable;
* streaming (``text/event-stream``): one ``data: {error envelope}`` event, then the stream ends,
  exactly like an engine error after the stream started in ``server/streaming.py``.

It also makes ``/health`` answer when no replica can: Ray routes only to replicas whose engines
have started (their health check says so), so while none is ready a ``/health`` request would
wait in the proxy; after ``health_timeout_s`` it gets ``503 {"status": "starting"}`` instead.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from toolkit.server.errors import ApiError
from toolkit.server.sse import sse_event

log = logging.getLogger(__name__)

WORKERS_AI_PREFIX = "/client/v4/"
REPLICA_LOST = "the replica serving this request was lost (it is being replaced); retry the request"
NO_REPLICA = "no replica is ready yet; retry in a few seconds"


def _error_body(path: str, error: ApiError) -> dict[str, Any]:
    if path.startswith(WORKERS_AI_PREFIX):
        from toolkit.server.workers_ai.errors import error_body
    else:
        from toolkit.server.openai.errors import error_body
    return error_body(error)


class ReplicaLossMiddleware:
    """Pure ASGI middleware (``Middleware(ReplicaLossMiddleware)`` in Ray Serve's http_options)."""

    def __init__(self, app: Any, health_timeout_s: float = 5.0) -> None:
        self.app = app
        self.health_timeout_s = health_timeout_s

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        state = {"started": False, "done": False, "sse": False}

        async def tracking_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                state["started"] = True
                headers = dict(message.get("headers") or [])
                state["sse"] = headers.get(b"content-type", b"").startswith(b"text/event-stream")
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                state["done"] = True
            await send(message)

        call = self.app(scope, receive, tracking_send)
        try:
            if path == "/health":
                await self._health(call, state, send)
            else:
                await call
        except Exception:  # noqa: BLE001 - the proxy failed the request; answer in the schema below
            log.warning("request to %s failed in the proxy", path, exc_info=True)
        if state["done"]:
            return
        error = ApiError("unavailable", REPLICA_LOST, retry_after_s=1)
        if not state["started"]:
            await _send_json(send, 503, _error_body(path, error))
        elif state["sse"]:
            await send({"type": "http.response.body", "body": sse_event(_error_body(path, error)), "more_body": False})
        else:  # a started non-streamed body cannot be repaired: end it (the client sees it cut short)
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _health(self, call: Any, state: dict, send: Any) -> None:
        task = asyncio.ensure_future(call)
        done, _ = await asyncio.wait({task}, timeout=self.health_timeout_s)
        if done:
            task.result()
            return
        if state["started"]:  # answering, just slowly
            await task
            return
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        state["done"] = True
        await _send_json(send, 503, {"status": "starting", "error": NO_REPLICA})


async def _send_json(send: Any, status: int, body: dict[str, Any]) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"retry-after", b"1")]})
    await send({"type": "http.response.body", "body": payload, "more_body": False})


#: Ray Serve reads this variable in its proxy process (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``)
#: and installs the middlewares the named function returns in front of every route.
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "toolkit.scale.proxy_errors.proxy_middlewares"


def proxy_middlewares() -> list[Any]:
    """The proxy callback: ``[Middleware(ReplicaLossMiddleware), Middleware(AdapterRoutingMiddleware)]``
    (the second sets the multiplexed model id of a LoRA request, ``adapter_routing.py``)."""
    from starlette.middleware import Middleware

    from toolkit.scale.adapter_routing import AdapterRoutingMiddleware

    return [Middleware(ReplicaLossMiddleware), Middleware(AdapterRoutingMiddleware)]
