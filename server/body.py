"""JSON bodies in and out: strict request-body decoding (with field-naming errors) and JSON responses.

Bodies are decoded here rather than by Litestar's ``data`` injection so that every mistake
(malformed JSON, a wrong type, an out-of-range value) becomes an :class:`ApiError` that names
the field, with strict typing (``"2"`` is not an integer) and logged unknown fields.
"""

from __future__ import annotations

import logging
import re
from typing import Any, TypeVar

import msgspec
from litestar import Request, Response
from litestar.exceptions import InternalServerException
from toolkit.server.errors import ClientDisconnected, invalid

log = logging.getLogger(__name__)

T = TypeVar("T")

_PATH_RE = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
_MISSING_RE = re.compile(r"missing required field `(?P<field>[^`]+)`")

#: Deepest JSON nesting a request body may have (a tool schema needs far less); deeper is a 400.
MAX_JSON_DEPTH = 64


async def decode_body(request: Request, struct_type: type[T]) -> T:
    """Read the request body and convert it to ``struct_type``; raise ApiError naming the bad field.

    The Content-Type must be absent or JSON (``application/json``, ``application/*+json``): a
    browser can send ``text/plain`` / form posts cross-origin without a CORS preflight.
    """
    _check_content_type(request.headers.get("content-type", ""))
    try:
        body = await request.body()
    except InternalServerException as exc:  # Litestar's "client disconnected prematurely"
        raise ClientDisconnected() from exc
    if not body.strip():
        raise invalid("the request body is empty; send a JSON object")
    try:
        data = msgspec.json.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise invalid(f"the request body is not valid JSON ({exc}); send a JSON object") from None
    except RecursionError:
        raise invalid(f"the request body is nested too deeply (limit {MAX_JSON_DEPTH} levels)") from None
    if not isinstance(data, dict):
        raise invalid("the request body must be a JSON object")
    if _too_deep(data, MAX_JSON_DEPTH):
        raise invalid(f"the request body is nested too deeply (limit {MAX_JSON_DEPTH} levels)")
    unknown = sorted(set(data) - set(struct_type.__struct_fields__))  # type: ignore[attr-defined]
    if unknown:
        log.info("ignoring unknown field(s) %s on %s", ", ".join(repr(k[:64]) for k in unknown[:16]),
                 request.url.path)
    try:
        return msgspec.convert(data, struct_type)
    except msgspec.ValidationError as exc:
        raise validation_error(exc) from None


def _check_content_type(value: str) -> None:
    media_type = value.split(";", 1)[0].strip().lower()
    if media_type and media_type != "application/json" and not (
            media_type.startswith("application/") and media_type.endswith("+json")):
        raise invalid(f"Content-Type must be application/json, got {media_type[:64]!r}; send a JSON body")


def _too_deep(data: Any, limit: int) -> bool:
    """True if lists/objects nest deeper than ``limit`` (iterative: no recursion on hostile input)."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def validation_error(exc: msgspec.ValidationError) -> Exception:
    """Turn msgspec's message (``Expected `int` <= 4 - at `$.n```) into an error naming the field."""
    text = str(exc)
    param = None
    match = _PATH_RE.search(text)
    if match:
        param = match.group("path") or None
        text = text[: match.start()]
    missing = _MISSING_RE.search(text)
    if missing:
        field = missing.group("field")
        param = f"{param}.{field}" if param else field
        return invalid(f"'{param}' is required", param)
    if param is None:
        return invalid(f"invalid request body: {text}")
    return invalid(f"invalid value for '{param}': {text[0].lower()}{text[1:]}", param)


def json_response(content: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON response encoded by msgspec (fast, compact)."""
    return Response(content=msgspec.json.encode(content), status_code=status_code,
                    media_type="application/json", headers=headers)
