"""Server-sent events over a :class:`Generation`, byte-exact and abort-safe."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from litestar.background_tasks import BackgroundTask
from litestar.response import Stream
from toolkit.runtime.types import RequestOutput
from toolkit.server.errors import classify
from toolkit.server.generation import Generation
from toolkit.server.sse import DONE_EVENT, SSE_HEADERS, sse_event

log = logging.getLogger(__name__)

Chunks = list[dict[str, Any]]


def sse_response(generation: Generation, on_output: Callable[[RequestOutput], Chunks],
                 on_finish: Callable[[Generation], Chunks],
                 error_payload: Callable[[Any], dict[str, Any]]) -> Stream:
    """Stream ``data: {...}`` events, then ``data: [DONE]``.

    An error after the stream started is sent as one ``data: {error payload}`` event and the
    stream ends without ``[DONE]``. The generator is closed in a background task after the
    response (also after a client disconnect), which aborts an unfinished engine request.
    """
    events = _events(generation, on_output, on_finish, error_payload)
    return Stream(events, media_type="text/event-stream", headers=SSE_HEADERS,
                  background=BackgroundTask(_close, events, generation))


async def _events(generation: Generation, on_output: Callable[[RequestOutput], Chunks],
                  on_finish: Callable[[Generation], Chunks],
                  error_payload: Callable[[Any], dict[str, Any]]) -> AsyncIterator[bytes]:
    try:
        async for output in generation.outputs():
            for chunk in on_output(output):
                yield sse_event(chunk)
        for chunk in on_finish(generation):
            yield sse_event(chunk)
        yield DONE_EVENT
    except Exception as exc:  # noqa: BLE001 - reported to the client in its schema
        log.warning("request %s: error after the stream started: %s", generation.request.request_id, exc)
        yield sse_event(error_payload(classify(exc)))
    finally:
        await generation.close()


async def _close(events: Any, generation: Generation) -> None:
    try:
        await events.aclose()
    except RuntimeError:  # still running in a cancelled task: its own finally closes it
        pass
    await generation.close()
