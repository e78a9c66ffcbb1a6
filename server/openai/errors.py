"""The one place where errors become OpenAI error envelopes and HTTP statuses."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response
from toolkit.server.errors import ApiError, ClientDisconnected, classify
from toolkit.server.wire import json_response

#: kind → (HTTP status, error type, error code)
TABLE: dict[str, tuple[int, str, str | None]] = {
    "invalid": (400, "invalid_request_error", None),
    "unauthorized": (401, "invalid_request_error", "invalid_api_key"),
    "not_found": (404, "invalid_request_error", "not_found"),
    "method_not_allowed": (405, "invalid_request_error", "method_not_allowed"),
    "unknown_model": (404, "invalid_request_error", "model_not_found"),
    "lora_unsupported": (400, "invalid_request_error", "lora_unsupported"),
    "prompt_too_long": (400, "invalid_request_error", "context_length_exceeded"),
    "body_too_large": (413, "invalid_request_error", "request_too_large"),
    "overloaded": (429, "rate_limit_error", "rate_limit_exceeded"),
    "unavailable": (503, "service_unavailable_error", "engine_unavailable"),
    "timeout": (408, "timeout", "request_timeout"),
    "internal": (500, "server_error", None),
}


def error_body(error: ApiError) -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code"}}``."""
    _, kind, code = TABLE[error.kind]
    return {"error": {"message": error.message, "type": kind, "param": error.param, "code": code}}


def error_response(exc: BaseException) -> Response:
    """Any exception → the OpenAI envelope with its status (and Retry-After on 429/503)."""
    if isinstance(exc, ClientDisconnected):
        return Response(b"", status_code=499)
    error = classify(exc)
    headers = {"Retry-After": str(error.retry_after_s)} if error.retry_after_s else None
    return json_response(error_body(error), TABLE[error.kind][0], headers)


def exception_handler(_: Request, exc: Exception) -> Response:
    """Litestar exception handler for the OpenAI routes."""
    return error_response(exc)
