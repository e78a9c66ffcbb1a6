"""The one error responder both APIs share: any exception → status, envelope, Retry-After.

:func:`toolkit.server.errors.classify` gives every error a *kind*; an :class:`ErrorSchema`
holds one API's kind → status table and body shape (``server/openai/errors.py``,
``server/workers_ai/errors.py``). Everything else is the same for both APIs and lives here:
a ``Retry-After`` header when the error carries one (429/503), and an empty 499 when the
client went away.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from litestar import Request, Response
from toolkit.server.body import json_response
from toolkit.server.errors import KINDS, ApiError, ClientDisconnected, classify

#: Not an HTTP status anyone sees: logged when the client disconnected before the response.
CLIENT_CLOSED_STATUS = 499


class ErrorSchema:
    """One API's rendering of errors: ``table[kind][0]`` is the status, ``body(error)`` the envelope.

    ``table`` must map every kind in :data:`toolkit.server.errors.KINDS`; the rest of each row
    (error type, code, ...) is the API's own business, read by its ``body``.
    """

    def __init__(self, table: Mapping[str, tuple[Any, ...]], body: Callable[[ApiError], dict[str, Any]]) -> None:
        missing = [kind for kind in KINDS if kind not in table]
        if missing:
            raise ValueError(f"error table lacks the kind(s) {', '.join(missing)}")
        self.table = table
        self.body = body

    def status(self, kind: str) -> int:
        """The HTTP status of ``kind``."""
        return self.table[kind][0]

    def response(self, exc: BaseException) -> Response:
        """Any exception → this API's envelope with its status (and Retry-After when the error has one)."""
        if isinstance(exc, ClientDisconnected):
            return Response(b"", status_code=CLIENT_CLOSED_STATUS)
        error = classify(exc)
        headers = {"Retry-After": str(error.retry_after_s)} if error.retry_after_s else None
        return json_response(self.body(error), self.status(error.kind), headers)

    def exception_handler(self, _: Request, exc: Exception) -> Response:
        """A Litestar exception handler answering in this API's schema."""
        return self.response(exc)

