"""The Litestar app: both API schemas over a registry of engines, plus /health, /metrics and /schema."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar, Request, Response, get
from litestar.config.cors import CORSConfig
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.exceptions import HTTPException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin, SwaggerRenderPlugin
from toolkit import __version__
from toolkit.runtime.types import Engine
from toolkit.server import openai as openai_api
from toolkit.server import workers_ai as workers_ai_api
from toolkit.server.auth import api_key_guard
from toolkit.server.body import json_response
from toolkit.server.metrics import Metrics
from toolkit.server.middleware import request_context_middleware
from toolkit.server.openai.routes import OpenAIController
from toolkit.server.registry import ModelRegistry
from toolkit.server.state import AppState, state_of
from toolkit.server.workers_ai.routes import WorkersAIController

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 2 * 1024 * 1024
DEFAULT_REQUEST_TIMEOUT_S = 600.0
WORKERS_AI_PREFIX = "/client/v4/"


@asynccontextmanager
async def lifespan(app: Litestar) -> AsyncIterator[None]:
    """Start the engines in the background (``/health`` is 503 until done); stop them on shutdown."""
    ctx: AppState = app.state.ctx
    ctx._start_task = asyncio.create_task(ctx.start_engines())
    try:
        yield
    finally:
        await ctx.stop_engines()


@get("/health", tags=["Operations"], summary="Readiness")
async def health(request: Request) -> Response:
    """200 once every engine has started, 503 before (and after shutdown began). No API key needed."""
    ctx = state_of(request)
    models = [entry.names[0] for entry in ctx.models.entries]
    if ctx.ready:
        return json_response({"status": "ok", "models": models})
    status = "failed" if ctx.start_error else "starting"
    body: dict[str, Any] = {"status": status, "models": models}
    if ctx.start_error:
        body["error"] = ctx.start_error
    return json_response(body, 503, {"Retry-After": "1"})


def metrics_guard(connection: ASGIConnection, handler: Any) -> None:
    """/metrics needs the API key like the API routes, unless the app was built with public_metrics."""
    if not state_of(connection).public_metrics:
        api_key_guard(connection, handler)


@get("/metrics", tags=["Operations"], summary="Prometheus metrics", guards=[metrics_guard])
async def metrics(request: Request) -> Response:
    """Prometheus exposition: requests, TTFT, inter-token latency, tokens, queue, batch, KV cache."""
    body, content_type = state_of(request).metrics.render()
    return Response(body, media_type=content_type)


def _fallback_handler(request: Request, exc: Exception) -> Response:
    """Errors outside the API controllers (unknown routes, /metrics) in the schema their path suggests."""
    if request.scope.get("path", "").startswith(WORKERS_AI_PREFIX):
        return workers_ai_api.errors.error_response(exc)
    return openai_api.errors.error_response(exc)


def create_app(engines: Mapping[str, Engine], api_keys: Sequence[str] | None = None, *,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, shutdown_grace_s: float = 5.0,
               request_timeout_s: float | None = DEFAULT_REQUEST_TIMEOUT_S, public_metrics: bool = False,
               cors_origins: Sequence[str] = (), debug: bool = False) -> Litestar:
    """Build the app serving ``engines`` (name → Engine) under every name of each model.

    api_keys: accepted ``Authorization: Bearer`` keys; none means an open server (logged as a warning).
    max_body_bytes: larger request bodies get 413 in the caller's schema.
    shutdown_grace_s: passed to ``engine.stop()`` when the app shuts down.
    request_timeout_s: a generation still running this long after its request arrived is aborted
        (its KV cache freed) and answered 408 (OpenAI type ``timeout``, Workers AI code 3007); None: no limit.
    public_metrics: serve /metrics without the API key (for a Prometheus scraper); /health is always open.
    cors_origins: origins allowed by CORS (``"*"`` for any); none (the default) sends no CORS headers.
    """
    models = ModelRegistry(engines)
    keys = tuple(k for k in (api_keys or ()) if k)
    ctx = AppState(models, Metrics(models), keys, shutdown_grace_s, request_timeout_s=request_timeout_s,
                   public_metrics=public_metrics)
    if not keys:
        log.warning("no API key configured: anyone who can reach this server can use it; "
                    "pass --api-key (or TOOLKIT_API_KEY) to require one")
    return Litestar(
        route_handlers=[OpenAIController, WorkersAIController, health, metrics],
        lifespan=[lifespan],
        state=State({"ctx": ctx}),
        middleware=[request_context_middleware],
        exception_handlers={HTTPException: _fallback_handler, Exception: _fallback_handler},
        request_max_body_size=max_body_bytes,
        cors_config=CORSConfig(allow_origins=list(cors_origins)) if cors_origins else None,
        openapi_config=OpenAPIConfig(title="toolkit", version=__version__, path="/schema",
                                     render_plugins=[JsonRenderPlugin(), SwaggerRenderPlugin()]),
        logging_config=None,  # logging is the host's business (serve() configures it)
        debug=debug,
    )
