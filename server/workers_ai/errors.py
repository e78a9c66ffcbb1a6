"""The one place where errors become Workers AI envelopes, codes and HTTP statuses."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response
from toolkit.server.errors import ApiError, ClientDisconnected, classify
from toolkit.server.wire import json_response

#: kind → (HTTP status, Cloudflare error code)
TABLE: dict[str, tuple[int, int]] = {
    "invalid": (400, 5006),
    "unauthorized": (401, 10000),
    "not_found": (404, 7000),
    "method_not_allowed": (405, 7001),
    "unknown_model": (400, 5007),
    "lora_unsupported": (405, 5005),
    "prompt_too_long": (413, 3006),
    "body_too_large": (413, 3006),
    "overloaded": (429, 3040),
    "unavailable": (503, 3040),
    "timeout": (408, 3007),
    "internal": (500, 3043),
}


def error_body(error: ApiError) -> dict[str, Any]:
    """``{"result": {}, "success": false, "errors": [{"message", "code"}], "messages": []}``."""
    message = f"{error.param}: {error.message}" if error.param and error.param not in error.message else error.message
    return {"result": {}, "success": False, "errors": [{"message": message, "code": TABLE[error.kind][1]}],
            "messages": []}


def error_response(exc: BaseException) -> Response:
    """Any exception → the Workers AI envelope with its status (and Retry-After on 429/503)."""
    if isinstance(exc, ClientDisconnected):
        return Response(b"", status_code=499)
    error = classify(exc)
    headers = {"Retry-After": str(error.retry_after_s)} if error.retry_after_s else None
    return json_response(error_body(error), TABLE[error.kind][0], headers)


def exception_handler(_: Request, exc: Exception) -> Response:
    """Litestar exception handler for the Workers AI routes."""
    return error_response(exc)
