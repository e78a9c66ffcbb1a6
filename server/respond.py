"""The request path both APIs share: decode the body, find the model, run the generation, answer.

Each API supplies only what differs: its body type, where the model name is, the adapter that
builds the engine request, a :class:`Reply` that shapes outputs into its chunks and body, and
its error envelope (``error_body``) for errors after an SSE stream started.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from litestar import Request, Response
from toolkit.runtime.types import GenerateRequest, RequestOutput
from toolkit.server.body import decode_body, json_response
from toolkit.server.errors import ApiError
from toolkit.server.generation import Generation
from toolkit.server.registry import ModelEntry
from toolkit.server.state import state_of
from toolkit.server.streaming import sse_response

Body = TypeVar("Body")


class Reply(Protocol):
    """How one API shapes a generation: SSE chunks per output, the closing chunks, the JSON body."""

    def chunks(self, output: RequestOutput) -> list[dict[str, Any]]: ...

    def final(self, generation: Generation) -> list[dict[str, Any]]: ...

    def body(self, outputs: list[RequestOutput], generation: Generation) -> dict[str, Any]: ...


async def accept(request: Request, body_type: type[Body], model_name: Callable[[Body], str]) -> tuple[Body, ModelEntry]:
    """The decoded body and the served model it names; 4xx/503 ``ApiError`` otherwise."""
    state = state_of(request)
    body = await decode_body(request, body_type)
    entry = state.resolve(model_name(body))
    state.require_ready()
    return body, entry


async def respond(request: Request, entry: ModelEntry, engine_request: GenerateRequest, zero_tokens: bool,
                  reply: Reply, streaming: bool, error_body: Callable[[ApiError], dict[str, Any]]) -> Response:
    """Run the generation; answer with SSE (``reply``'s chunks) or the JSON body ``reply`` makes."""
    state = state_of(request)
    generation = Generation(entry, engine_request, state.metrics, zero_tokens, timeout_s=state.request_timeout_s)
    await generation.start()
    if streaming:
        return sse_response(generation, reply.chunks, reply.final, error_body)
    outputs = await generation.collect(request.receive)
    return json_response(reply.body(outputs, generation))
