"""Workers AI's half of error rendering: its kind → (status, Cloudflare code) table and its envelope.

The responder itself (statuses, Retry-After, 499 on disconnect) is shared:
:class:`toolkit.server.responders.ErrorSchema`.
"""

from __future__ import annotations

from typing import Any

from toolkit.server.errors import ApiError
from toolkit.server.responders import ErrorSchema

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


SCHEMA = ErrorSchema(TABLE, error_body)
error_response = SCHEMA.response  # any exception → the Workers AI envelope and status
exception_handler = SCHEMA.exception_handler  # Litestar exception handler for the Workers AI routes
