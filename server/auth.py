"""API keys: ``Authorization: Bearer <key>``, compared in constant time. No keys = open server."""

from __future__ import annotations

import hmac

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from toolkit.server.errors import ApiError
from toolkit.server.state import state_of


def key_matches(token: str, keys: tuple[str, ...]) -> bool:
    """True if ``token`` equals one of ``keys``; every key is compared, each in constant time."""
    candidate = token.encode("utf-8")
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(candidate, key.encode("utf-8"))
    return matched


def api_key_guard(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """Litestar guard: raise ``unauthorized`` (rendered in the route's own schema) on a bad key."""
    keys = state_of(connection).api_keys
    if not keys:
        return
    values = connection.headers.getall("authorization", [])
    if len(values) > 1:  # which one would count is ambiguous: refuse rather than pick the first
        raise ApiError("unauthorized", "send exactly one Authorization header")
    scheme, _, token = (values[0] if values else "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError("unauthorized", "missing API key; send the header 'Authorization: Bearer <key>'")
    if not key_matches(token.strip(), keys):
        raise ApiError("unauthorized", "invalid API key; check the key given to `toolkit serve --api-key`")
