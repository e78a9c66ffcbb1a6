"""OpenAI's half of error rendering: its kind → (status, type, code) table and its envelope.

The responder itself (statuses, Retry-After, 499 on disconnect) is shared:
:class:`toolkit.server.responders.ErrorSchema`.
"""

from __future__ import annotations

from typing import Any

from toolkit.server.errors import ApiError
from toolkit.server.responders import ErrorSchema

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


SCHEMA = ErrorSchema(TABLE, error_body)
error_response = SCHEMA.response  # any exception → the OpenAI envelope and status
exception_handler = SCHEMA.exception_handler  # Litestar exception handler for the OpenAI routes
