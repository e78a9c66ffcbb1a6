"""ASGI middleware run inside Ray Serve's HTTP proxy: a LoRA request is routed to a replica that has its adapter.

Ray Serve's model multiplexing routes a request carrying the ``serve_multiplexed_model_id`` header to
a replica that reported that model loaded (replicas report through ``@serve.multiplexed``, see
``ray_serve.py``); a model no replica has goes to the replica holding the fewest, which then loads it.
The adapter a request wants is in its JSON body, so for the generation routes

* ``POST /v1/chat/completions``, ``POST /v1/completions``: ``model`` = ``ADAPTER`` or ``BASE:ADAPTER``;
* ``POST /client/v4/accounts/*/ai/run/*``: ``lora``;

this middleware reads the body (at most ``max_body_bytes``; a larger one streams through untouched
and the app answers 413), sets the header to the adapter's name (nothing for a base-model request;
a header sent by the client is dropped) and hands the app the very same body messages.

It stays cheap: other routes and methods are not touched; the body is parsed only when it can name
an adapter. Replicas list the adapters they serve in a response header (``x-toolkit-adapters``,
removed here before the client sees it); once the proxy has seen one, a body that contains none of
those names is not parsed at all (a deployment without adapters never parses a body), and a plain
``model`` is an adapter only when it is one of those names. Before that, only the unambiguous forms
(``BASE:ADAPTER``, ``lora``) are routed. A body that is not JSON (or not an object) passes through.
"""

from __future__ import annotations

import json
from typing import Any

from toolkit.server.app import DEFAULT_MAX_BODY_BYTES

#: The request header Ray Serve's proxy reads (it also accepts the hyphenated spelling).
MODEL_ID_HEADER = b"serve_multiplexed_model_id"
_CLIENT_SPELLINGS = {MODEL_ID_HEADER, b"serve-multiplexed-model-id"}
#: The response header in which a replica lists its adapters (comma-separated); never reaches the client.
ADAPTERS_HEADER = b"x-toolkit-adapters"

OPENAI_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions"})
WORKERS_AI_RUN = ("/client/v4/accounts/", "/ai/run/")


def route_schema(method: str, path: str) -> str | None:
    """``"openai"`` / ``"workers-ai"`` for a generation route that can name an adapter, else None."""
    if method != "POST":
        return None
    if path in OPENAI_ROUTES:
        return "openai"
    prefix, run = WORKERS_AI_RUN
    if path.startswith(prefix) and run in path[len(prefix):]:
        return "workers-ai"
    return None


def adapter_of(schema: str, body: bytes, known: frozenset[str] | None) -> str | None:
    """The adapter ``body`` asks for (None: the base model, or not JSON). ``known``: the adapters the
    replicas serve (None while not known yet)."""
    if known is not None and not any(name.encode() in body for name in known):
        return None  # names no adapter: no need to parse
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict):
        return None
    if schema == "workers-ai":
        name = doc.get("lora")
        if not isinstance(name, str) or not name:
            return None
        return name if known is None or name in known else None
    model = doc.get("model")
    if not isinstance(model, str) or not model:
        return None
    if known is not None and model in known:
        return model
    if ":" in model:
        name = model.rsplit(":", 1)[1]
        if name and (known is None or name in known):
            return name
    return None


class AdapterRoutingMiddleware:
    """Pure ASGI middleware (``Middleware(AdapterRoutingMiddleware)`` in Ray Serve's proxy)."""

    def __init__(self, app: Any, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.known: frozenset[str] | None = None  # the adapters the replicas serve, once one said so
        self._known_raw: bytes | None = None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        send = self._learning_send(send)
        schema = route_schema(scope.get("method", ""), scope.get("path", ""))
        if schema is None:
            await self.app(scope, receive, send)
            return
        buffered: list[dict] = []
        parts: list[bytes] = []
        size, complete = 0, False
        while True:
            message = await receive()
            buffered.append(message)
            if message["type"] != "http.request":
                break  # the client went away: the app sees it too
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            if not message.get("more_body", False):
                complete = True
                break
            if size > self.max_body_bytes:
                break  # too large: streamed through, the app answers 413
        adapter = adapter_of(schema, b"".join(parts), self.known) if complete and size <= self.max_body_bytes else None
        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() not in _CLIENT_SPELLINGS]
        if adapter is not None:
            headers.append((MODEL_ID_HEADER, adapter.encode()))
        scope = {**scope, "headers": headers}

        async def replay() -> dict:
            if buffered:
                return buffered.pop(0)
            return await receive()

        await self.app(scope, replay, send)

    def _learning_send(self, send: Any) -> Any:
        async def learning_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = message.get("headers") or []
                raw = next((v for k, v in headers if k.lower() == ADAPTERS_HEADER), None)
                if raw is not None:
                    if raw != self._known_raw:
                        self.known = frozenset(n for n in raw.decode("utf-8", "replace").split(",") if n)
                        self._known_raw = raw
                    message = {**message, "headers": [(k, v) for k, v in headers if k.lower() != ADAPTERS_HEADER]}
            await send(message)

        return learning_send
