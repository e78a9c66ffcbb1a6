"""One classification of every error the server can meet, shared by both APIs.

Handlers and adapters raise :class:`ApiError` for client mistakes; the runtime raises
``toolkit.runtime.errors`` subclasses and ``InvalidParameterError``. :func:`classify` turns any
of them into an :class:`ApiError` with a *kind*; each API then renders kinds into its own
envelope and status in exactly one table (``server/openai/errors.py``,
``server/workers_ai/errors.py``), through the shared responder in ``server/responders.py``.
"""

from __future__ import annotations

import logging

from litestar.exceptions import HTTPException
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from toolkit.recipes.chat_format import ChatFormatError
from toolkit.runtime.errors import (
    EngineError,
    EngineFailureError,
    EngineStoppedError,
    InvalidRequestError,
    OverloadedError,
    PromptTooLongError,
)
from toolkit.runtime.sampling_params import InvalidParameterError

log = logging.getLogger(__name__)

#: Every kind an API table must map.
KINDS = (
    "invalid",  # bad input: wrong type, out of range, malformed JSON, empty messages
    "unauthorized",  # missing or wrong API key
    "not_found",  # no such route
    "method_not_allowed",
    "unknown_model",
    "lora_unsupported",
    "prompt_too_long",
    "body_too_large",
    "overloaded",
    "unavailable",  # engines not started / shutting down
    "timeout",  # the server-side request timeout expired; the request was aborted
    "internal",
)


class ApiError(Exception):
    """A client-visible error: ``kind`` picks status and code per API, ``message`` says what to do."""

    def __init__(self, kind: str, message: str, param: str | None = None,
                 retry_after_s: int | None = None) -> None:
        super().__init__(message)
        if kind not in KINDS:
            raise ValueError(f"unknown error kind {kind!r}")
        self.kind = kind
        self.message = message
        self.param = param
        self.retry_after_s = retry_after_s


class ClientDisconnected(Exception):
    """The client went away before the response was complete; nothing is sent."""


def invalid(message: str, param: str | None = None) -> ApiError:
    """Shortcut for the most common error: a bad field in the request."""
    return ApiError("invalid", message, param)


def classify(exc: BaseException) -> ApiError:
    """Map any exception to an :class:`ApiError`; unexpected ones are logged and hidden."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, InvalidParameterError):
        return ApiError("invalid", str(exc), exc.param)
    if isinstance(exc, EngineError):
        return _classify_engine_error(exc)
    if isinstance(exc, ChatFormatError):
        return ApiError("invalid", str(exc), "messages")
    if isinstance(exc, RequestEntityTooLarge):
        return ApiError("body_too_large", "the request body is too large; send a smaller request")
    if isinstance(exc, HTTPException):
        return _classify_http_exception(exc)
    log.error("unexpected error while serving a request", exc_info=exc)
    return ApiError("internal", "internal server error; the server log has the details")


def _classify_engine_error(exc: EngineError) -> ApiError:
    if isinstance(exc, PromptTooLongError):
        return ApiError("prompt_too_long", exc.message, exc.param)
    if isinstance(exc, InvalidRequestError):
        return ApiError("invalid", exc.message, exc.param)
    if isinstance(exc, OverloadedError):
        return ApiError("overloaded", exc.message, retry_after_s=exc.retry_after_s)
    if isinstance(exc, EngineStoppedError):
        return ApiError("unavailable", exc.message, retry_after_s=1)
    if isinstance(exc, EngineFailureError):
        log.error("engine failure: %s", exc.message)
        return ApiError("internal", exc.message)
    if 400 <= exc.status < 500:
        return ApiError("invalid", exc.message, exc.param)
    log.error("engine error: %s", exc.message)
    return ApiError("internal", exc.message)


def _classify_http_exception(exc: HTTPException) -> ApiError:
    status = exc.status_code
    detail = str(exc.detail or "")
    if status == 404:
        return ApiError("not_found", f"no such route ({detail or 'not found'}); see /schema for the API")
    if status == 405:
        return ApiError("method_not_allowed", "method not allowed on this route; see /schema for the API")
    if status == 413:
        return ApiError("body_too_large", "the request body is too large; send a smaller request")
    if status == 401:
        return ApiError("unauthorized", detail or "missing or invalid API key")
    if 400 <= status < 500:
        return ApiError("invalid", detail or "bad request")
    log.error("HTTP exception %s: %s", status, detail)
    return ApiError("internal", "internal server error; the server log has the details")
